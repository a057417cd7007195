"""Every use of PRIVATE PyTorch APIs by fgcompile outside the Inductor lowering sits here.

Touched here (all private, all feature-detected so torch 2.11 and 2.13 both work):
- ``torch._inductor.compile_fx.compile_fx``: hands the rewritten graph to Inductor.
- ``torch._inductor.async_compile.maybe_warm_pool``: starts Inductor's compile-worker pool as
  ``backend="inductor"`` does on entry (without it Inductor compiles its Triton kernels in the
  calling process until the pool is up).
- ``torch._inductor.list_mode_options``: the config patches behind ``mode=``.
- ``node.meta["grapharg"].source`` of Dynamo's placeholders: which parameter a graph input is.
- ``torch._dynamo.utils.counters`` (graph breaks) and ``torch._dynamo.config``'s recompile
  limits, for ``fgcompile.explain``.
- ``torch._subclasses.fake_tensor.FakeTensor``: whether a tensor is fake (tracing).
- ``_torchdynamo_orig_callable`` of what ``torch.compile(module.forward)`` returns: the module
  whose method was compiled (``stats`` / ``explain`` of a compiled method).
- ``torch._logging._internal.register_log`` / ``register_artifact`` / ``_init_logs``: the
  ``TORCH_LOGS="+fgcompile"`` log.
- ``torch._dynamo.utils.dynamo_timed``: fgcompile's compile phases as rows of Dynamo's
  compile-time table (``torch._dynamo.utils.compile_times()``).

A missing API raises ``RuntimeError`` naming it and the torch version; a missing logging API only
disables the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any, Callable, Optional

import torch

__all__ = [
    "compile_fx",
    "warm_compile_pool",
    "inductor_mode_options",
    "register_fgcompile_log",
    "placeholder_param_path",
    "graph_break_count",
    "raised_recompile_limits",
    "is_fake_tensor",
    "compiled_method_module",
    "timed",
]


def _missing(what: str) -> RuntimeError:
    return RuntimeError(
        f"fgcompile needs the private PyTorch API {what}, which torch {torch.__version__} lacks; "
        "fgcompile supports torch 2.11 to 2.13"
    )


def compile_fx(gm: torch.fx.GraphModule, example_inputs: list, config_patches: Optional[dict] = None) -> Callable:
    """Inductor's entry point (what backend="inductor" runs)."""
    try:
        from torch._inductor.compile_fx import compile_fx as _compile_fx
    except ImportError as e:  # pragma: no cover - depends on torch build
        raise _missing("torch._inductor.compile_fx.compile_fx") from e
    if config_patches:
        return _compile_fx(gm, example_inputs, config_patches=config_patches)
    return _compile_fx(gm, example_inputs)


def timed(phase: str) -> Any:
    """A context manager that times ``phase`` (e.g. ``"fgcompile.transform"``) as a row of
    Dynamo's compile-time table, beside Inductor's own phases (``TORCH_LOGS`` / ``compile_times``);
    a no-op where this torch lacks ``dynamo_timed``."""
    try:
        from torch._dynamo.utils import dynamo_timed
    except ImportError:  # pragma: no cover - depends on torch build
        return contextlib.nullcontext()
    return dynamo_timed(phase)


def warm_compile_pool() -> bool:
    """Start Inductor's compile-worker pool now, as ``backend="inductor"`` does when Dynamo calls
    it, so that it is up by the time Inductor compiles the graph's kernels: Inductor compiles in
    the workers only once the pool answers, and in the calling process (one kernel at a time,
    sharing the GIL) until then. The pool is a process-wide singleton: later calls are cheap.
    Returns False where this torch lacks the API (the compile then proceeds as before)."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:  # pragma: no cover - depends on torch build
        return False
    maybe_warm_pool()
    return True


def inductor_mode_options(mode: Optional[str]) -> dict[str, Any]:
    """Inductor config patches for a torch.compile ``mode`` ("default", "reduce-overhead",
    "max-autotune", "max-autotune-no-cudagraphs")."""
    if mode is None or mode == "default":
        return {}
    try:
        from torch._inductor import list_mode_options
    except ImportError as e:  # pragma: no cover
        raise _missing("torch._inductor.list_mode_options") from e
    return dict(list_mode_options(mode))


def placeholder_param_path(node: torch.fx.Node) -> Optional[str]:
    """The dotted path, relative to the compiled module, of the parameter a Dynamo placeholder
    stands for (``"L['self']._modules['attn1']._modules['to_q']._parameters['weight']"`` ->
    ``"attn1.to_q.weight"``), or None when Dynamo recorded no source."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name_of = getattr(source, "name", None)
    if name_of is None:
        return None
    try:
        path = name_of() if callable(name_of) else name_of
    except Exception:
        return None
    from ..passes.find_attention import site_name

    path = site_name(str(path))
    path = re.sub(r"(^|\.)_(parameters|buffers)\.", r"\1", path)
    return path or None


