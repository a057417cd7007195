"""Rewrite flash-attn's forward ops into one SDPA call each, which ``find_attention`` then serves.

flash-attn (2.6 and later, with torch 2.4 and later) registers its CUDA kernels as
``torch.library`` custom ops, which Dynamo records as one node each: an opaque call the pass
cannot see into (the original Wan2.1, HunyuanVideo and Mochi code call them through
``flash_attn_func`` / ``flash_attn_varlen_func``). This pass replaces such a node, when its
arguments are in the supported subset, by the same attention written with SDPA:

    _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, ...)      q (B, S_q, H, D),
                                                                             k, v (B, S_k, H_kv, D)
      -> F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        scale=softmax_scale, enable_gqa=H != H_kv)
             .transpose(1, 2).contiguous()                                   (B, S_q, H, D)

    _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)     one sequence:
                                                                             cu_seqlens of 2 entries,
                                                                             q (T_q, H, D), k, v (T_k, H_kv, D)
      -> the same on q[None], k[None], v[None], with the keys outside
         [cu_seqlens_k[0], cu_seqlens_k[1]) masked out (a key-padding mask built on the device:
         no host sync), output [0]                                            (T_q, H, D)

    _flash_attn_varlen_forward(...)                                          two sequences per
                                                                             batch item: cu_seqlens
                                                                             of 2B + 1 entries
      -> q, k, v viewed (B, L, H, D); per item b, with its bounds made item-local,
         o0 = that SDPA with the keys of its first sequence [cu_k[2b], cu_k[2b+1]) kept,
         o1 = the same with the keys of its second, [cu_k[2b+1], cu_k[2b+2]),
         out = where(query row >= cu_q[2b+1], o1, o0), viewed back            (T_q, H, D)
         HunyuanVideo's layout (``get_cu_seqlens``: per item, the video with the prompt's real
         tokens, then the prompt's padding, whose tokens attend only to each other). o1's SDPA
         carries ``RUN_DENSE``: its site runs dense at every call (on CUDA the kernel over its
         few real keys, ``SiteState._dense``), while o0 is a key-padded site like any other.
         (Were the second sequences the long ones, o1 would cost up to one dense pass; exact
         either way.) Served only in this padded-item layout: ``max_seqlen_q`` and
         ``max_seqlen_k`` constants equal to each item's row count (T / B; sequences of other
         packings, e.g. one per item at B = 2, Wan2.1's, whose second sequence is a whole item,
         stay with flash-attn). At B = 1 any such cut is served. At B > 1 every item's sequences
         must lie in its own L rows: the pass proves it from the graph (``_item_aligned``: the
         cu_seqlens made by ``torch.zeros`` there, its even entries written with the constants
         i * L, HunyuanVideo's code traced with the model) or leaves the call opaque.

The op's first output (``out``, contiguous) is what the rewrite gives; flash-attn leaves a
varlen output's rows outside the sequences unwritten, and the rewrite computes attention there
too. Arguments are read by the names of the op's schema (flash-attn's releases differ in
trailing arguments and namespace: ``flashattn::`` now, ``flash_attn::`` in some); supported:
``dropout_p == 0``, ``causal=False`` (flash-attn aligns a causal mask of unequal lengths
bottom-right, SDPA top-left; causal attention stays dense anyway), no sliding window
(``window_size_* == -1``), ``softcap == 0``, no ``alibi_slopes``, ``return_softmax=False``, no
paged / left-padded / ``seqused_k`` keys, and only the first output read. Any other call stays
as it is: ``find_attention`` lists it as an opaque kernel, with the reason this pass gives.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .find_attention import FLASH_NOT_EXPANDED, RUN_DENSE, _storages, _val, _written
from .rewrite import _Builder, failed_rewrite

__all__ = ["expand_flash"]

_NAMESPACES = ("flashattn", "flash_attn")
_OPS = ("_flash_attn_forward", "_flash_attn_varlen_forward")
# argument -> the value a call must have (or not set: the schema default) to be rewritten
_MUST = {
    "dropout_p": 0.0, "causal": False, "window_size_left": -1, "window_size_right": -1, "softcap": 0.0,
    "alibi_slopes": None, "return_softmax": False, "block_table": None, "leftpad_k": None,
    "seqused_k": None, "seqused_q": None, "zero_tensors": False,
}


def _schema(target: Any) -> Any:
    """The schema of an op overload, or of an op packet's default overload (what Dynamo records
    for ``torch.ops.ns.op(...)``); None for anything else."""
    schema = getattr(target, "_schema", None)
    if schema is None and callable(getattr(target, "overloads", None)):
        try:
            schema = getattr(target.default, "_schema", None) if "default" in target.overloads() else None
        except Exception:
            schema = None
    return schema


def _flash_op(node: fx.Node) -> Optional[str]:
    """``"dense"`` / ``"varlen"`` for a call of flash-attn's forward op, else None."""
    if node.op != "call_function":
        return None
    name = getattr(_schema(node.target), "name", "")
    ns, _, op = name.partition("::")
    if ns in _NAMESPACES and op in _OPS:
        return "varlen" if "varlen" in op else "dense"
    return None


