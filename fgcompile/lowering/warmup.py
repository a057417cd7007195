"""Compile the schedule step's Triton kernels while Inductor compiles the graph.

A CUDA site's schedule step (``fgcompile::site_plan`` / ``site_attention``) launches Triton
kernels of its own: the profiling kernel at profiled calls, the pooled predictor's kernels, the
packing of a bitmap into index lists, and (sites left opaque) the sparse kernel. Triton compiles
each at its first launch, which is the model's first call: seconds of compile time on top of
Inductor's, serial, on the caller's thread.

``schedule(...)``, called by the lowering pass for every CUDA site it sees, instead traces one
throwaway schedule step per distinct site shape in a background thread, on scratch tensors with
the fake tensors' exact sizes, strides and dtypes (a Triton binary is specialised on dtypes and on
which integer arguments are 1 or multiples of 16, so scaled-down tensors could compile a different
binary), under ``kernels.triton_common.collect_compiles``: the step's kernel launches become
compile thunks (``JITFunction.warmup`` with the launch's own arguments).

The thunks first run in forked child processes (``forked``; several at once, up to the CPU count
less one), which compile the binaries and their launchers into Triton's on-disk cache: Triton's
compiler holds the GIL for most of a compile, so compiling on a thread of this process slowed
Inductor's own compile on the calling thread by about as much as it saved (session 9). The
thread then runs each thunk itself, which finds the binary in the cache, and loads it (builds its
launcher, loads the module), so that the first real launch finds it in the kernel's in-memory
cache. A child touches no CUDA state: the kernels' per-device binders are made in the parent
before the fork and the child's Triton driver answers the device, stream and capability queries
with the parent's values. Where a child fails or is not done after ``CHILD_TIMEOUT_S`` (it is then
killed), the thread compiles that kernel itself, as without the children (``FGCOMPILE_PRECOMPILE_FORK=0``
always does). ``wait()`` (called at the first run of a site op) joins what is still compiling, so
that no kernel is compiled twice; ``stats()`` says what ran where.

The scratch step computes on zeros on the current CUDA stream and frees everything at its end.
It is skipped, and logged, where the scratch tensors would take more than a quarter of the free
device memory, for symbolic shapes, under the Triton interpreter, and with
``FGCOMPILE_PRECOMPILE=0``. A failure is logged at DEBUG level and changes nothing else: the
kernels then compile at the first call, as without this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import torch

from . import forked

__all__ = ["schedule", "wait", "enabled", "stats"]

log = logging.getLogger("fgcompile")

#: threads of the background pool (``FGCOMPILE_PRECOMPILE_THREADS``, default 1): each schedule step,
#: then each of its kernels' compiles, is a job. More threads compile a step's kernels in parallel,
#: but Triton's front end holds the GIL and so slows Inductor's own (Python) compile on the calling
#: thread: on an H200, 4 threads made the Wan layer's cold compile slower (6.9 s vs 5.9 s with one
#: thread, medians of 2 and 3 fresh processes; benchmarks/NOTES.md, session 5)
def _workers() -> int:
    raw = os.environ.get("FGCOMPILE_PRECOMPILE_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:  # never fails a compile: warn and use one thread
        log.warning("fgcompile: FGCOMPILE_PRECOMPILE_THREADS: expected a positive integer, got %r; using 1", raw)
        return 1
    return n


_POOL: Optional[ThreadPoolExecutor] = None
_PENDING: list[Future] = []
_DONE_KEYS: set = set()
_LOCK = threading.Lock()

#: seconds the thread waits for a step's child processes before it kills them and compiles what
#: is left itself (a kernel compiles in 0.3-3 s on an H200 host; a step's 3-5 kernels took 1-1.6 s
#: in parallel children there). A child that hangs delays the model's first call by this much.
CHILD_TIMEOUT_S = 60.0

#: per process: schedule steps traced, kernels collected, child processes and how they ended
#: (True: every kernel compiled; False: failed; None: killed after CHILD_TIMEOUT_S), seconds
#: the thread waited for them, why the children were not used, the model's wait for the background
#: work at its first calls (``wait``) and the thread's own busy time (tracing, compiles, loads)
_STATS: dict = {"steps": 0, "kernels": 0, "children": [], "children_wait_s": 0.0, "not_forked": [], "run_wait_s": 0.0,
                "thread_s": 0.0, "step_s": 0.0}


def enabled() -> bool:
    """False under the Triton interpreter or with ``FGCOMPILE_PRECOMPILE=0``."""
    from ..kernels.triton_common import interpreting

    return os.environ.get("FGCOMPILE_PRECOMPILE", "1") != "0" and not interpreting()


def _fork_enabled() -> bool:
    """Whether the compiles run in child processes first (``FGCOMPILE_PRECOMPILE_FORK=0``: no)."""
    return os.environ.get("FGCOMPILE_PRECOMPILE_FORK", "1") != "0" and forked.available()


def _spec(t: Any) -> Optional[tuple]:
    """(sizes, strides, dtype, device) of a fake tensor with static sizes; None otherwise."""
    if not isinstance(t, torch.Tensor):
        return None
    dims = (*t.shape, *t.stride())
    if not all(isinstance(s, int) for s in dims):  # symbolic: int() would specialise the graph on it
        return None
    return tuple(t.shape), tuple(t.stride()), t.dtype, t.device


def _scratch(spec: tuple) -> torch.Tensor:
    size, stride, dtype, device = spec
    return torch.empty_strided(size, stride, dtype=dtype, device=device).zero_()


def _nbytes(spec: tuple) -> int:
    size, stride, dtype, _ = spec
    span = 1 + sum((s - 1) * st for s, st in zip(size, stride) if s > 0)
    return span * torch.empty((), dtype=dtype).element_size()


def _step(name: str, config: Any, specs: tuple, scale: float, index_cap: Optional[int], lowered: bool) -> list:
    """One throwaway schedule step of a fresh site state: the profiled (or pooled) call, the
    packing of its mask, and, unless ``lowered`` (Inductor compiles the site's sparse kernel: a
    lowered site on the Triton kernel), the sparse kernel on that packing (an opaque site, or a
    lowered one on the Gluon sm_90 kernel, which the lowered graph calls as is). Runs with
    ``collect_compiles``: the kernels launched through ``triton_common.launch`` are not launched
    but returned as compile thunks (for the pool's thread or threads to run); the others compile
    and run here, on the scratch tensors."""
    from ..kernels.triton_common import collect_compiles
    from ..runtime import SiteState

    q_spec, k_spec, v_spec, kp_spec = specs
    cfg = dataclasses.replace(config, dense_calls=0, dense_sites=(), max_density=1.0, mask_storage="device")
    site = SiteState(name=f"{name} (precompile)", config=cfg)
    dev = q_spec[3]
    with torch.no_grad(), _on(dev), collect_compiles() as thunks:
        q, k, v = _scratch(q_spec), _scratch(k_spec), _scratch(v_spec)
        kp = None if kp_spec is None else torch.ones(kp_spec[0], dtype=torch.bool, device=kp_spec[3])
        out, packed = site.plan(q, k, v, kp, scale, index_cap)
        if site.fallback is not None:
            raise RuntimeError(site.fallback)
        if packed is None and site._profiled_bits is not None:  # a profiled call: pack its new mask
            packed = site.packed(site._profiled_bits, k, index_cap)
        if packed is not None and not lowered:
            site.run_sparse(q, k, v, kp, scale, packed)
        del q, k, v, kp, out, packed, site  # freed in stream order: the memory is reusable at once
    return [(dev, t) for t in thunks]


def _on(dev: torch.device) -> Any:
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def _thunk_name(thunk: Any) -> str:
    """The kernel a compile thunk builds (``partial(kernel.warmup, ...)``), for the log."""
    f = getattr(thunk, "func", thunk)
    return str(getattr(getattr(f, "__self__", None), "__name__", None) or getattr(f, "__name__", "a kernel"))


def _binaries(compiled: Any) -> list:
    """The compiled kernels a compile thunk returned: ``JITFunction.warmup`` gives one, an
    ``Autotuner``'s a list (one per config it keeps)."""
    return [ck for ck in (compiled if isinstance(compiled, (list, tuple)) else (compiled,)) if ck is not None]


def _load(compiled: Any) -> None:
    """Build the launcher of a compiled kernel (Triton compiles a small C module per kernel
    signature, ~0.15 s each) and load its binary, as its first launch would: on the calling
    thread of the model's first call otherwise. ``CompiledKernel._init_handles`` is Triton-private:
    feature-detected, skipped where missing (the first launch then does it)."""
    for ck in _binaries(compiled):
        init = getattr(ck, "_init_handles", None)
        if callable(init):
            init()


def _compile(name: str, dev: torch.device, thunk: Any) -> None:
    t0 = time.perf_counter()
    try:
        with _on(dev):
            _load(thunk())
        log.debug("fgcompile: compiled %s for %s in %.2f s", _thunk_name(thunk), name, time.perf_counter() - t0)
    except Exception as e:  # that kernel then compiles at its first launch
        log.debug("fgcompile: precompiling a kernel of %s failed: %s: %s", name, type(e).__name__, e)
    finally:
        with _LOCK:
            _STATS["thread_s"] += time.perf_counter() - t0


def _jit_function(thunk: Any) -> Any:
    """The ``JITFunction`` under a compile thunk's kernel (an ``Autotuner`` or ``Heuristics``
    wraps it as ``.fn``); None for anything else."""
    from triton.runtime.jit import JITFunction

    f = getattr(getattr(thunk, "func", None), "__self__", None)
    for _ in range(8):
        if isinstance(f, JITFunction):
            return f
        f = getattr(f, "fn", None)
    return None


def _compile_forked(index: int, capability: tuple, thunks: list) -> None:
    """In a forked child: run the compile thunks into Triton's on-disk cache, and build each
    binary's launcher (a small C module, cached there too); no CUDA call. Triton's driver is
    this process's own copy: its device, stream and capability queries (``torch.cuda`` calls,
    which raise in a forked child) answer the parent's values. Raises if any kernel failed."""
    from triton.runtime.driver import driver

    drv = driver.active
    drv.get_current_device = lambda: index
    drv.get_current_stream = lambda *a: 0
    drv.get_device_capability = lambda *a: capability
    failed = []
    for thunk in thunks:
        try:
            for ck in _binaries(thunk()):
                if hasattr(drv, "launcher_cls"):
                    drv.launcher_cls(ck.src, ck.metadata)
        except Exception as e:
            failed.append(f"{_thunk_name(thunk)}: {type(e).__name__}: {e}")
    if failed:
        raise RuntimeError("; ".join(failed))


def _compile_in_children(name: str, thunks: list) -> None:
    """Compile a step's kernels (``(device, thunk)`` pairs of one device) in forked children,
    several at once, and wait for them (the wait releases the GIL). Whatever a child did not
    compile, the thread's own ``_compile`` compiles afterwards, as without children."""
    dev = thunks[0][0]
    jits = [_jit_function(t) for _, t in thunks]
    if any(j is None for j in jits) or any(d != dev for d, _ in thunks):
        with _LOCK:
            _STATS["not_forked"].append(f"{name}: a kernel that is not a Triton JIT function, or two devices")
        return
    with _on(dev):
        index = torch.cuda.current_device()
        capability = torch.cuda.get_device_capability(index)
        for j in jits:  # each kernel's binder and target for this device, made where CUDA works
            j.device_caches[index]
    n = min(len(thunks), max(1, (os.cpu_count() or 2) - 1))
    t0 = time.perf_counter()
    pids: list[int] = []
    end = time.monotonic() + CHILD_TIMEOUT_S
    try:
        for i in range(n):
            work = functools.partial(_compile_forked, index, capability, [t for _, t in thunks[i::n]])
            pids.append(forked.start(work, alarm_s=int(CHILD_TIMEOUT_S) + 30))
    finally:  # a fork that failed (no memory, process limit): still collect the children started
        ended = [forked.wait(pid, max(0.0, end - time.monotonic())) for pid in pids]
    waited = time.perf_counter() - t0
    with _LOCK:
        _STATS["children"].extend(ended)
        _STATS["children_wait_s"] += waited
    log.debug("fgcompile: %d kernel(s) of %s compiled in %d child process(es) in %.2f s (%s)", len(thunks), name,
              n, waited, ended)


def _run(key: tuple, *args: Any) -> None:
    t0 = time.perf_counter()
    try:
        thunks = _step(*args)
    except Exception as e:  # never affects the compile: the kernels then compile at the first call
        log.debug("fgcompile: precompiling the schedule step of %s failed: %s: %s", args[0], type(e).__name__, e)
        with _LOCK:
            _DONE_KEYS.discard(key)
        return
    log.debug("fgcompile: schedule step of %s traced in %.2f s: %d kernel(s) to compile", args[0],
              time.perf_counter() - t0, len(thunks))
    with _LOCK:
        _STATS["steps"] += 1
        _STATS["kernels"] += len(thunks)
        _STATS["step_s"] += time.perf_counter() - t0
    if thunks and _fork_enabled():
        try:
            _compile_in_children(args[0], thunks)
        except Exception as e:  # the thread compiles them below, as without children
            log.debug("fgcompile: compiling the kernels of %s in child processes failed: %s: %s", args[0],
                      type(e).__name__, e)
            with _LOCK:
                _STATS["not_forked"].append(f"{args[0]}: {type(e).__name__}: {e}")
    with _LOCK:
        _STATS["thread_s"] += time.perf_counter() - t0
        if _POOL is not None:
            _PENDING.extend(_POOL.submit(_compile, args[0], dev, t) for dev, t in thunks)


def stats() -> dict:
    """What the background compile did in this process: ``steps`` (schedule steps traced),
    ``kernels`` (compile thunks they gave), ``children`` and ``children_ok`` (child processes, and
    how many compiled all their kernels), ``children_killed`` (not done after ``CHILD_TIMEOUT_S``),
    ``children_wait_s`` (the thread's total wait for them), ``not_forked`` (why a step's
    kernels were compiled on the thread alone), ``run_wait_s`` (how long the model's first calls
    waited for the background work) and ``thread_s`` (the thread's time in steps and compiles,
    the waits for children included; ``step_s`` of it tracing the schedule steps)."""
    with _LOCK:
        ended = list(_STATS["children"])
        return {
            "steps": _STATS["steps"],
            "kernels": _STATS["kernels"],
            "children": len(ended),
            "children_ok": sum(e is True for e in ended),
            "children_killed": sum(e is None for e in ended),
            "children_wait_s": round(_STATS["children_wait_s"], 3),
            "not_forked": list(_STATS["not_forked"]),
            "run_wait_s": round(_STATS["run_wait_s"], 3),
            "thread_s": round(_STATS["thread_s"], 3),
            "step_s": round(_STATS["step_s"], 3),
        }


def schedule(
    name: str,
    config: Any,
    q: Any,
    k: Any,
    v: Any,
    key_padding: Any,
    scale: float,
    index_cap: Optional[int],
    lowered: bool,
) -> bool:
    """Start compiling the schedule-step kernels of a site in the background (q, k, v,
    key_padding: the node's fake tensors; ``index_cap``: the graph's index columns, None for an
    opaque site; ``lowered``: as in ``_step``). Returns whether a job was started (False: disabled, symbolic or non-CUDA shapes,
    not enough free memory, or the same shapes and config already scheduled)."""
    global _POOL
    if not enabled():
        return False
    specs = tuple(_spec(t) for t in (q, k, v))
    if any(s is None for s in specs) or specs[0][3].type != "cuda":
        return False
    kp_spec = None
    if key_padding is not None:
        kp_spec = _spec(key_padding)
        if kp_spec is None:
            return False
    key = (specs, kp_spec, config, float(scale), index_cap, lowered)
    with _LOCK:
        if key in _DONE_KEYS:
            return False
        need = sum(_nbytes(s) for s in specs) * 6  # q, k, v, dense output, mask, index lists
        try:
            free, _ = torch.cuda.mem_get_info(specs[0][3])
        except Exception:  # pragma: no cover - no driver
            return False
        if need > free // 4:
            log.info("fgcompile: site %s: not precompiling its kernels (%d MB of scratch, %d MB free)",
                     name, need >> 20, free >> 20)
            return False
        _DONE_KEYS.add(key)
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="fgcompile-precompile")
            _cancel_at_exit()
        _PENDING.append(_POOL.submit(_run, key, name, config, (*specs, kp_spec), float(scale), index_cap, lowered))
    return True


def _cancel_at_exit() -> None:
    """At interpreter exit, drop the compiles not started yet: the executor's own exit hook would
    run every queued one first (seconds each) before the process can end. Registered with
    ``threading._register_atexit`` (CPython's hook, the one ``concurrent.futures`` uses, which runs
    before ``atexit`` handlers and in reverse order of registration, so before the executor's);
    feature-detected: without it exit just waits for the queue, as before."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - other Python implementations
        return

    def cancel() -> None:
        pool = _POOL
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    try:
        register(cancel)
    except RuntimeError:  # pragma: no cover - already shutting down
        pass


def wait() -> None:
    """Join the background compiles still running (a no-op once they are done); a schedule step
    joined here may have queued its kernels' compiles, which are joined too."""
    if not _PENDING:
        return
    t0, n = time.perf_counter(), 0
    while True:
        with _LOCK:
            pending = list(_PENDING)
            _PENDING.clear()
        if not pending:
            break
        n += len(pending)
        for f in pending:
            if not f.cancelled():
                f.result()
    waited = time.perf_counter() - t0
    with _LOCK:
        _STATS["run_wait_s"] += waited
    log.debug("fgcompile: waited %.2f s for %d background job(s)", waited, n)