def graph_break_count() -> int:
    """Dynamo's running count of graph breaks in this process (0 if unknown)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return 0
    return int(sum(counters["graph_break"].values()))


def graph_break_reasons() -> dict:
    """{reason: count} of Dynamo's graph breaks and frames it could not trace (unsupported
    context managers, ``torch.compiler.disable``d calls, data-dependent ops) in this process so
    far (empty if unknown): the first line of each of Dynamo's messages and its explanation."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return {}
    out: dict = {}
    for group in ("graph_break", "unimplemented"):
        for key, n in counters[group].items():
            lines = [ln.strip() for ln in str(key).splitlines() if ln.strip()]
            if not lines:
                continue
            why = next((ln[len("Explanation:"):].strip() for ln in lines[1:] if ln.startswith("Explanation:")), "")
            text = f"{lines[0]}: {why}" if why else lines[0]
            out[text] = out.get(text, 0) + int(n)
    return out


class raised_recompile_limits:
    """Context manager: raise Dynamo's recompile limits (``fgcompile.explain`` captures with a new
    backend each call, i.e. a new cache entry of the model's code) and restore them on exit."""

    _NAMES = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit")

    def __enter__(self):
        import torch._dynamo.config as dc

        self._saved = {}
        for name in self._NAMES:
            if hasattr(dc, name):
                self._saved[name] = getattr(dc, name)
                setattr(dc, name, max(getattr(dc, name), 1024 if "accumulated" not in name else 65536))
        return self

    def __exit__(self, *exc):
        import torch._dynamo.config as dc

        for name, value in self._saved.items():
            setattr(dc, name, value)
        return False


def is_fake_tensor(t: torch.Tensor) -> bool:
    """Meta or fake tensors (tracing): no kernel can be launched on them."""
    if t.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, FakeTensor)


_LOG_REGISTERED = False


def register_fgcompile_log() -> logging.Logger:
    """Register the ``fgcompile`` log with torch._logging so that ``TORCH_LOGS="+fgcompile"``
    (DEBUG) or ``TORCH_LOGS="fgcompile"`` (INFO) shows what the passes found and decided, and
    ``torch._logging.set_logs(fgcompile=logging.DEBUG)`` works. Returns the logger."""
    global _LOG_REGISTERED
    logger = logging.getLogger("fgcompile")
    if _LOG_REGISTERED:
        return logger
    _LOG_REGISTERED = True
    try:
        from torch._logging import _internal
    except ImportError:  # pragma: no cover
        return logger
    try:
        _internal.register_log("fgcompile", "fgcompile")
    except Exception:  # already registered (a reload) or a changed signature
        return logger
    env = os.environ.get("TORCH_LOGS", "")
    if "fgcompile" in env and hasattr(_internal, "_init_logs"):
        try:
            _internal._init_logs()
        except Exception:  # pragma: no cover
            pass
    return logger


@contextlib.contextmanager
def submodules_uncompiled(module: Any):
    """Within the block, the submodules of ``module`` that ``Module.compile()`` compiled in place
    (regional compilation, diffusers' ``compile_repeated_blocks``) run their plain forward: their
    private ``_compiled_call_impl`` is set aside and restored after. Does nothing for a non-module
    or where this torch lacks that attribute."""
    held = []
    if isinstance(module, torch.nn.Module):
        for m in module.modules():
            impl = getattr(m, "_compiled_call_impl", None)
            if impl is not None:
                held.append((m, impl))
                m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in held:
            m._compiled_call_impl = impl


def compiled_method_module(fn: Any) -> Optional[torch.nn.Module]:
    """The module whose method ``fn`` compiles, where ``fn`` is what ``torch.compile(module.forward)``
    returned (Dynamo's wrapper keeps the bound method as ``_torchdynamo_orig_callable``, or as its
    ``__wrapped__``); None for anything else, or where this torch's wrapper does not say."""
    if isinstance(fn, torch.nn.Module):
        return None
    orig = getattr(fn, "_torchdynamo_orig_callable", None)
    for method in (orig, getattr(orig, "__wrapped__", None)):  # the method, or a wrapper of it
        owner = getattr(method, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            return owner
    return None
