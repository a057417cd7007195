"""Start Inductor's compile of the lowered sparse kernel when fgcompile's passes run, not when
Inductor's program loads.

Why (issue 6). Inductor compiles its own Triton kernels in its worker pool while it generates
code, but a user-defined kernel (the sparse kernel, traced by ``wrap_triton``) only when the
generated module is loaded, and then waits for it: on the H200 that wait was 1.2-1.6 s of a ~6 s
cold compile of a Wan layer (``benchmarks/NOTES.md``, sessions 6-8), the largest part of the
compile time fgattn adds to Inductor's.

How. Inductor keys its in-process cache of compile futures (``CompiledTritonKernels``) on the
exact source string it hands to ``async_compile.triton``. That string is what
``PythonWrapperCodegen.define_user_defined_triton_kernel`` writes for the kernel, its launch
arguments (Inductor IR buffers and constants) and its launch configs. ``predict_source`` calls that
very method (on a stand-in for the wrapper and for the graph that answer the few questions it
asks: buffer alignment, static sizes, the device) with the arguments the lowering pass knows from
the Dynamo graph's fake tensors, the way Inductor's Triton-kernel tracing will present them (the
launch's ``num_warps``/``num_stages`` become one ``triton.Config``). ``submit`` hands the string to
``AsyncCompile.triton`` as soon as the worker pool answers, from a helper thread, so that the
compile runs in a worker process while Dynamo, AOTAutograd and Inductor do their work; when
Inductor later asks for the same string it gets that future.

A prediction that differs from what Inductor generates (another torch version's codegen, layouts
Inductor changed, a second compile in one process that numbers kernels differently) costs one
wasted compile in a worker and nothing else: Inductor compiles its own string as before. Nothing
here can change what runs. ``FGCOMPILE_EARLY_COMPILE=0`` turns it off; it is skipped for
symbolic sizes, autotuned launches (``mode="max-autotune"``), under the Triton interpreter and
where the worker pool is off (``compile_threads`` 1).

Private PyTorch APIs touched here, and only here (each feature-detected; a missing one turns
the feature off, logged at DEBUG):
- ``torch._inductor.codegen.wrapper.PythonWrapperCodegen.define_user_defined_triton_kernel``
  and ``_get_triton_info_kernel_cls``;
- ``torch._inductor.ir.Buffer`` / ``FixedLayout`` (stand-ins for the kernel's tensor arguments);
- ``torch._inductor.virtualized.V.set_graph_handler`` and ``torch._inductor.sizevars.SizeVarAllocator``;
- ``torch._inductor.async_compile.AsyncCompile`` (``triton``, ``use_process_pool``) and
  ``CompiledTritonKernels`` (whether Inductor took the future: it removes it once resolved).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

import torch

__all__ = ["enabled", "predict_source", "submit", "Session", "stats"]

log = logging.getLogger("fgcompile")

#: per process: [predicted sources submitted, sources Inductor took from the cache]
_SUBMITTED: list[str] = []
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
        """(name, the source string Inductor hands to ``async_compile.triton``) of one launch;
        None when Inductor's cache already held it (a repeated launch: no new source)."""
        fn = self._cls.define_user_defined_triton_kernel
        params = inspect.signature(fn).parameters
        extra = (None,) if "epilogue_fusion" in params else ()
        before = set(self.defined)
        name = fn(self, kernel, configs, kwargs, [], [], grids, *extra)[0]
        if name in before or name not in self.defined:
            return None
        return name, _source_string(self.defined[name])


def _source_string(wrapper_code: str) -> str:
    """The string literal of ``async_compile.triton(name, '''<source>''', device_str=...)``,
    evaluated as Python evaluates it in Inductor's module (escapes resolved)."""
    import ast

    call = ast.parse(wrapper_code.strip(), mode="eval").body
    if not isinstance(call, ast.Call) or len(call.args) < 2 or not isinstance(call.args[1], ast.Constant):
        raise ValueError("unexpected kernel definition shape")
    return call.args[1].value


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
        grid = [g for g in grid]
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


def _pool_ready(timeout: float) -> bool:
    from torch._inductor.async_compile import AsyncCompile

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if AsyncCompile.use_process_pool():
            return True
        time.sleep(0.02)
    return False


def _pool_on() -> bool:
    try:
        from torch._inductor.async_compile import get_compile_threads
    except ImportError:  # pragma: no cover
        return False
    return get_compile_threads() > 1


def submit(sources: list[tuple[str, str]], device_str: str = "cuda") -> bool:
    """Hand each (name, source) to Inductor's ``AsyncCompile.triton`` once its worker pool answers
    (a helper thread waits for it, up to 60 s: before then ``AsyncCompile`` would compile on the
    calling thread). Returns False (nothing submitted) where the pool is off."""
    if not sources or not _pool_on():
        return False

    def go() -> None:
        try:
            from torch._inductor.async_compile import AsyncCompile

            if not _pool_ready(60.0):
                log.debug("fgcompile: early compile: Inductor's worker pool did not answer; not submitted")
                return
            t = time.perf_counter()
            for name, src in sources:
                AsyncCompile().triton(name, src, device_str=device_str)
                with _LOCK:
                    _SUBMITTED.append(src)
            log.debug("fgcompile: early compile: submitted %s (%.3f s)", [n for n, _ in sources], time.perf_counter() - t)
        except Exception as e:  # never fails a compile
            log.debug("fgcompile: early compile failed to submit: %s: %s", type(e).__name__, e)

    threading.Thread(target=go, name="fgcompile-early-compile", daemon=True).start()
    return True


def stats() -> dict:
    """{"submitted": n, "taken": m}: predicted sources handed to Inductor's pool in this
    process, and how many of them Inductor's generated program asked for (it removes a cached
    future once it has resolved it; one it never asked for stays)."""
    try:
        from torch._inductor.async_compile import CompiledTritonKernels
    except ImportError:  # pragma: no cover
        return {"submitted": 0, "taken": 0}
    with _LOCK:
        srcs = list(_SUBMITTED)
    return {"submitted": len(srcs), "taken": sum(CompiledTritonKernels.get(s) is None for s in srcs)}


def early_compile_site(session: Optional[Session], launch: Callable[..., Any], patches: Optional[dict]) -> Optional[Session]:
    """The lowering pass's entry: predict ``launch``'s kernels in ``session`` (created on first
    use, per graph) and submit the new ones. Returns the session to pass back for the graph's
    next site; None where the feature is off or failed (logged at DEBUG)."""
    if not enabled():
        return None
    try:
        if session is None:
            session = Session(torch.device("cuda", torch.cuda.current_device()))
        got = predict_source(session, launch, patches)
        submit(got)
        return session
    except _Unpredictable as e:
        log.debug("fgcompile: early compile skipped: %s", e)
    except Exception as e:  # a private API changed shape: the compile proceeds as before
        log.debug("fgcompile: early compile unavailable: %s: %s", type(e).__name__, e)
    return None
