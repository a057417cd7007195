"""Start Inductor's compile of the lowered sparse kernel when fgcompile's passes run, not when
Inductor's program loads.

Why (issue 6). Inductor compiles a user-defined Triton kernel (the sparse kernel, traced by
``wrap_triton``) only when its generated module is loaded, and waits for it there. In a cold
process its worker pool is not up yet by then (it takes seconds to start), so the compile even runs
on the calling thread: on the H200 ``PyCodeCache.load_by_key_path`` took 1.3 s longer for fgattn
than for Inductor alone in a ~6-7 s cold compile of a Wan layer (``benchmarks/NOTES.md``,
sessions 6-9), the largest part of the compile time fgattn adds.

How. What Inductor compiles is the source string its codegen writes for the kernel
(``PythonWrapperCodegen.define_user_defined_triton_kernel``, from the kernel, its launch
arguments as Inductor IR and its launch configs). ``predict_source`` calls that very method, on
stand-ins for the wrapper and the graph that answer the few questions it asks (buffer alignment,
static sizes, the device), with the arguments the lowering pass knows from the Dynamo graph's fake
tensors, presented as Inductor's Triton-kernel tracing presents them (the launch's
``num_warps``/``num_stages`` become one ``triton.Config``; kernels numbered in launch order).
``submit`` then starts the compile of that string the way Inductor's program will ask for it (see
there): in Inductor's worker pool if it answers, else in a forked child process that compiles into
Triton's on-disk cache, where Inductor's own compile of the same string finds the binaries.

A prediction that differs from what Inductor generates (another torch version's codegen, layouts
Inductor changed, a second compile in one process that numbers kernels differently) costs one
wasted background compile and nothing else: Inductor compiles its own string as before. The
kernel that runs is always the one Inductor's string defines. ``FGCOMPILE_EARLY_COMPILE=0`` turns
it off; it is skipped for symbolic sizes, autotuned launches (``mode="max-autotune"``) and under
the Triton interpreter. ``stats()`` says what was started and what Inductor took.

Private PyTorch APIs touched here, and only here (each feature-detected; a missing one turns
the feature off, logged at DEBUG):
- ``torch._inductor.codegen.wrapper.PythonWrapperCodegen.define_user_defined_triton_kernel``
  and ``_get_triton_info_kernel_cls``;
- ``torch._inductor.ir.Buffer`` / ``FixedLayout`` (stand-ins for the kernel's tensor arguments);
- ``torch._inductor.virtualized.V.set_graph_handler`` and ``torch._inductor.sizevars.SizeVarAllocator``;
- ``torch._inductor.async_compile.AsyncCompile`` (``triton``, ``use_process_pool``) and
  ``CompiledTritonKernels`` (whether Inductor took the future: it removes it once resolved);
- ``torch._inductor.codecache.PyCodeCache.load`` and the ``CachingAutotuner`` it defines
  (``configs``, ``_precompile_config``: Inductor's own compile of one config).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

import torch

from . import forked

__all__ = ["enabled", "predict_source", "submit", "Session", "stats", "early_compile_site"]

log = logging.getLogger("fgcompile")

#: per process: every source started (none is started twice), the sources handed to Inductor's
#: pool, the child processes compiling into Triton's cache (pid -> ended well; None: running),
#: and why predictions or compiles were skipped
_PREDICTED: list[str] = []
_POOL: list[str] = []
_CHILDREN: dict[int, Optional[bool]] = {}
_SKIPPED: list[str] = []
_LOCK = threading.Lock()


def enabled() -> bool:
    """False with ``FGCOMPILE_EARLY_COMPILE=0`` or under the Triton interpreter."""
    from ..kernels.triton_common import interpreting

    return os.environ.get("FGCOMPILE_EARLY_COMPILE", "1") != "0" and not interpreting()


class _Graph:
    """The few ``V.graph`` attributes ``define_user_defined_triton_kernel`` reads: static sizes,
    the device and the alignment of its tensor arguments (every stand-in buffer counts as a graph
    input, aligned unless listed in ``unaligned_buffers``, Inductor's own rule for inputs)."""

    def __init__(self, device: torch.device):
        from torch._inductor.sizevars import SizeVarAllocator

        self.sizevars = SizeVarAllocator()
        self.device = device
        self.unaligned_buffers: set = set()
        self.graph_inputs: dict = {}
        self.constants: dict = {}
        self.scheduler = None
        self.is_backward = False

    def get_current_device_or_throw(self) -> torch.device:
        return self.device

    def try_get_buffer(self, name: str) -> Any:
        return self.graph_inputs.get(name)

    def is_unspec_arg(self, name: str) -> bool:  # a 0-d CPU tensor passed as a scalar: none here
        return False


class _Wrapper:
    """Stand-in for Inductor's ``PythonWrapperCodegen``: keeps its user-kernel cache (so that a
    graph's kernels are numbered as Inductor numbers them, in launch order) and records each
    kernel's source instead of writing a module."""

    def __init__(self) -> None:
        from torch._inductor.codegen.wrapper import PythonWrapperCodegen

        self._cls = PythonWrapperCodegen
        self.user_defined_kernel_cache: dict = {}
        self.defined: dict[str, str] = {}

    def _get_triton_info_kernel_cls(self):
        return self._cls._get_triton_info_kernel_cls()

    def define_kernel(self, name: str, kernel: str, metadata: Optional[str] = None, *a: Any, **kw: Any) -> None:
        self.defined[name] = kernel

    def define(self, kernel, configs, kwargs, grids) -> Optional[tuple[str, str]]:
        """(name, source): the two arguments Inductor's program passes to
        ``async_compile.triton`` for one launch (the name is the kernel's own unless Inductor's
        ``triton.unique_user_kernel_names`` is set); None when Inductor's cache already held the
        launch (a repeated launch: no new source)."""
        fn = self._cls.define_user_defined_triton_kernel
        params = inspect.signature(fn).parameters
        extra = (None,) if "epilogue_fusion" in params else ()
        before = set(self.defined)
        name = fn(self, kernel, configs, kwargs, [], [], grids, *extra)[0]
        if name in before or name not in self.defined:
            return None
        return _triton_call_args(self.defined[name])


def _triton_call_args(wrapper_code: str) -> tuple[str, str]:
    """The (name, source) literals of ``async_compile.triton(name, '''<source>''', ...)``,
    evaluated as Python evaluates them in Inductor's module (escapes resolved)."""
    import ast

    call = ast.parse(wrapper_code.strip(), mode="eval").body
    if not (isinstance(call, ast.Call) and len(call.args) >= 2 and all(isinstance(a, ast.Constant) for a in call.args[:2])):
        raise _Unpredictable("unexpected shape of Inductor's kernel definition")
    name, src = call.args[0].value, call.args[1].value
    if f"def {name}(" not in src:  # the worker looks the name up in the source's module
        raise _Unpredictable(f"kernel {name!r} is not defined in its source")
    return name, src


class Session:
    """One graph's predictions: the stand-in wrapper (kernel numbering) and graph handler.
    ``launch(kernel, grid, *args, **kwargs)`` is the ``wrap`` hook of
    ``triton_sparse.launch_sparse_kernel``: it records each launch's source instead of running."""

    def __init__(self, device: torch.device):
        self.wrapper = _Wrapper()
        self.graph = _Graph(device)
        self.sources: list[tuple[str, str]] = []  # (kernel name, source) in launch order
        self._n = 0

    def _buffer(self, t: torch.Tensor) -> Any:
        from torch._inductor import ir

        name = f"fg_arg{self._n}"
        self._n += 1
        layout = ir.FixedLayout(t.device, t.dtype, list(t.shape), list(t.stride()))
        buf = ir.Buffer(name=name, layout=layout)
        self.graph.graph_inputs[name] = buf
        if (t.storage_offset() * t.element_size()) % 16:
            self.graph.unaligned_buffers.add(name)
        return buf

    def _arg(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return self._buffer(x)
        if isinstance(x, bool) or x is None or isinstance(x, (int, float)):
            return x
        raise _Unpredictable(f"argument of type {type(x).__name__}")

    def wrap(self, kernel: Any) -> Callable:
        """``wrap_triton``'s shape: ``wrap(kernel)[grid](*args, **kwargs)``."""
        session = self

        class _Launch:
            def __getitem__(self, grid):
                return lambda *a, **kw: session.record(kernel, grid, a, kw)

        return _Launch()

    def record(self, kernel: Any, grid: Any, args: tuple, kwargs: dict) -> None:
        """One launch as Inductor's Triton-kernel tracing presents it to codegen: a plain
        ``@triton.jit`` function launched with ``num_warps``/``num_stages`` becomes one config."""
        import triton
        from triton.runtime.autotuner import Autotuner

        if isinstance(kernel, Autotuner):  # its pruned configs are Inductor's, not known here
            raise _Unpredictable("autotuned launch")
        special = {n: kwargs.pop(n) for n in ("num_warps", "num_stages") if n in kwargs}
        configs = [triton.Config({}, **special)] if special else []
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        ir_kwargs = {k: self._arg(v) for k, v in named.items()}
        grid = list(grid)
        if not all(isinstance(g, int) for g in grid):
            raise _Unpredictable("symbolic grid")
        from torch._inductor.virtualized import V

        with V.set_graph_handler(self.graph):
            got = self.wrapper.define(kernel, configs, ir_kwargs, [grid])
        if got is not None:
            self.sources.append(got)


class _Unpredictable(Exception):
    pass


def predict_source(session: Session, launch: Callable[..., Any], patches: Optional[dict] = None) -> list[tuple[str, str]]:
    """Run ``launch(wrap)`` (a kernel launch taking a ``wrap_triton``-like hook) against
    ``session`` under the Inductor config ``patches`` the compile will use, and return the new
    (kernel name, source) pairs it defined. Raises on what cannot be predicted."""
    from torch._inductor import config as inductor_config

    start = len(session.sources)
    with inductor_config.patch(patches or {}):
        launch(session.wrap)
    return session.sources[start:]


def submit(sources: list[tuple[str, str]], device_str: str = "cuda") -> bool:
    """Start compiling each predicted (name, source) where Inductor's program will look for it.

    - Inductor's worker pool answers: ``AsyncCompile.triton(name, source)`` now; it compiles in a
      worker and caches the future under the source, and Inductor's program later gets it.
    - It does not answer yet (a cold process: the pool takes several seconds to start, and until
      then Inductor compiles in its own process when its program loads): a forked child process
      loads the source as Inductor will (``PyCodeCache.load``: the same file, hence the same
      Triton cache key) and compiles each of its configs into Triton's on-disk cache, where
      Inductor's own compile of the string then finds the binaries. A child process, not a
      thread: Triton's compiler holds the GIL for most of a compile (measured on the H200: a
      helper thread took the main thread's time one for one). The child touches no CUDA state
      and leaves with ``os._exit``; a child that fails or hangs (killed after 300 s) only leaves
      Inductor to compile as before.
    A source started before in this process (another graph, a recompile) is not started again:
    its binary is in Triton's cache, where Inductor's own compile of it finds it.
    Returns whether anything was started."""
    with _LOCK:
        sources = [(n, src) for n, src in sources if src not in _PREDICTED]
        _PREDICTED.extend(src for _, src in sources)
    if not sources:
        return False
    from torch._inductor.async_compile import AsyncCompile

    if AsyncCompile.use_process_pool():
        for name, src in sources:
            AsyncCompile().triton(name, src, device_str=device_str)
            with _LOCK:
                _POOL.append(src)
        log.debug("fgcompile: early compile: %s submitted to Inductor's worker pool", [n for n, _ in sources])
        return True
    if not forked.available():
        _skip("no os.fork on this platform and Inductor's worker pool is not up")
        return False
    from torch._inductor.codecache import PyCodeCache

    def compile_sources() -> None:  # in the child
        for name, src in sources:
            kernel = getattr(PyCodeCache.load(src), name)
            for cfg in list(kernel.configs or ()):
                kernel._precompile_config(cfg)  # Inductor's own compile call, into Triton's cache

    t = time.perf_counter()
    pid = forked.start(compile_sources)
    with _LOCK:
        _CHILDREN[pid] = None

    def reap() -> None:  # collect the child (no zombie) and say how it went
        ok = forked.wait(pid)
        with _LOCK:
            _CHILDREN[pid] = ok
        log.debug("fgcompile: early compile: %s compiled in a child process in %.2f s (%s)",
                  [n for n, _ in sources], time.perf_counter() - t, "ok" if ok else "failed")

    threading.Thread(target=reap, name="fgcompile-early-compile", daemon=True).start()
    return True


def _skip(reason: str) -> None:
    log.debug("fgcompile: early compile skipped: %s", reason)
    with _LOCK:
        _SKIPPED.append(reason)


def stats() -> dict:
    """What the early compile did in this process: ``pool`` (sources handed to Inductor's worker
    pool) and ``pool_taken`` (how many of them Inductor's program asked for: it removes a cached
    future once resolved); ``children`` (compiles in a child process) and ``children_ok`` (how
    many finished without error); ``skipped`` (why predictions or compiles were skipped).
    Whether Inductor found a child's binaries in Triton's cache shows in its compile time and in
    the cache directory (one entry per kernel, not two; tests/test_early_compile_gpu.py)."""
    try:
        from torch._inductor.async_compile import CompiledTritonKernels
    except ImportError:  # pragma: no cover
        return {"pool": 0, "pool_taken": 0, "children": 0, "children_ok": 0, "skipped": ["no torch._inductor.async_compile"]}
    with _LOCK:
        pool, children, skipped = list(_POOL), list(_CHILDREN.values()), list(_SKIPPED)
    return {
        "pool": len(pool),
        "pool_taken": sum(CompiledTritonKernels.get(src) is None for src in pool),
        "children": len(children),
        "children_ok": sum(ok is True for ok in children),
        "skipped": skipped,
    }


def early_compile_site(
    session: Optional[Session], launch: Callable[..., Any], patches: Optional[dict], device: torch.device
) -> Optional[Session]:
    """The lowering pass's entry: predict ``launch``'s kernels in ``session`` (created on first
    use, per graph, for the graph's CUDA ``device``) and start the compiles of the new ones.
    Returns the session to pass back for the graph's next site; None where the feature is off or
    failed (the reason is in ``stats()["skipped"]`` and the DEBUG log)."""
    if not enabled():
        return None
    try:
        if session is None:
            session = Session(torch.device(device.type, device.index if device.index is not None else torch.cuda.current_device()))
        submit(predict_source(session, launch, patches))
        return session
    except _Unpredictable as e:
        _skip(str(e))
    except Exception as e:  # a private API changed shape: the compile proceeds as before
        _skip(f"prediction failed: {type(e).__name__}: {e}")
    return None
