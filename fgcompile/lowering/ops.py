"""fgcompile's custom operators.

``fgcompile::site_attention(q, k, v, key_padding, scale, site, owner=None) -> out``
    One attention site of a compiled model. q: (B, H, S_q, D); k, v: (B, H_kv, S_kv, D) with
    H % H_kv == 0 (GQA); key_padding: bool (B, S_kv), True = a real key, or None; scale: the softmax
    scale; site: the handle of the site's template (name, config) in ``fgcompile.runtime``; owner:
    a parameter of the compiled model (the graph's first parameter input), whose identity selects
    the model's state at run time: Dynamo reuses one compiled graph for every instance of a
    module class, so the state cannot be a constant of the graph. The site's state runs the
    schedule (dense warm-up, profiled calls, predictor) and the sparse kernel. Returns a
    contiguous (B, H, S_q, D_v) tensor of q's dtype.

The op is opaque to Inductor (``torch.library.custom_op`` with a fake implementation): on the CPU
Inductor cannot compile Triton, and the op is stateful (the schedule advances every call).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["site_attention"]


@torch.library.custom_op("fgcompile::site_attention", mutates_args=())
def site_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: Optional[torch.Tensor],
    scale: float,
    site: int,
    owner: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    from .. import runtime

    return runtime.run_site(site, q, k, v, key_padding, scale, owner)


@site_attention.register_fake
def _site_attention_fake(q, k, v, key_padding, scale, site, owner=None):
    # The real op returns a contiguous (B, H, S_q, D_v) tensor.
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
