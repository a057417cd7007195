"""PyTorch / Inductor APIs the CUDA lowering needs, feature-detected (torch 2.11 to 2.13).

Touched here:
- ``torch.library.triton_op`` and ``torch.library.wrap_triton`` (public since 2.6): the sparse
  kernel as an op whose Triton launch Inductor traces into its program;
- ``torch.Tag.cudagraph_unsafe`` (public, 2.8+; read in ``fgcompile.lowering.ops``) and the private
  ``torch._inductor.config.graph_partition`` / ``custom_should_partition_ops``: the stateful
  ``site_plan`` op must stay out of CUDA graphs in ``mode="reduce-overhead"``;
- the private ``torch._inductor.config._use_fp64_for_unbacked_floats``: Inductor types a Python
  float argument of a user-defined Triton kernel as fp64 on GPUs with fp64 support (torch 2.11 and
  2.13); the sparse kernel's ``qk_scale`` then promotes the softmax to fp64 and ``tl.dot``'s fp32
  accumulator assertion fails at compile time. Patched to False (fp32, what Triton's own JIT
  uses) in compiles holding the lowered op; without the flag, floats are already fp32;
- the private ``torch._inductor.config.max_autotune``: read by the backend before its passes
  (besides the compile's ``mode``): the sparse kernel autotunes its configs only in
  ``mode="max-autotune"`` compiles (Inductor's own rule for its templates), else it launches one
  heuristic config (``fgcompile.kernels.triton_sparse.autotune_wanted``);
- the private ``torch._inductor.config.static_launch_user_defined_triton_kernels``: Inductor
  launches its own kernels through its static CUDA launcher, user-defined ones (the sparse kernel)
  through Triton's launcher unless this is set, and Triton builds that launcher with a C compile
  on the calling thread when the program loads (~0.25 s of a cold compile on the H200). Set where
  the static launcher is on; a kernel it cannot take falls back to Triton's launcher;
- ``torch._inductor.utils.run_and_get_code`` (private; tests and benchmarks only): the generated
  program's source.

A missing API raises ``RuntimeError`` naming it and the torch version.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = [
    "triton_op_api", "partition_config_patches", "kernel_config_patches", "max_autotune_enabled",
    "run_and_get_code", "PLAN_OP_NAME",
]

PLAN_OP_NAME = "fgcompile::site_plan"


def _missing(what: str) -> RuntimeError:
    return RuntimeError(
        f"fgcompile's CUDA lowering needs the PyTorch API {what}, which torch {torch.__version__} lacks; "
        "fgcompile supports torch 2.11 to 2.13"
    )


def triton_op_api() -> tuple[Callable, Callable]:
    """``(torch.library.triton_op, torch.library.wrap_triton)``."""
    triton_op = getattr(torch.library, "triton_op", None)
    wrap_triton = getattr(torch.library, "wrap_triton", None)
    if triton_op is None:
        raise _missing("torch.library.triton_op")
    if wrap_triton is None:
        raise _missing("torch.library.wrap_triton")
    return triton_op, wrap_triton


def partition_config_patches(cudagraphs: bool) -> dict[str, Any]:
    """Inductor config patches that keep ``fgcompile::site_plan`` out of CUDA graphs: graph
    partitioning on (the default from torch 2.9 on; set explicitly for older defaults), and, where
    ``torch.Tag.cudagraph_unsafe`` is missing, the op named in ``custom_should_partition_ops``.
    ``cudagraphs``: whether this compile uses CUDA graphs (mode="reduce-overhead"); without them
    nothing is needed and nothing is required."""
    try:
        from torch._inductor import config as inductor_config
    except ImportError as e:  # pragma: no cover
        if cudagraphs:
            raise _missing("torch._inductor.config") from e
        return {}
    patches: dict[str, Any] = {}
    if not cudagraphs:
        return patches
    if not hasattr(inductor_config, "graph_partition"):
        raise _missing("torch._inductor.config.graph_partition (CUDA-graph partitioning around fgcompile::site_plan)")
    patches["graph_partition"] = True
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        if not hasattr(inductor_config, "custom_should_partition_ops"):
            raise _missing("torch.Tag.cudagraph_unsafe or torch._inductor.config.custom_should_partition_ops")
        patches["custom_should_partition_ops"] = list(inductor_config.custom_should_partition_ops) + [PLAN_OP_NAME]
    return patches


def kernel_config_patches() -> dict[str, Any]:
    """Inductor config patches any compile holding ``fgcompile::sparse_attention`` needs (see the
    module docstring): float kernel arguments as fp32, and the static launcher for the kernel
    where Inductor uses it for its own."""
    try:
        from torch._inductor import config as inductor_config
    except ImportError:  # pragma: no cover
        return {}
    patches: dict[str, Any] = {}
    if hasattr(inductor_config, "_use_fp64_for_unbacked_floats"):
        patches["_use_fp64_for_unbacked_floats"] = False
    if getattr(inductor_config, "use_static_cuda_launcher", False) and hasattr(
        inductor_config, "static_launch_user_defined_triton_kernels"
    ):
        patches["static_launch_user_defined_triton_kernels"] = True
    return patches


def max_autotune_enabled() -> bool:
    """Whether the Inductor compile in progress autotunes (``mode="max-autotune"`` or
    ``options={"max_autotune": True}``); False where this torch lacks the setting."""
    try:
        from torch._inductor import config as inductor_config
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(inductor_config, "max_autotune", False))


def run_and_get_code(fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    """``torch._inductor.utils.run_and_get_code``: (fn's result, the output code of every graph
    Inductor compiled while running it)."""
    try:
        from torch._inductor.utils import run_and_get_code as _run_and_get_code
    except ImportError as e:  # pragma: no cover
        raise _missing("torch._inductor.utils.run_and_get_code") from e
    return _run_and_get_code(fn, *args, **kwargs)


def count_kernel_configs(code: str, kernel: str = "_fg_sparse_fwd") -> int:
    """How many autotune configs Inductor's generated ``code`` lists for the user-defined Triton
    ``kernel`` (the ``user_autotune(configs=[...])`` literal before its source, parsed with ast; 1
    where there is none or it is empty: one launch config). Used by the lowering tests and benchmark to check when Inductor
    autotunes the inlined kernel."""
    import ast

    i = code.index(f"def {kernel}(")
    start = code.rfind("user_autotune(", 0, i)
    if start < 0:  # launched without Inductor's autotuning decorator
        return 1
    j = code.index("configs=", start) + len("configs=")
    depth = 0
    for end in range(j, i):
        depth += {"[": 1, "]": -1}.get(code[end], 0)
        if depth == 0:
            break
    return max(1, len(ast.literal_eval(code[j : end + 1])))