def _arguments(node: fx.Node) -> dict:
    """The call's arguments by the schema's names, defaults filled in."""
    schema = _schema(node.target)
    a = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            a[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            a[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            a[arg.name] = arg.default_value
        else:
            raise ValueError(f"argument {arg.name} is missing")
    return a


def _why_not(kind: str, a: dict, node: fx.Node) -> Optional[str]:
    """Why this call is not rewritten, or None."""
    for name in ("q", "k", "v"):
        if name not in a:
            return f"no argument {name!r} in its schema"
    unknown = set(a) - set(_MUST) - {"q", "k", "v", "softmax_scale", "cu_seqlens_q", "cu_seqlens_k",
                                     "max_seqlen_q", "max_seqlen_k"}
    if unknown:
        return f"arguments this pass does not know: {sorted(unknown)}"
    for name, want in _MUST.items():
        if name in a and a[name] != want:  # (a tensor argument is a Node: never equal to None)
            return f"{name}={a[name]!r} (rewritten only with {name}={want!r})"
    scale = a.get("softmax_scale")
    if scale is not None and not isinstance(scale, (int, float)):
        return "softmax_scale is not a constant of the graph"
    q, k, v = (_val(a[n]) for n in ("q", "k", "v"))
    dims = 3 if kind == "varlen" else 4
    if not all(isinstance(t, torch.Tensor) and t.dim() == dims for t in (q, k, v)):
        return f"q, k, v are not {dims}-D tensors"
    if q.shape[-2] != k.shape[-2] and (not isinstance(q.shape[-2], int) or not isinstance(k.shape[-2], int)
                                       or q.shape[-2] % k.shape[-2] != 0):
        return "the query heads are not a multiple of the key heads"
    if kind == "varlen":
        shapes = set()
        for name in ("cu_seqlens_q", "cu_seqlens_k"):
            cu = _val(a[name])
            if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or not isinstance(cu.shape[0], int) or cu.shape[0] < 2:
                return f"{name} is not a 1-D tensor of a static length >= 2"
            shapes.add(cu.shape[0])
        if len(shapes) != 1:
            return "cu_seqlens_q and cu_seqlens_k hold different numbers of sequences"
        n = shapes.pop()
        if n > 3 and n % 2 == 0:
            return f"{n - 1} sequences (rewritten: one, or two per batch item)"
        items = (n - 1) // 2
        for side, t in (("q", q), ("k", k)) if n > 2 else ():
            # the padded-item layout: each item one row of max_seqlen tokens, cut in two
            rows, longest = t.shape[0], a.get(f"max_seqlen_{side}")
            if not isinstance(rows, int) or not isinstance(longest, int) or longest * items != rows:
                return (f"two sequences per batch item, but max_seqlen_{side} {longest} is not the item's "
                        f"{rows} / {items} rows (served: items padded to max_seqlen, each cut into its "
                        f"tokens and its padding, as HunyuanVideo calls it)")
            # at batch > 1, sequences 2i and 2i + 1 must lie in item i's rows: proven in the graph
            why = _item_aligned(a[f"cu_seqlens_{side}"], node, items, longest) if items > 1 else None
            if why is not None:
                return f"{items} batch items of two sequences: {why}"
    for u in node.users:
        if u.op != "call_function" or u.target is not operator.getitem:
            return f"its result is used as a whole by {u.name}"
        if u.args[1] != 0 and u.users:
            return "an output other than the attention's (softmax_lse, ...) is read"
    return None


def _item_aligned(cu: Any, flash: fx.Node, items: int, length: int) -> Optional[str]:
    """None when the graph proves that ``cu`` (a cu_seqlens of 2 * items + 1 entries) holds
    ``i * length`` at entry 2i for every i, when ``flash`` reads it: made by ``torch.zeros`` in
    this graph with an integer dtype, and every write into its memory before ``flash`` (a
    higher-order op or a function kept whole that gets it counts as one: ``_written``) a
    ``cu[j] = x`` with a constant j, the even ones with the constant (j // 2) * length
    (HunyuanVideo's ``get_cu_seqlens``, traced with the model: ``cu_seqlens[2 * i + 2] = (i + 1)
    * max_len``). Else why not (a cu_seqlens made outside the graph: a block compiled on its own)."""
    if not isinstance(cu, fx.Node) or cu.op != "call_function" or cu.target is not torch.zeros:
        return "cu_seqlens is not made by torch.zeros in this graph (compile the whole model to serve it)"
    if getattr(_val(cu), "dtype", None) not in (torch.int32, torch.int64):
        return f"cu_seqlens has dtype {getattr(_val(cu), 'dtype', None)} (flash-attn takes int32)"
    mem = _storages([cu])
    if mem is None:
        return "cu_seqlens has no tensor value to follow"
    n = 2 * items + 1
    even = {i: 0 for i in range(0, n, 2)}
    for node in cu.graph.nodes:
        if node is flash:
            break
        written = _written(node)
        if written is None:
            continue
        into = _storages(written)
        if into is not None and not (into & mem):
            continue
        j = node.args[1] if node.target is operator.setitem and len(node.args) == 3 else None
        if node.args[0] is not cu or not isinstance(j, int) or not -n <= j < n:
            return f"cu_seqlens is written by {node.name} in a way the pass does not follow"
        j %= n
        if j % 2 == 0:
            even[j] = node.args[2]
    for j, value in even.items():
        if not isinstance(value, int) or isinstance(value, bool) or value != (j // 2) * length:
            return (f"cu_seqlens[{j}] is not the constant {(j // 2) * length} (the start of batch item {j // 2}) "
                    f"in this graph")
    return None


def _expand(gm: fx.GraphModule, node: fx.Node, kind: str, a: dict) -> None:
    b = _Builder(gm, node, node)
    if b.fake_mode is None:  # (the op's value is a tuple: its fake mode is q's)
        b.fake_mode = getattr(_val(a["q"]), "fake_mode", None)
    try:
        q, k, v = a["q"], a["k"], a["v"]
        masks, second = [None], None
        if kind == "varlen":
            n_cu = _val(a["cu_seqlens_k"]).shape[0]
            items = max(1, (n_cu - 1) // 2)  # batch items (two sequences each), or one sequence
            q, k, v = (b.method("reshape", t, items, -1, *_val(t).shape[1:]) for t in (q, k, v))  # (B, L, H, D)

            def bounds(cu_name: str, t: fx.Node) -> tuple:
                """Item-local positions (B, L) of t's rows and the item-local bounds (B, 1) of its
                sequences: entries 0, 1 (, 2) of each item's (2 * i, 2 * i + 1, 2 * i + 2)."""
                cu, length = a[cu_name], _val(t).shape[1]
                start = b.method("view", b.fn(torch.arange, items, device=_val(cu).device), -1, 1)
                start = b.fn(operator.mul, start, length)
                pos = b.method("view", b.fn(torch.arange, length, device=_val(t).device), 1, -1)
                picks = ([slice(0, 1), slice(1, 2)] if n_cu == 2 else
                         [slice(0, n_cu - 1, 2), slice(1, n_cu, 2), slice(2, n_cu, 2)])
                cuts = [b.fn(operator.sub, b.method("view", b.fn(operator.getitem, cu, pick), -1, 1), start)
                        for pick in picks]
                return pos, cuts

            keys, cut_k = bounds("cu_seqlens_k", k)
            masks = [  # (B, 1, 1, L_k) key-padding masks: the keys of each item's sequence i
                b.method("view", b.fn(torch.logical_and, b.fn(operator.ge, keys, lo), b.fn(operator.lt, keys, hi)),
                         items, 1, 1, -1)
                for lo, hi in zip(cut_k, cut_k[1:])
            ]
            if len(masks) == 2:  # rows of each item's second sequence
                rows, cut_q = bounds("cu_seqlens_q", q)
                second = b.method("view", b.fn(operator.ge, rows, cut_q[1]), items, 1, -1, 1)
        qt, kt, vt = (b.method("transpose", t, 1, 2) for t in (q, k, v))
        kwargs: dict[str, Any] = {}
        if a.get("softmax_scale") is not None:
            kwargs["scale"] = float(a["softmax_scale"])
        if _val(a["q"]).shape[-2] != _val(a["k"]).shape[-2]:
            kwargs["enable_gqa"] = True
        outs = [
            b.fn(F.scaled_dot_product_attention, qt, kt, vt, value_fn=lambda q_, k_, v_: torch.empty_like(q_),
                 **kwargs, **({"attn_mask": m} if m is not None else {}))
            for m in masks
        ]
        o = outs[0]
        if second is not None:  # rows of the second sequence take its attention
            outs[1].meta[RUN_DENSE] = ("the second sequence of a two-sequence flash-attn varlen call (HunyuanVideo: "
                                       "the prompt's padding, attending only to itself)")
            o = b.fn(torch.where, second, outs[1], outs[0])
        out = b.method("contiguous", b.method("transpose", o, 1, 2))
        if kind == "varlen":
            out = b.method("view", out, -1, *_val(a["q"]).shape[1:])  # (T_q, H, D)
    except Exception:
        b.undo()
        raise
    b.replace_first_output(node, out)


def expand_flash(gm: fx.GraphModule) -> int:
    """Rewrite every supported flash-attn forward call of ``gm`` in place (see the module
    docstring); a call that is not rewritten keeps its reason in ``node.meta[FLASH_NOT_EXPANDED]``.
    Returns the number rewritten. A call whose rewrite fails is left as it is."""
    done = 0
    for node in list(gm.graph.nodes):
        kind = _flash_op(node)
        if kind is None:
            continue
        try:
            a = _arguments(node)
            why = _why_not(kind, a, node)
        except Exception as e:  # a schema this pass does not read
            why = f"its arguments could not be read ({type(e).__name__}: {e})"
        if why is None:
            failed = failed_rewrite(lambda: _expand(gm, node, kind, a))
            if failed is None:
                done += 1
                continue
            why = f"could not be rewritten ({failed})"
        node.meta[FLASH_NOT_EXPANDED] = why
    return done
