"""fgcompile: fine-grained sparse attention for video diffusion transformers, as a
torch.compile backend.

    model = torch.compile(model, backend="fgattn")                       # defaults
    model = torch.compile(model, backend=fgcompile.backend(alpha=0.6))   # configured

Public API (imported lazily, so ``import fgcompile`` stays cheap):

- ``FGAttnConfig``, ``backend``: configuration and the backend object;
- ``explain(model, *args, **kwargs) -> Report``: the attention sites and decisions, and the
  rewritten graph, without running the sparse kernels;
- ``stats``, ``reset``, ``configure``, ``save_state``, ``load_state``: per-site state of a
  compiled model (``configure`` changes run-time settings such as ``density`` without recompiling);
- ``sparse_attention``, ``pack_slices``, ``profile_attention``: the kernels' public entry points;
- ``profile_slices``, ``pooled_slices``: the two sparsity predictors as pure functions;
- ``query_order``: an order of the queries that groups alike ones into query blocks.

Implements FG-Attn (arXiv 2509.16518): attention that skips M x 1 slices of the attention map.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "FGAttnConfig": "fgcompile.config",
    "backend": "fgcompile.dynamo_backend",
    "FGAttnBackend": "fgcompile.dynamo_backend",
    "explain": "fgcompile.report",
    "Report": "fgcompile.report",
    "stats": "fgcompile.runtime",
    "reset": "fgcompile.runtime",
    "configure": "fgcompile.runtime",
    "save_state": "fgcompile.runtime",
    "load_state": "fgcompile.runtime",
    "SiteStats": "fgcompile.runtime",
    "sparse_attention": "fgcompile.attention",
    "pack_slices": "fgcompile.attention",
    "profile_attention": "fgcompile.attention",
    "PackedSlices": "fgcompile.attention",
    "profile_slices": "fgcompile.predictors",
    "pooled_slices": "fgcompile.predictors",
    "query_order": "fgcompile.reorder",
    "SiteInfo": "fgcompile.passes.find_attention",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'fgcompile' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
