"""Compile Triton kernels in worker processes, beside Inductor's compile.

``fgcompile.lowering.warmup`` compiles the kernels of a site's schedule step while Inductor
compiles the graph. In a thread of the compiling process, Triton's front end (Python, holding the
GIL) slows Inductor's own Python work, so on a fast GPU the background compile made the first call
later, not earlier (benchmarks/NOTES.md, session 5). Here each compile runs in a separate Python
process instead, which shares nothing with the compiling process but Triton's on-disk cache: the
worker writes the binary there, and the first real launch in the compiling process finds it.

Protocol (pickles over the worker's stdin / a private copy of its stdout; the worker's own stdout
goes to its stderr, which is the parent's):

    parent -> worker: (job id, module, attribute, args, kwargs, grid)
    worker -> parent: (job id, ok, seconds, message)

A job rebuilds ``getattr(importlib.import_module(module), attribute).warmup(*args, grid=grid,
**kwargs)``, where tensors were replaced by their dtypes (``kernels.triton_common.CompileJob.
portable``). A worker compiles for the GPU target of its current device (device 0 of the inherited
``CUDA_VISIBLE_DEVICES``), without creating a CUDA context, and builds the kernel's host launcher
too (a C module per signature in Triton 3.6); a compile for another target is only a
wasted job (the launch then compiles its own binary). The workers start at the first job, are
reused for the life of the process and are killed at its exit.

``Pool(n).submit(job)`` returns a ``concurrent.futures.Future`` of (seconds, message); a job that
fails in the worker raises ``WorkerError`` from its future; where a worker dies or cannot start,
that job and the later ones run ``job()`` in the dispatching thread instead (the in-process compile).

Run as ``python -m fgcompile.lowering.compile_worker`` (by ``Pool``; not a user command).
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Optional

__all__ = ["Pool", "WorkerError", "default_processes"]

log = logging.getLogger("fgcompile")


class WorkerError(RuntimeError):
    """A compile that failed in a worker process (the message is the worker's)."""


def default_processes() -> int:
    """``FGCOMPILE_PRECOMPILE_PROCESSES`` (0: compile in the background thread instead); by default
    a quarter of the CPUs, at least 1 and at most 4 (Inductor's own compile workers need the rest)."""
    raw = os.environ.get("FGCOMPILE_PRECOMPILE_PROCESSES")
    if raw is None:
        return max(1, min(4, (os.cpu_count() or 1) // 4))
    try:
        n = int(raw)
        if n < 0:
            raise ValueError
        return n
    except ValueError:
        log.warning("fgcompile: FGCOMPILE_PRECOMPILE_PROCESSES: expected a non-negative integer, got %r; using 0", raw)
        return 0


def _triton_cache_dir() -> Optional[str]:
    """This process's Triton cache directory (``triton.knobs.cache.dir``, feature-detected), so
    that the workers write where this process's launches look."""
    try:
        import triton

        return str(triton.knobs.cache.dir)
    except Exception:  # pragma: no cover - older Triton: the inherited environment decides
        return None


class _Worker:
    """One worker process and the daemon thread that feeds it jobs from the pool's queue."""

    def __init__(self, pool: "Pool", index: int) -> None:
        self.pool = pool
        self.proc: Optional[subprocess.Popen] = None
        self.thread = threading.Thread(target=self._serve, name=f"fgcompile-compile-worker-{index}", daemon=True)
        self.thread.start()

    def _start(self) -> bool:
        env = dict(os.environ)
        cache = _triton_cache_dir()
        if cache:
            env["TRITON_CACHE_DIR"] = cache
        # the worker must import this fgcompile, wherever it lives
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "fgcompile.lowering.compile_worker"], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            return True
        except Exception as e:
            log.debug("fgcompile: cannot start a compile worker: %s: %s", type(e).__name__, e)
            return False

    def _serve(self) -> None:
        broken = not self._start()
        while True:
            item = self.pool._queue.get()
            if item is None:
                return
            fut, job, spec = item
            if not fut.set_running_or_notify_cancel():
                continue
            if not broken:
                try:
                    jid = next(self.pool._ids)
                    pickle.dump((jid, *spec), self.proc.stdin)
                    self.proc.stdin.flush()
                    rid, ok, seconds, message = pickle.load(self.proc.stdout)
                    if rid != jid:
                        raise RuntimeError(f"job {jid} answered as {rid}")
                except Exception as e:  # the worker died: this job and the later ones compile here
                    log.debug("fgcompile: compile worker lost (%s: %s); compiling in this process", type(e).__name__, e)
                    broken = True
                    self.stop()
                else:
                    if ok:
                        fut.set_result((seconds, message))
                    else:
                        fut.set_exception(WorkerError(message))
                    continue
            t0 = time.perf_counter()
            try:
                job()
                fut.set_result((time.perf_counter() - t0, "compiled in the calling process"))
            except BaseException as e:
                fut.set_exception(e)

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                p.kill()
            except Exception:  # pragma: no cover
                pass


class Pool:
    """``n`` worker processes (started at once, each fed by its own daemon thread) taking jobs
    from one queue. ``submit(job)``: ``job`` is a ``CompileJob`` (``portable()`` not None)."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"Pool: n: expected a positive number of processes, got {n}")
        self._queue: "queue.Queue" = queue.Queue()
        self._ids = itertools.count()
        self._workers = [_Worker(self, i) for i in range(n)]

    def submit(self, job: Any, spec: Optional[tuple] = None) -> Future:
        spec = job.portable() if spec is None else spec
        if spec is None:
            raise ValueError("Pool.submit: job: expected a job with a portable() spec, got one without")
        fut: Future = Future()
        self._queue.put((fut, job, spec))
        return fut

    def shutdown(self) -> None:
        """Drop the queued jobs (their futures are cancelled) and kill the workers."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for w in self._workers:
            self._queue.put(None)
            w.stop()


def _build_launchers(compiled: Any) -> None:
    """Build the host launcher of each compiled kernel here too (``driver.active.launcher_cls``:
    Triton 3.6 compiles a C module per kernel signature with the host compiler, 0.3 s each, cached
    on disk), so that the first launch in the compiling process only loads it. Best effort: a
    Triton without it, or an autotuner's warmup (which returns no kernel), skips this."""
    kernels = compiled if isinstance(compiled, (list, tuple)) else [compiled]
    try:
        from triton.runtime.driver import driver

        make = driver.active.launcher_cls
    except Exception:  # pragma: no cover - another Triton layout
        return
    for ck in kernels:
        if hasattr(ck, "src") and hasattr(ck, "metadata"):
            try:
                make(ck.src, ck.metadata)
            except Exception:  # pragma: no cover - the launch builds it instead
                pass


def _serve_forever() -> None:
    """The worker's loop: one job at a time from stdin, its result on the private stdout copy."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the compile prints goes to stderr, not into the result pipe
    inp = sys.stdin.buffer
    while True:
        try:
            jid, module, attr, args, kwargs, grid = pickle.load(inp)
        except EOFError:
            return
        t0 = time.perf_counter()
        try:
            kernel = getattr(importlib.import_module(module), attr)
            _build_launchers(kernel.warmup(*args, grid=grid, **kwargs))
            res = (jid, True, time.perf_counter() - t0, f"{module}.{attr}")
        except BaseException as e:
            res = (jid, False, time.perf_counter() - t0, f"{module}.{attr}: {type(e).__name__}: {e}")
        pickle.dump(res, out)
        out.flush()


if __name__ == "__main__":
    _serve_forever()
