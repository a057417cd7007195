"""Expand ``F.multi_head_attention_forward`` into projections around one SDPA call.

``nn.MultiheadAttention`` (and ``nn.TransformerEncoderLayer`` / ``DecoderLayer``, which use it)
calls ``torch.nn.functional.multi_head_attention_forward``, which Dynamo records as ONE node: the
graph has no SDPA or softmax node for ``find_attention`` to match. This pass replaces each such
node, when its arguments are in the supported subset, by the same computation written out
(inputs are sequence-first, (L, N, E) query and (S, N, E_k) key / value, as the module passes them):

    wq, wk, wv = in_proj_weight.chunk(3)          (or q/k/v_proj_weight; biases likewise)
    q = linear(query, wq, bq).unflatten(-1, (H, E // H)).permute(1, 2, 0, 3)   (N, H, L, E // H)
    k, v likewise                                                              (N, H, S, E // H)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=~key_padding_mask[:, None, None, :])  (or + float mask)
    out = linear(o.permute(2, 0, 1, 3).flatten(-2), out_proj_weight, out_proj_bias)   (L, N, E)

which ``find_attention`` then takes as an SDPA site (the default scale, 1 / sqrt(E // H), is the
one the module applies). Exact up to float rounding of the projections.

Supported: batched inputs, no ``bias_k`` / ``bias_v`` / ``add_zero_attn`` / ``static_k`` /
``static_v``, no dropout while training, no ``attn_mask``, no ``is_causal``, a boolean or float
``key_padding_mask`` (N, S) or none (the module passes a boolean one on as a float -inf mask: the
expansion uses the boolean behind it, a key-padding mask the kernels serve), and the attention weights unused (``need_weights=False``, or
the weights output never read). Any other call stays as it is and is listed in the report's
rejected nodes with its reason, as are the modules' fused fast paths (eval mode without autograd:
``torch._transformer_encoder_layer_fwd``, ``torch._native_multi_head_attention``), whose attention
runs inside one PyTorch kernel.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .find_attention import _val
from .rewrite import _Builder, failed_rewrite

__all__ = ["expand_mha"]

_ARGS = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
    "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
    "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
    "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal",
)
_DEFAULTS = {
    "training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
    "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None, "v_proj_weight": None,
    "static_k": None, "static_v": None, "average_attn_weights": True, "is_causal": False,
}


#: the fused fast paths nn.TransformerEncoderLayer / nn.MultiheadAttention take in eval mode without
#: autograd (feature-detected): one node each, attention inside
_FUSED = {
    fn: name
    for fn, name in (
        (getattr(torch, "_transformer_encoder_layer_fwd", None), "nn.TransformerEncoderLayer"),
        (getattr(torch, "_native_multi_head_attention", None), "nn.MultiheadAttention"),
    )
    if fn is not None
}


def _why_not(a: dict, node: fx.Node) -> str | None:
    """Why this call cannot be expanded, or None."""
    q = _val(a["query"])
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        return "unbatched inputs (2-D query)"
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[name] is not None:
            return f"{name} is set"
    if a["add_zero_attn"] is not False:
        return "add_zero_attn=True"
    if a["training"] is not False and a["dropout_p"] != 0.0:
        return f"attention dropout while training (dropout_p={a['dropout_p']})"
    if a["attn_mask"] is not None or a["is_causal"] is not False:
        return "attn_mask / is_causal is set (only a key_padding_mask is expanded)"
    kp = _val(a["key_padding_mask"])
    if kp is not None and (not isinstance(kp, torch.Tensor) or kp.dim() != 2
                           or not (kp.dtype == torch.bool or kp.is_floating_point())):
        return "key_padding_mask is not a boolean or float (N, S) tensor"
    if not isinstance(a["num_heads"], int) or not isinstance(a["embed_dim_to_check"], int):
        return "num_heads / embed_dim are not constants of the graph"
    if a["embed_dim_to_check"] % a["num_heads"] != 0:
        return "embed_dim is not a multiple of num_heads"
    for u in node.users:
        if u.op != "call_function" or u.target is not operator.getitem or u.args[1] not in (0, 1):
            return f"its result is used as a whole by {u.name}"
        if u.args[1] == 1 and u.users:
            return "the attention weights are used (need_weights=True): the sparse kernels do not compute them"
    return None


def _bool_source(kp: Any) -> Any:
    """The bool padding mask behind ``kp``: ``kp`` itself if bool, or ``b`` when ``kp`` is
    ``zeros_like(b, dtype=float).masked_fill_(b, -inf)`` (how nn.MultiheadAttention turns a bool
    key_padding_mask into the float one it passes on); else None (a float additive mask)."""
    v = _val(kp)
    if v.dtype == torch.bool:
        return kp
    if (kp.op == "call_method" and kp.target in ("masked_fill_", "masked_fill") and len(kp.args) == 3
            and kp.args[2] == float("-inf") and isinstance(kp.args[0], fx.Node)):
        z, padded = kp.args[0], kp.args[1]
        if (z.op == "call_function" and z.target is torch.zeros_like and z.args and z.args[0] is padded
                and isinstance(padded, fx.Node) and _val(padded).dtype == torch.bool):
            return padded
    return None


def _projection(b: _Builder, x: fx.Node, w: Any, bias: Any, heads: int, head_dim: int) -> fx.Node:
    """(T, N, E_in) -> linear -> (N, H, T, head_dim)."""
    y = b.fn(F.linear, x, w, bias)
    return b.method("permute", b.method("unflatten", y, -1, (heads, head_dim)), 1, 2, 0, 3)


def _expand(gm: fx.GraphModule, node: fx.Node, a: dict) -> None:
    b = _Builder(gm, node, node)
    heads = a["num_heads"]
    head_dim = a["embed_dim_to_check"] // heads
    try:
        if a["use_separate_proj_weight"]:
            ws = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
        else:
            chunks = b.fn(torch.chunk, a["in_proj_weight"], 3)
            ws = [b.fn(operator.getitem, chunks, i) for i in range(3)]
        if a["in_proj_bias"] is None:
            bs = [None, None, None]
        else:
            bchunks = b.fn(torch.chunk, a["in_proj_bias"], 3)
            bs = [b.fn(operator.getitem, bchunks, i) for i in range(3)]
        q, k, v = (_projection(b, a[n], w, bias, heads, head_dim) for n, w, bias in zip(("query", "key", "value"), ws, bs))
        mask = None
        kp = a["key_padding_mask"]
        if kp is not None:
            padded = _bool_source(kp)
            if padded is not None:  # True marks a padded key; SDPA's bool mask marks kept keys
                kp = b.fn(torch.logical_not, padded)
            mask = b.method("unsqueeze", b.method("unsqueeze", kp, 1), 1)  # (N, 1, 1, S), bool or additive
        # the mask changes no shape, dtype or layout: the fake value is computed without it (a bool
        # mask's fake CPU path builds real scalar tensors)
        o = b.fn(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, value_fn=F.scaled_dot_product_attention)
        o = b.method("flatten", b.method("permute", o, 2, 0, 1, 3), -2)  # (L, N, E)
        out = b.fn(F.linear, o, a["out_proj_weight"], a["out_proj_bias"])
    except Exception:
        b.undo()
        raise
    b.replace_first_output(node, out)


def expand_mha(gm: fx.GraphModule, rejected: list) -> int:
    """Expand every supported ``F.multi_head_attention_forward`` node of ``gm`` in place (see the
    module docstring); append ``(node name, "mha", why)`` to ``rejected`` for the others. Returns
    the number expanded. A call whose expansion fails is left as it is, with the failure as its reason."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _FUSED:
            rejected.append((node.name, "mha", f"{_FUSED[node.target]}'s fused fast path runs its attention inside one "
                             "PyTorch kernel, which is not rewritten; torch.backends.mha.set_fastpath_enabled(False) "
                             "makes the module call multi_head_attention_forward, which is expanded"))
            continue
        if node.op != "call_function" or node.target is not F.multi_head_attention_forward:
            continue
        a = dict(_DEFAULTS)
        a.update({name: arg for name, arg in zip(_ARGS, node.args)})
        a.update(node.kwargs)
        why = _why_not(a, node)
        if why is None:
            failed = failed_rewrite(lambda: _expand(gm, node, a))
            if failed is None:
                done += 1
                continue
            why = f"could not be expanded ({failed})"
        rejected.append((node.name, "mha", f"nn.MultiheadAttention's fused call is not expanded: {why}"))
    return done
