"""Find the attention sites of a Dynamo graph and decide, per site, sparse or dense.

The pass runs on the graph Dynamo hands to a backend: torch-level ``call_function`` /
``call_method`` nodes whose fake values sit in ``node.meta["example_value"]`` and whose module
paths sit in ``node.meta["nn_module_stack"]``.

Two patterns are recognised:

``"sdpa"``
    ``F.scaled_dot_product_attention`` / ``torch._C._nn.scaled_dot_product_attention`` (and
    ``aten.scaled_dot_product_attention``), arguments positional or by keyword, 2-D to 4-D inputs
    (``(..., S, D)``), GQA (``enable_gqa=True`` or one shared key/value head).

``"matmul_softmax"``
    hand-written ``softmax(q @ k^T * scale [+ mask]) @ v``: the scores from ``operator.matmul``,
    ``torch.matmul``, ``Tensor.matmul``, ``torch.bmm``, ``torch.baddbmm`` or a two-operand
    ``torch.einsum``, ``k^T`` by ``transpose`` / ``permute`` / ``.mT`` or inside the einsum; the
    scale a constant multiplier or divisor of the scores or of q / k; at most one mask
    (``+ mask``, ``masked_fill(mask, -inf)``, ``torch.where(mask, scores, -inf)``); casts (to
    float32 and back) around the softmax over the last dim; inference-mode dropout; then
    ``probs @ v`` by matmul / bmm / einsum.

A hand-written candidate is only accepted when its region (every node between its inputs q, k, v,
mask and its output) is closed: no node of the region has a user outside it and the output
post-dominates the region (checked with networkx on the FX graph). Attention probabilities that
are returned, stored or fed to another op are therefore left alone, as are softmaxes over another
dim, linear attention (no softmax) and matmul-softmax-matmul chains whose operands do not have
the shapes of q, k and v.

Decision (``SiteInfo.decision``, with ``SiteInfo.reason``): ``"sparse"`` iff

- seq_len_q and seq_len_kv are both >= ``config.min_seq_len`` (short and cross attention stay
  dense);
- head dim in {64, 96, 128} and, for hand-written attention, the value head dim equals it (SDPA
  sites with another value head dim stay dense too);
- dtype float16 / bfloat16 / float32, q, k and v of one dtype;
- no mask, or a boolean key-padding mask (broadcastable to (B, 1, 1, S_kv): only the batch and key
  dims vary) with ``config.block_n == 1``;
- no dropout (dropout_p == 0, or dropout not in training mode), not causal;
- GQA only where num_kv_heads divides num_heads;
- the site name does not match ``config.dense_sites``.

With ``config.predictor == "dense"`` sparse-eligible sites are still rewritten (decision
``"sparse"``, the reason says that the runtime runs them dense): the rewritten graph is the one
the other predictors would run, so ``predictor="dense"`` is the way to test the rewrite.

Sizes under dynamic shapes are SymInts: ``SiteInfo`` stores ints where static and the str of the
sympy expression otherwise. A self-attention whose sequence length is symbolic is a site whatever
its example size, and so is a symbolic length beside a static length of at least
``min_seq_len`` (one graph serving a self-attention and a cross-attention of the same code): the
runtime runs their calls shorter than ``min_seq_len`` dense. Other symbolic sequence lengths are
compared against ``min_seq_len`` through their size hint (the example input's size), and the
reason says so; no guard is added.
"""

from __future__ import annotations

import inspect
import logging
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..config import TRITON_BLOCK_M, FGAttnConfig, strict_mode

__all__ = ["SiteInfo", "SiteMatch", "find_attention_sites", "site_name", "SERVED_HEAD_DIMS", "SERVED_DTYPES"]

log = logging.getLogger("fgcompile")

SERVED_HEAD_DIMS = (64, 96, 128)
SERVED_DTYPES = ("float16", "bfloat16", "float32")

Size = Union[int, str]


# ----------------------------------------------------------------------------- results
@dataclass
class SiteInfo:
    """What the pass found at one attention site (shown by reports and logs)."""

    name: str
    pattern: str  # "sdpa" | "matmul_softmax"
    batch: Size = 1
    num_heads: Size = 1
    num_kv_heads: Size = 1
    seq_len_q: Size = 0
    seq_len_kv: Size = 0
    head_dim: Size = 0
    dtype: str = ""
    device: str = ""
    is_causal: bool = False
    mask: str = "none"  # "none" | "key_padding" | "other"
    decision: str = "dense"  # "sparse" | "dense"
    reason: str = ""
    head_dim_v: Size = 0
    scale: Optional[float] = None  # the softmax scale the site uses (None: not a constant)
    # the site is in the compiled module's own forward, not in a submodule's: named "attention"
    # here, it takes the compiled module's path in the model (fgcompile.runtime.state_of)
    in_root: bool = False
    # where the user's code calls the site: the frames ("File ..., line N, in fn") of its output
    # node's stack trace, or None. Two graphs that call one module from different places (a
    # weight-tied block used twice with a graph break between the uses) give the same name with
    # different call sites; the run-time state tells them apart by it (ModelState.site).
    call_site: Optional[str] = field(default=None, repr=False, compare=False)
    # why every call of this sparse-decided site runs dense (fgcompile's op, on its dense path:
    # on CUDA with key padding the kernel over the real keys), or "" (the schedule decides)
    run_dense: str = ""


@dataclass
class SiteMatch:
    """One matched site: the nodes the rewrite needs and the site's ``info``.

    The site computes ``attention(q_std, k_std, v_std)`` in a "standard form": ``q`` is
    ``(*batch, S_q, D)`` (``nb`` leading batch dims, 0 to 2), ``k`` ``(*batch_kv, S_kv, D)``, ``v``
    ``(*batch_kv, S_kv, D_v)``. ``q`` / ``k`` / ``v`` are graph nodes and ``*_perm`` /
    ``k_transpose`` say how to reach the standard form from them (a permutation applied first, then
    a swap of the last two dims). ``layout`` says how the standard form becomes the op's 4-D
    (B, H, S, D): ``"bh"`` (nb == 2), ``"1n"`` ((N, S, D) -> (1, N, S, D)), ``"n1"`` ((N, S, D) ->
    (N, 1, S, D), used when a key-padding mask varies over N), ``"11"`` (2-D). ``out_perm`` (or
    None) permutes the standard-form output ``(*batch, S_q, D_v)`` to the site output's layout.
    ``mask`` is a bool node broadcastable to the scores ``(*batch, S_q, S_kv)`` (``q_mask``: a
    query-padding mask it was ANDed with, or None); ``mask_invert``
    says that True means "masked out" (masked_fill). ``region`` holds the nodes replaced by the op
    (erased after rewriting), ``output`` the node whose uses the op's result takes over."""

    info: SiteInfo
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    nb: int
    scale: float
    region: list = field(default_factory=list)
    q_perm: Optional[tuple] = None
    k_perm: Optional[tuple] = None
    v_perm: Optional[tuple] = None
    # size-1 dims inserted into k / v after their permutation: batch dims they broadcast over
    # (an MQA einsum "bhid,bjd->bhij" with a head-less k), positions in the standard form
    k_unsqueeze: tuple = ()
    v_unsqueeze: tuple = ()
    k_transpose: bool = False
    out_perm: Optional[tuple] = None
    layout: str = "bh"
    mask: Optional[fx.Node] = None
    mask_invert: bool = False
    # a query-padding mask the site's mask was ANDed with (``pad_k & pad_q``, as HunyuanVideo-1.5
    # builds it): bool, broadcastable to the scores and constant over the keys; the rewrite zeroes
    # the output rows of padded queries (eager SDPA gives 0 for a row that masks every key)
    q_mask: Optional[fx.Node] = None
    # ``c`` of a float additive mask whose values are provably 0 (keep) or ``c`` (very negative:
    # mask out; see _additive_mask_value): the rewrite reads the key mask as ``mask >
    # _bias_threshold(c, mask)``
    mask_bias: Optional[float] = None
    # what eager gives for a batch item whose mask drops every key, where that is not the op's 0
    # (the op gives 0 for a row with no kept key; so does eager SDPA with a boolean mask): "all"
    # where a finite very negative number is added to the scores (a bias, or a masked_fill_-ed
    # zero bias): every score shifts alike, softmax over all keys; "uniform" where a finite number
    # replaces the scores (masked_fill, where), or a bias so large that the scores round onto it
    # (_bias_empty_rows): equal weights, the mean of v
    empty_rows: Optional[str] = None


# ----------------------------------------------------------------------------- node helpers
_SDPA_TARGETS: set = {torch._C._nn.scaled_dot_product_attention}
try:
    _SDPA_TARGETS.add(F.scaled_dot_product_attention)
except Exception:  # pragma: no cover
    pass
try:
    _SDPA_TARGETS.add(torch.ops.aten.scaled_dot_product_attention.default)
    _SDPA_TARGETS.add(torch.ops.aten.scaled_dot_product_attention)
except Exception:  # pragma: no cover
    pass

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

_MATMUL_FNS = {operator.matmul, torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_BADDBMM_FNS = {torch.baddbmm, torch.Tensor.baddbmm}
_EINSUM_FNS = {torch.einsum, torch.functional.einsum}
_SOFTMAX_FNS = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}
_MUL_FNS = {operator.mul, operator.imul, torch.mul, torch.Tensor.mul}
_DIV_FNS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.Tensor.div}
_ADD_FNS = {operator.add, operator.iadd, torch.add, torch.Tensor.add}
#: Python's augmented assignments as Dynamo records them: on a tensor they write into it
_INPLACE_FNS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
}
# the same, called as methods (``m.__iand__(x)``: Dynamo records them as such)
_INPLACE_DUNDERS = frozenset(f"__{f.__name__}__" for f in _INPLACE_FNS)
_WHERE_FNS = {torch.where}
_MASKED_FILL_FNS = {torch.masked_fill, torch.Tensor.masked_fill}
_DROPOUT_FNS = {F.dropout, torch.dropout, torch.nn.functional.dropout}
_TRANSPOSE_FNS = {torch.transpose, torch.swapaxes, torch.swapdims, torch.Tensor.transpose}
_PERMUTE_FNS = {torch.permute, torch.Tensor.permute}
_CAST_METHODS = {"float", "half", "bfloat16", "double", "to", "type", "type_as", "contiguous"}
_LOWEST = -1e4  # a fill value at or below this masks a key out


def _masks_out(x: float) -> bool:
    """Whether a fill or bias value ``x`` (as the tensor holds it) masks a key out: at most -1e4,
    give or take bfloat16's rounding (-10000 is -9984 in bfloat16)."""
    return x <= _LOWEST * (1 - 2.0 ** -7)

# ops that move or repeat a tensor's elements without changing their values
_SHAPE_METHODS = frozenset({
    "view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "broadcast_to", "repeat",
    "repeat_interleave", "permute", "transpose", "contiguous", "clone", "flatten", "unflatten", "detach",
})
_SHAPE_FNS = {torch.reshape, torch.unsqueeze, torch.squeeze, torch.broadcast_to, torch.repeat_interleave,
              torch.permute, torch.transpose, torch.flatten, torch.clone, torch.detach, operator.getitem}
_FLOAT_CASTS = frozenset({"float", "half", "bfloat16", "double", "to", "type_as"})


def _nonzero_of(mask: Any, x: Any) -> bool:
    """Whether the bool ``mask`` is ``x != 0`` of the tensor ``x``: ``x.bool()``, ``x.to(torch.bool)``,
    ``x != 0`` / ``x.ne(0)`` (Hugging Face's ``inverted.masked_fill(inverted.to(torch.bool), min)``)."""
    if not isinstance(mask, fx.Node) or not mask.args or mask.args[0] is not x:
        return False
    rest = list(mask.args[1:]) + list(mask.kwargs.values())
    if _is_fn(mask, set(), ("bool",)):
        return not rest
    if _is_fn(mask, set(), ("to",)):
        return rest == [torch.bool]
    if _is_fn(mask, {torch.ne, operator.ne}, ("ne", "__ne__")):
        return len(rest) == 1 and _const_number(rest[0]) == 0.0
    return False


def _value_set(node: Any, depth: int = 16, seen: Optional[list] = None) -> Optional[frozenset]:
    """The values a tensor of the graph can hold, when the graph proves them a small finite set
    (see ``_value_set_of``); None where a finite value would not fit the tensor's dtype (an fp16
    -1e9 is -inf at run time: the arithmetic on it would differ)."""
    r = _value_set_of(node, depth, seen)
    t = _tensor(node)
    if r is not None and t is not None and t.dtype.is_floating_point:
        big = torch.finfo(t.dtype).max
        if any(math.isfinite(x) and abs(x) > big for x in r):
            return None
        # each value as the tensor holds it: (0.5 + 2**24) - 2**24 is 0 in float32
        r = frozenset(torch.tensor(sorted(r), dtype=torch.float64).to(t.dtype).double().tolist())
    return r


def _value_set_of(node: Any, depth: int, seen: Optional[list]) -> Optional[frozenset]:
    """The values a tensor of the graph can hold, when the graph proves them a small finite set
    (numbers; None when unknown): a bool tensor holds {0, 1}; a graph-made ``zeros`` / ``ones`` /
    ``full`` their fill; shape ops and casts keep their input's; arithmetic with a constant,
    ``where``, ``masked_fill`` and constant-padding ``F.pad`` combine sets. ``_value_set`` rounds
    each node's values to its dtype (arithmetic is done in float64, then rounded). Graph inputs other
    than bool tensors are unknown. ``seen`` collects the tensor nodes the proof reads (a write into
    one of them elsewhere in the graph voids it: ``_Finder.bias_value`` checks)."""
    c = _const_number(node)
    if c is not None:
        return frozenset({c})
    t = _tensor(node)
    if t is None or depth <= 0 or not isinstance(node, fx.Node):
        return None
    if seen is not None:
        seen.append(node)
    if t.dtype == torch.bool:
        return frozenset({0.0, 1.0})
    if not t.dtype.is_floating_point:  # integers wrap around: not followed
        return None
    if node.op not in ("call_function", "call_method"):
        return None
    args = node.args
    src = _tensor(args[0]) if args and isinstance(args[0], fx.Node) else None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op == "call_method" and name in _SHAPE_METHODS or node.op == "call_function" and node.target in _SHAPE_FNS:
        if src is None or src.dtype != t.dtype:  # x.view(dtype) reinterprets the bits
            return None
        return _value_set(args[0], depth - 1, seen)
    if node.op == "call_method" and name in _FLOAT_CASTS:
        return _value_set(args[0], depth - 1, seen) if args else None
    if _is_fn(node, {torch.zeros, torch.zeros_like}, ("new_zeros",)):
        return frozenset({0.0})
    if _is_fn(node, {torch.ones, torch.ones_like}, ("new_ones",)):
        return frozenset({1.0})
    if _is_fn(node, {torch.full, torch.full_like}, ("new_full",)) and len(args) >= 2:
        c = _const_number(args[1])
        return frozenset({c}) if c is not None else None
    if _is_fn(node, {torch.where}, ("where",)) and len(args) == 3 and not node.kwargs:
        a, b = _value_set(args[1], depth - 1, seen), _value_set(args[2], depth - 1, seen)
        return a | b if a is not None and b is not None else None
    if _is_fn(node, _MASKED_FILL_FNS, ("masked_fill",)) and len(args) == 3:
        a, fill = _value_set(args[0], depth - 1, seen), _const_number(args[2])
        if a is not None and _nonzero_of(args[1], args[0]):
            a = a & {0.0}  # x.masked_fill(x.bool(), c): every nonzero value of x becomes c
            if seen is not None:
                seen.append(args[1])  # a write into the mask would void that
        return a | {fill} if a is not None and fill is not None else None
    if node.op == "call_function" and node.target is F.pad:
        mode = _get(node, 2, "mode", "constant")
        fill = _get(node, 3, "value", None)
        fill = 0.0 if fill is None else _const_number(fill)
        a = _value_set(args[0], depth - 1, seen)
        return a | {fill} if a is not None and fill is not None and mode == "constant" else None
    ops = {
        "add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
        "truediv": lambda x, y: x / y if y else None, "div": lambda x, y: x / y if y else None,
        "rsub": lambda x, y: y - x,
    }
    key = name.strip("_")
    if key.startswith("r") and key[1:] in ("add", "mul", "sub", "truediv") and node.op == "call_method":
        key = {"radd": "add", "rmul": "mul", "rsub": "rsub", "rtruediv": None}.get(key)
    if key == "neg" and len(args) == 1:
        a = _value_set(args[0], depth - 1, seen)
        return frozenset(-x for x in a) if a is not None else None
    if key not in ops or len(args) != 2 or set(node.kwargs) - {"alpha"} or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = _value_set(args[0], depth - 1, seen), _value_set(args[1], depth - 1, seen)
    if a is None or b is None or len(a) * len(b) > 16:
        return None
    out = set()  # every pair: a superset of the values where two varying tensors meet
    for x in a:
        for y in b:
            r = ops[key](x, y)
            if r is None or r != r:  # division by zero, nan (0 * inf)
                return None
            out.add(r)
    return frozenset(out)


def _bias_threshold(c: float, bias: Any) -> float:
    """The cut ``bias > threshold`` that tells the 0 entries of a {0, c} bias from the c ones:
    c / 2, at least minus half the largest finite number of the bias's dtype (Inductor may compare
    an fp16 bias in float32 against the threshold cast to fp16, where -5e8 is -inf)."""
    t = _tensor(bias)
    lo = -torch.finfo(t.dtype).max / 2 if t is not None and t.dtype.is_floating_point else -float("inf")
    return max(c / 2, lo)


#: the step between a bias's neighbouring numbers at or above which eager's ``scores + c`` rounds
#: every score of magnitude below half of it (32: nearly every attention score) onto ``c``
_ABSORBING_STEP = 64.0


def _bias_empty_rows(c: float, dtype: torch.dtype) -> Optional[str]:
    """``SiteMatch.empty_rows`` for a key mask written as a finite very negative bias ``c`` that
    eager adds to scores of ``dtype``: "all" (every score shifts alike: softmax over all keys), or
    "uniform" where ``dtype``'s numbers near ``c`` are at least 64 apart, so that scores below 32
    in magnitude round onto ``c`` and tie (eager's weights are then equal: Hugging Face's
    ``finfo.min`` masks, -1e9 in float32, -1e4 in bfloat16); None for -inf. Where the step is
    near the scores' size (-1e4 in float16: 8) eager's row is a rounding artefact that neither
    rule gives; "all" is the float64 result there."""
    if not math.isfinite(c):
        return None
    step = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(abs(c)))
    return "uniform" if step >= _ABSORBING_STEP else "all"


def _additive_mask_value(node: Any, seen: Optional[list] = None) -> Optional[float]:
    """``c`` when ``node`` (a float tensor added to the scores) provably holds only 0 and one
    negative number ``c`` (-inf included): a boolean key mask written as a bias, e.g.
    ``torch.zeros(..).masked_fill(~keep, -inf)``, ``torch.where(keep, 0.0, -inf)`` or
    ``(1 - keep.float()) * -10000.0``; else None. (A bias that is a graph input has unknown values.)
    In-place writes are not followed: ``_Finder.bias_value`` rejects a proof whose tensors the graph
    writes into."""
    t = _tensor(node)
    if t is None or not t.dtype.is_floating_point:
        return None
    vs = _value_set(node, seen=seen)
    if vs is None or len(vs) != 2 or 0.0 not in vs:
        return None
    (c,) = vs - {0.0}
    return c if c < 0 else None


def _mutates(node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument: an in-place tensor method (``x.mul_(c)``:
    the name ends in "_", not a dunder) or an augmented assignment (``x *= c``, operator.imul)."""
    if node.op == "call_method":
        name = str(node.target)
        return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))
    if node.op == "call_function":
        if node.target in _INPLACE_FNS:
            return True
        if getattr(node.target, "__module__", None) in ("_operator", "operator"):
            return False  # operator.and_ / or_ / not_ are pure (operator.iand & co. are listed above)
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")  # torch.relu_, torch._foreach_mul_
    return False


def _inplace_arg(node: fx.Node) -> bool:
    """Whether a call passes ``inplace=True`` (``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``,
    by keyword or by position)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op != "call_function" or not any(a is True for a in node.args):
        return False
    try:
        params = inspect.signature(node.target).parameters
    except (TypeError, ValueError):
        return False
    names = list(params)
    return "inplace" in names and names.index("inplace") < len(node.args) and node.args[names.index("inplace")] is True


#: modules of the callables a Dynamo graph calls whose writes the name rules above tell (torch's
#: functions, Python's operators); a call of anything else kept whole in the graph may write into
#: any tensor it gets (``_opaque_call``)
_KNOWN_MODULES = ("torch", "operator", "_operator", "math", "builtins", "einops", "fgcompile")


def _opaque_call(node: fx.Node) -> bool:
    """Whether ``node`` calls code whose writes the pass cannot see: a higher-order op (its body is
    a subgraph: ``torch.utils.checkpoint``, ``torch.cond``, ``wrap``) or a Python function Dynamo
    kept as one call (``torch.compiler.allow_in_graph``). Torch's functions, tensor methods and
    operators with a schema are not."""
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    if getattr(target, "_schema", None) is not None or callable(getattr(target, "overloads", None)):
        return False
    owner = getattr(target, "__objclass__", None)  # a method descriptor: torch.Tensor.add
    module = getattr(owner if owner is not None else target, "__module__", None) or ""
    return module.split(".")[0] not in _KNOWN_MODULES


def _written(node: fx.Node) -> Optional[list]:
    """The tensors ``node`` writes into (graph nodes, or values of its arguments), or None when it
    writes nothing: ``out=`` tensors, ``x[i] = y``, in-place ops (``x.mul_``, ``x *= c``,
    ``torch._foreach_mul_``, ``inplace=True``), operators whose schema marks an argument written
    (every tensor argument of an overload packet with such an overload), and every tensor a
    higher-order op or a Python function kept whole gets (``_opaque_call``: they may write it)."""
    if node.op not in ("call_function", "call_method"):
        return None
    out = node.kwargs.get("out")
    if out is not None:
        return list(out) if isinstance(out, (list, tuple)) else [out]
    if node.target is operator.setitem or node.target == "__setitem__":
        return [node.args[0]]
    if _mutates(node) or _inplace_arg(node):
        first = node.args[0] if node.args else None
        return list(first) if isinstance(first, (list, tuple)) else [first]
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is not None:
        if not schema.is_mutable:
            return None
        written = []
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written.append(node.kwargs.get(arg.name, node.args[i] if i < len(node.args) else None))
        return written
    overloads = getattr(target, "overloads", None)  # an operator packet: torch.ops.ns.op
    if callable(overloads):
        try:
            mutable = any(getattr(target, o)._schema.is_mutable for o in overloads())
        except Exception:
            mutable = True
        if mutable:
            return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    if _opaque_call(node):
        return [a for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor)] or None
    return None


def _storages(xs: list) -> Optional[set]:
    """The storages of graph nodes' fake values (or of values), as ``StorageWeakRef`` (equal for
    tensors that share memory: a view, a slice, the tensor itself), or None when one of them has
    no tensor value to tell (then it may be anything)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    out = set()
    for x in xs:
        v = _val(x)
        if not isinstance(v, torch.Tensor):
            return None
        try:
            out.add(StorageWeakRef(v.untyped_storage()))
        except Exception:
            return None
    return out


#: node.meta key: why passes.expand_flash did not rewrite this flash-attn call into SDPA
FLASH_NOT_EXPANDED = "fgcompile_flash_not_expanded"

#: node.meta key of an SDPA node a pass made: why the site it becomes runs dense at every call
#: (``SiteInfo.run_dense``), e.g. the short second sequence of a two-sequence flash-attn varlen
#: call (``passes.expand_flash``), whose predictor would cost more than it saves
RUN_DENSE = "fgcompile_run_dense"

#: attention kernels of other libraries that a graph holds as one opaque call (torch.library
#: namespaces / Python modules), reported as not served instead of passing unnoticed
_OPAQUE_ATTENTION = ("flash_attn", "flashattn", "xformers", "sageattention", "sageattn", "flashinfer", "spas_sage_attn")


def _opaque_attention(node: fx.Node) -> Optional[str]:
    """The name of a call to another library's attention kernel (flash-attn, xFormers,
    SageAttention, FlashInfer), or of PyTorch's FlexAttention / SDPA backend ops, that the pass
    cannot see into; else None."""
    if node.op != "call_function":
        return None
    t = node.target
    qual = ""
    name = getattr(t, "name", None)
    if callable(name):  # an OpOverload / packet / higher-order op: "namespace::op"
        try:
            qual = str(name())
        except Exception:
            qual = ""
    if not qual:
        qual = f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', '') or ''}"
    low = qual.lower()
    if any(low.startswith(lib) or f"::{lib}" in low or f".{lib}" in low for lib in _OPAQUE_ATTENTION):
        return qual
    if "flex_attention" in low or low.startswith("aten::_scaled_dot_product") or low.startswith("aten::_flash_attention") \
            or low.startswith("aten::_efficient_attention"):
        return qual
    return None


_NOT_FNS = {operator.invert, torch.logical_not, torch.bitwise_not}


def _through_not(node: Any) -> Any:
    """``node`` without elementwise negations and bool casts of a bool tensor (``~x``,
    ``logical_not``, ``.bool()``): they keep what a mask repeats over."""
    while True:
        node = _strip_bool_cast(node)
        t = _tensor(node)
        if (t is not None and t.dtype == torch.bool and _is_fn(node, _NOT_FNS, ("__invert__", "logical_not", "bitwise_not"))
                and len(node.args) == 1 and isinstance(node.args[0], fx.Node) and _tensor(node.args[0]) is not None
                and _tensor(node.args[0]).dtype == torch.bool):
            node = node.args[0]
            continue
        return node


def _same_over_heads(mask: fx.Node, heads: Any) -> bool:
    """Whether a 4-D mask (B, H, *, S) is diffusers' ``prepare_attention_mask`` of a per-batch
    mask, negated or not: ``x.repeat_interleave(H, dim=0).view(B, H, -1, S)``, whose H heads of
    batch b are copies of row b. (An expand or repeat over the heads is ``_constant_over``'s: see
    ``_Finder._over_heads``.) The rewrite then reads head 0."""
    mask = _through_not(mask)
    if not isinstance(mask, fx.Node) or mask.op not in ("call_method", "call_function") or not mask.args:
        return False
    src = mask.args[0]
    if _is_fn(mask, {torch.reshape}, ("view", "reshape")) and isinstance(src, fx.Node):
        ri = src
        if not _is_fn(ri, {torch.repeat_interleave}, ("repeat_interleave",)) or not isinstance(ri.args[0], fx.Node):
            return False
        reps = _get(ri, 1, "repeats")
        if isinstance(reps, fx.Node):  # a symbolic head count under dynamic shapes
            reps = reps.meta.get("example_value")
        dim = _get(ri, 2, "dim")
        out = _tensor(mask)
        base = _tensor(ri.args[0])
        # rows b * H + h of the repeated tensor are copies of row b: viewed as (B, H, ...) the H
        # heads of batch b are its copies
        return (base is not None and out is not None and out.dim() == 4 and _const_number(dim) == 0
                and isinstance(reps, (int, torch.SymInt)) and not isinstance(reps, bool)
                and _equal(out.shape[1], reps) and _equal(out.shape[0], base.shape[0]) and _equal(heads, out.shape[1]))
    return False


_AND_FNS = {torch.logical_and, torch.bitwise_and, operator.and_, torch.mul, operator.mul}


def _strip_bool_cast(node: Any) -> Any:
    """``node`` without ``.bool()`` / ``.to(torch.bool)`` steps on a tensor that is already bool."""
    while isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node):
        src = node.args[0]
        t = _tensor(src)
        if t is None or t.dtype != torch.bool:
            break
        if _is_fn(node, set(), ("bool",)) and len(node.args) == 1 and not node.kwargs:
            node = src
        elif _is_fn(node, set(), ("to",)) and list(node.args[1:]) + list(node.kwargs.values()) == [torch.bool]:
            node = src
        else:
            break
    return node


def _and_operands(node: Any) -> Optional[tuple]:
    """(a, b) if ``node`` is a bool ``a & b`` (``&``, ``logical_and``, ``bitwise_and``, or ``*`` of
    two bool tensors), else None."""
    if not _is_fn(node, _AND_FNS, ("__and__", "logical_and", "bitwise_and", "mul", "__mul__")):
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    ta, tb = _tensor(a), _tensor(b)
    if ta is None or tb is None or ta.dtype != torch.bool or tb.dtype != torch.bool:
        return None
    return a, b


# elementwise ops (their tensor operands broadcast, aligned from the last dim)
_ELEMENTWISE_FNS = {
    torch.where, torch.masked_fill, torch.Tensor.masked_fill, torch.logical_not, torch.logical_and, torch.logical_or,
    torch.logical_xor, torch.bitwise_not, torch.bitwise_and, torch.bitwise_or, torch.add, torch.sub, torch.mul,
    torch.div, torch.neg, torch.rsub, torch.eq, torch.ne, torch.gt, torch.ge, torch.lt, torch.le, operator.add,
    operator.sub, operator.mul, operator.truediv, operator.neg, operator.invert, operator.and_, operator.or_,
    operator.xor, operator.eq, operator.ne, operator.gt, operator.ge, operator.lt, operator.le,
}
_ELEMENTWISE_METHODS = frozenset({
    "where", "masked_fill", "logical_not", "logical_and", "logical_or", "logical_xor", "bitwise_not", "add", "sub",
    "mul", "div", "neg", "rsub", "eq", "ne", "gt", "ge", "lt", "le", "__invert__", "__and__", "__or__", "__xor__",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__neg__",
    "__eq__", "__ne__", "__gt__", "__ge__", "__lt__", "__le__",
})
# one tensor in, the same values (or their cast) out, the shape kept
_SAME_SHAPE_METHODS = frozenset(_CAST_METHODS | {"bool", "clone", "detach"})
_CONSTANT_MAKERS = {torch.zeros, torch.ones, torch.full, torch.zeros_like, torch.ones_like, torch.full_like}


def _constant_over(node: Any, dim: int, depth: int = 16, seen: Optional[list] = None) -> bool:
    """Whether the tensor ``node`` holds the same values all along ``dim`` (negative: counted from
    the last dim, as broadcasting aligns): a number; size 1 there, or no such dim; a graph-made
    ``zeros`` / ``ones`` / ``full``; ``expand`` / ``broadcast_to`` / ``repeat`` of such a tensor (or of
    one with size 1 there); a cast of one; an elementwise op (arithmetic, comparisons, logic,
    ``where``, ``masked_fill``) of such operands. A key mask built by expanding ``keep[:, None, None,
    :]`` over the queries, then negated, cast or turned into a bias, is constant over the queries.
    In-place writes are not followed: ``seen`` collects the tensor nodes the proof reads
    (``_Finder.constant_over`` checks that nothing writes into them)."""
    if _const_number(node) is not None:
        return True
    t = _tensor(node)
    if t is None:
        return False
    if seen is not None:
        seen.append(node)
    if t.dim() < -dim or _is_one(t.shape[dim]):
        return True
    if depth <= 0 or not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method") or not node.args:
        return False
    args = node.args
    if _is_fn(node, _CONSTANT_MAKERS, ("new_zeros", "new_ones", "new_full")):
        fill = _get(node, 1, "fill_value") if _is_fn(node, {torch.full, torch.full_like}, ("new_full",)) else 0
        return isinstance(fill, bool) or _const_number(fill) is not None
    if _is_fn(node, {torch.broadcast_to}, ("expand", "expand_as", "broadcast_to", "repeat")) or (
            _is_fn(node, {torch.clone, torch.detach}, _SAME_SHAPE_METHODS)):
        return isinstance(args[0], fx.Node) and _constant_over(args[0], dim, depth - 1, seen)
    if _is_fn(node, {torch.repeat_interleave}, ("repeat_interleave",)):
        along = _const_number(_get(node, 2, "dim"))  # copies along another dim keep the rows alike
        return (along is not None and int(along) % t.dim() != dim % t.dim() and isinstance(args[0], fx.Node)
                and _constant_over(args[0], dim, depth - 1, seen))
    if _is_fn(node, _ELEMENTWISE_FNS, _ELEMENTWISE_METHODS):
        for a in list(args) + list(node.kwargs.values()):
            if not (_constant_over(a, dim, depth - 1, seen) if isinstance(a, fx.Node) else _const_number(a) is not None):
                return False
        return True
    return False


def _is_fn(node: Any, fns: set, methods: Sequence[str] = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        try:
            return node.target in fns
        except TypeError:  # unhashable target
            return False
    return node.op == "call_method" and node.target in methods


def _get(node: fx.Node, idx: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    if idx < len(node.args):
        return node.args[idx]
    return default


def _val(node: Any) -> Any:
    if isinstance(node, fx.Node):
        v = node.meta.get("example_value", node.meta.get("val"))
        return v
    return node


def _tensor(node: Any) -> Optional[torch.Tensor]:
    v = _val(node)
    return v if isinstance(v, torch.Tensor) else None


def _ndim(node: Any) -> Optional[int]:
    t = _tensor(node)
    return t.dim() if t is not None else None


def size_of(x: Any) -> Size:
    """An int for a static size, the sympy expression's str for a symbolic one."""
    if isinstance(x, int):
        return int(x)
    if isinstance(x, torch.SymInt):
        node = x.node
        try:
            m = node.maybe_as_int()
            if m is not None:
                return int(m)
        except Exception:
            pass
        try:
            expr = node.expr
            if getattr(expr, "is_number", False):
                return int(expr)
            return str(expr)
        except Exception:
            return str(x)
    return str(x)


def _hint(x: Any) -> Optional[int]:
    """A size's integer value: itself when static, its size hint when symbolic (None if unknown)."""
    if isinstance(x, int):
        return int(x)
    if isinstance(x, torch.SymInt):
        s = size_of(x)
        if isinstance(s, int):
            return s
        try:
            h = x.node.hint
            return int(h) if h is not None else None
        except Exception:
            return None
    return None


def _same(a: Any, b: Any) -> bool:
    """Whether two sizes are the same, without adding guards."""
    return size_of(a) == size_of(b)


def _equal(a: Any, b: Any) -> bool:
    """Whether two sizes that attention needs equal are equal. Symbolic sizes with equal example
    values (k and v of separate graph inputs under dynamic shapes each get their own symbol) are
    taken as equal under a guard on that equality (the guard Inductor would add for its own
    kernels): an input that breaks it recompiles the graph, where the sizes then differ and the
    site is left as it is, so a site is never served with sizes that differ."""
    if _same(a, b):
        return True
    if not isinstance(a, torch.SymInt) and not isinstance(b, torch.SymInt):
        return False
    ha, hb = _hint(a), _hint(b)
    if ha is None or ha != hb:
        return False
    try:
        return bool(a == b)
    except Exception:  # no shape environment to guard in: not provably equal
        return False


def _is_one(a: Any) -> bool:
    return size_of(a) == 1


def _fill_number(fill: Any) -> Optional[float]:
    """A fill's value: a constant number, or a graph node ``torch.tensor(c)`` /
    ``torch.scalar_tensor(c)`` / ``torch.full((), c)`` of a constant number ``c`` (0-d); else None."""
    c = _const_number(fill)
    if c is not None or not isinstance(fill, fx.Node) or fill.op != "call_function":
        return c
    t = _tensor(fill)
    if t is None or t.dim() != 0:
        return None
    if fill.target in (torch.tensor, torch.scalar_tensor) and fill.args:
        return _const_number(fill.args[0])
    if fill.target is torch.full and len(fill.args) >= 2 and tuple(fill.args[0]) == ():
        return _const_number(fill.args[1])
    return None


def _full_like_value(node: Any, like: Any) -> Optional[float]:
    """``c`` when ``node`` is ``torch.full_like(like, c)`` of a constant number, read once; else None."""
    if not (_is_fn(node, {torch.full_like}) and node.args and node.args[0] is like and len(node.users) == 1):
        return None
    if set(node.kwargs) - {"dtype", "device", "layout", "memory_format"} or len(node.args) != 2:
        return None
    return _const_number(node.args[1])


def _fill_mask(words, cond, fill, invert, mask_kind, mask_node, mask_invert, dense, after=1.0, shift_dtype=None):
    """A boolean fill of the scores (``masked_fill(mask, value)`` or ``where(cond, s, fill)``;
    ``words``: the op, its condition and its fill, for the reasons; ``after``: the constant factor
    the scores are multiplied by between the fill and the softmax): returns the new
    ``(mask_kind, mask_node, mask_invert, empty_rows)``. A single boolean condition whose fill,
    times ``after``, is -inf or very negative is a key mask ("bool", inverted when True marks the
    masked keys); anything else makes the site dense, with its reason appended to ``dense``.
    ``empty_rows`` (see ``SiteMatch.empty_rows``), for a finite fill value: "uniform" where the
    fill replaces the scores; where it is written into a zero bias added to scores of
    ``shift_dtype``, what ``_bias_empty_rows`` says."""
    op, cond_word, fill_word = words
    value = _fill_number(fill)
    empty_rows = None
    if mask_kind != "none":
        dense.append("more than one mask")
        mask_kind = "other"
    elif not isinstance(cond, fx.Node) or _tensor(cond) is None or _tensor(cond).dtype != torch.bool:
        mask_kind = "other"
        dense.append(f"{op} with a non-boolean {cond_word}")
    elif value is None:
        mask_kind = "other"
        dense.append(f"{op} with {fill_word} {fill}: not a constant number (a 0-d torch.tensor(c) of a number counts)")
    elif not _masks_out(value * after):
        mask_kind = "other"
        scaled = f" scaled by {after:g} afterwards" if after != 1.0 else ""
        dense.append(f"{op} with {fill_word} {value:g}{scaled} (not a -inf / very negative fill)")
    else:
        mask_kind = "bool"
        mask_node, mask_invert = cond, invert
        if shift_dtype is not None:
            empty_rows = _bias_empty_rows(value, shift_dtype)
        elif math.isfinite(value * after):
            empty_rows = "uniform"
    if isinstance(cond, fx.Node) and mask_node is None:
        mask_node = cond
    return mask_kind, mask_node, mask_invert, empty_rows


#: The reason of a site whose softmax scale is not a number known at compile time. Under
#: ``torch.compile(..., dynamic=True)`` Dynamo passes a Python float read from an attribute
#: (``self.scale``) as a graph input (``torch._dynamo.config.specialize_float`` is False), so the
#: usual spelling lands here; a scale computed from the shape (``q.shape[-1] ** -0.5``) does not.
SCALE_NOT_CONSTANT = (
    "the scale is not a constant (a Python float is a run-time input under dynamic=True: set "
    "torch._dynamo.config.specialize_float = True, or compute it from the head dim)"
)


def _const_number(x: Any) -> Optional[float]:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


# a constant factor the graph computes itself (``s / torch.sqrt(torch.tensor(d))``): graph-built
# scalar tensors, and the pure ops such a factor is made with
_FOLD_LEAVES = (torch.tensor, torch.as_tensor, torch.scalar_tensor)
_FOLD_OPS = frozenset({
    "sqrt", "rsqrt", "reciprocal", "pow", "__pow__", "__rpow__", "mul", "__mul__", "__rmul__", "truediv",
    "__truediv__", "__rtruediv__", "div", "true_divide", "add", "__add__", "__radd__", "sub", "__sub__",
    "__rsub__", "neg", "exp", "log", "float", "double", "half", "bfloat16", "to",
})


class _NotConstant(Exception):
    pass


def _folded_number(x: Any, depth: int = 6) -> Optional[float]:
    """``x`` as a number: a Python number, or a node computing a 0-d tensor from literals only
    (``torch.tensor(64)``, then ``sqrt`` / ``rsqrt`` / arithmetic / casts, at most ``depth`` deep),
    evaluated here on the CPU. None for anything else: a graph input, a random op, a 1-element
    tensor that is not 0-d (it would change the scores' dtype by type promotion)."""
    c = _const_number(x)
    if c is not None or not isinstance(x, fx.Node):
        return c

    def ev(a: Any, d: int) -> Any:
        if isinstance(a, fx.Node):
            if d <= 0 or a.op not in ("call_function", "call_method"):
                raise _NotConstant
            leaf = a.op == "call_function" and a.target in _FOLD_LEAVES
            name = a.target if a.op == "call_method" else getattr(a.target, "__name__", "")
            if not leaf and name not in _FOLD_OPS:
                raise _NotConstant
            args = [ev(b, d - 1) for b in a.args]
            kwargs = {k: ev(v, d - 1) for k, v in a.kwargs.items() if k not in ("device", "pin_memory")}
            return getattr(args[0], a.target)(*args[1:], **kwargs) if a.op == "call_method" else a.target(*args, **kwargs)
        if isinstance(a, (list, tuple)):
            return type(a)(ev(b, d) for b in a)
        if a is None or isinstance(a, (bool, int, float, str, torch.dtype)):
            return a
        if isinstance(a, torch.device):  # .to(q.device): the value is the same on the CPU
            return torch.device("cpu")
        raise _NotConstant

    try:
        with torch.no_grad():
            v = ev(x, depth)
    except Exception:
        return None
    if isinstance(v, torch.Tensor):
        if v.dim() != 0 or v.dtype == torch.bool or v.is_complex():
            return None
        v = v.item()
    c = _const_number(v)
    return c if c is not None and math.isfinite(c) else None


def _norm_dim(d: Any, n: int) -> Optional[int]:
    if not isinstance(d, int) or isinstance(d, bool) or n <= 0:
        return None
    return d % n if -n <= d < n else None


# ----------------------------------------------------------------------------- names
# the root module's source: L['self'], G['model'], or an item of a wrapped forward's *args
# (L['args'][0]: a decorator that takes self in *args, as transformers' models have)
_PREFIX = re.compile(r"^(?:[LG]\[['\"][^'\"]*['\"]\](?:\[\d+\])?|self)\.?")


def site_name(path: str) -> str:
    """Dynamo's module path -> the module's dotted path: ``"L['self'].blocks[3].attn1"``,
    ``"L['self'].blocks.3.attn1"``, ``"L['self']._modules['blocks']._modules['3'].attn1"`` and
    ``"L['self'].__dict__['_modules']['blocks'].3.attn1"`` and ``"L['args'][0].blocks.3.attn1"`` all
    become ``"blocks.3.attn1"``."""
    s = _PREFIX.sub("", path.strip())
    s = re.sub(r"\.?__dict__\[['\"]_modules['\"]\]", ".", "." + s)
    s = re.sub(r"\._modules\[['\"]([^'\"]*)['\"]\]", r".\1", s)
    s = re.sub(r"\[['\"]([^'\"]*)['\"]\]", r".\1", s)
    s = re.sub(r"\[(\d+)\]", r".\1", s)
    s = re.sub(r"\.+", ".", s).strip(".")
    return s


def _call_site(node: fx.Node) -> Optional[str]:
    """The frames of ``node``'s stack trace (``File "model.py", line 40, in forward`` lines, the
    source text left out), or None where Dynamo recorded none. Stable across recompiles of the same
    code (new shapes, a second torch.compile of the module); a graph-break's resumed code names its
    frame ``torch_dynamo_resume_in_<fn>_at_<line>``."""
    trace = node.meta.get("stack_trace")
    if not isinstance(trace, str):
        return None
    frames = [ln.strip() for ln in trace.splitlines() if ln.strip().startswith("File ")]
    return "\n".join(frames) or None


def _module_path(node: fx.Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    try:
        path, _cls = list(stack.values())[-1]
    except Exception:
        return None
    name = site_name(str(path))
    return name or None


# ----------------------------------------------------------------------------- matching helpers
def _scalar_factor(node: fx.Node, through: fx.Node) -> Optional[tuple]:
    """If ``node`` is ``through * c``, ``c * through`` or ``through / c`` with a constant number
    ``c`` (a literal, or a 0-d tensor the graph builds from literals: ``_folded_number``):
    ("ok", factor). If it multiplies/divides ``through`` by something else: ("bad", None).
    Otherwise None."""
    if _is_fn(node, _MUL_FNS, ("mul", "__mul__", "__rmul__", "mul_", "__imul__")):
        a = tuple(node.args) + tuple(node.kwargs[k] for k in ("other",) if k in node.kwargs and len(node.args) == 1)
        if len(a) != 2 or set(node.kwargs) - {"other"}:
            return ("bad", None)
        other = a[1] if a[0] is through else a[0] if a[1] is through else None
        if other is None:
            return None
        c = _folded_number(other)
        return ("ok", c) if c is not None else ("bad", None)
    if _is_fn(node, _DIV_FNS, ("div", "__truediv__", "true_divide", "div_", "__itruediv__")):
        a = node.args
        if len(a) != 2 or a[0] is not through or node.kwargs.get("rounding_mode") is not None:
            return ("bad", None) if through in a else None
        c = _folded_number(a[1])
        if c is None or c == 0:
            return ("bad", None)
        return ("ok", 1.0 / c)
    return None


def _is_swap_last2(node: fx.Node) -> Optional[fx.Node]:
    """If ``node`` swaps the last two dims of a tensor (transpose / permute / .mT / .T of 2-D),
    return that tensor's node."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    src = node.args[0]
    n = _ndim(src)
    if n is None or n < 2 or not isinstance(src, fx.Node):
        return None
    if _is_fn(node, _TRANSPOSE_FNS, ("transpose", "swapaxes", "swapdims")):
        d0, d1 = _get(node, 1, "dim0"), _get(node, 2, "dim1")
        a, b = _norm_dim(d0, n), _norm_dim(d1, n)
        if a is not None and b is not None and {a, b} == {n - 2, n - 1}:
            return src
        return None
    if _is_fn(node, _PERMUTE_FNS, ("permute",)):
        dims = node.args[1:] if node.op == "call_method" else node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        if "dims" in node.kwargs:
            dims = node.kwargs["dims"]
        nd = [_norm_dim(d, n) for d in dims]
        if nd == list(range(n - 2)) + [n - 1, n - 2]:
            return src
        return None
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        if node.args[1] == "mT" or (node.args[1] in ("T", "mH") and n == 2):
            return src
    if node.op == "call_method" and node.target == "t" and n == 2:
        return src
    return None


def _cast_src(node: fx.Node) -> Optional[fx.Node]:
    """If ``node`` is a cast-like op (``.float()``, ``.to(dtype)``, ``.type_as(x)``, ...) of a
    tensor, that tensor's node."""
    if node.op == "call_method" and node.target in _CAST_METHODS and node.args:
        src = node.args[0]
        if not isinstance(src, fx.Node):
            return None
        if node.target == "to":
            for a in list(node.args[1:]) + list(node.kwargs.values()):
                if isinstance(a, fx.Node):
                    if _tensor(a) is None:
                        return None
                elif not isinstance(a, (torch.dtype, torch.device, str, bool, type(None), torch.memory_format)):
                    return None
            return src
        if node.target == "contiguous":
            return src
        return src
    return None


def _drop_upcasts(q: fx.Node, k: fx.Node, v: fx.Node, region: list) -> tuple:
    """(q, k) read before an upcast of both to a wider float (diffusers' ``upcast_attention``:
    ``q.float()``, ``k.float()``, v left in bfloat16) when that gives all three v's dtype; else
    (q, k) as they are. The kernels multiply q and k with float32 accumulation, which is what the
    upcast buys. A cast taken off joins ``region``: only the attention may read the upcast copy
    (an in-place rotary step on it would be lost otherwise), and a write into its source after the
    cast is then one into an input the region has read (``check_region`` rejects it)."""
    tq, tk, tv = _tensor(q), _tensor(k), _tensor(v)
    if tq is None or tk is None or tv is None or tq.dtype == tk.dtype == tv.dtype:
        return q, k
    rset = set(region)
    srcs, casts = [], []
    for n, t in ((q, tq), (k, tk)):
        if t.dtype == tv.dtype:
            srcs.append(n)
            continue
        src = _cast_src(n)
        ts = _tensor(src) if isinstance(src, fx.Node) else None
        if ts is None or ts.dtype != tv.dtype or ts.device != t.device or t.dtype.itemsize < ts.dtype.itemsize:
            return q, k
        if not (t.dtype.is_floating_point and ts.dtype.is_floating_point) or list(ts.shape) != list(t.shape):
            return q, k
        if not n.users or any(u not in rset for u in n.users):
            return q, k
        srcs.append(src)
        casts.append(n)
    region.extend(casts)
    return tuple(srcs)


_VIEW_METHODS = {"view", "reshape"}


def _leading_view_src(node: fx.Node) -> Optional[fx.Node]:
    """If ``node`` reshapes a tensor's leading (batch) dims only, keeping its last two dims (e.g.
    scores (B*H, S_q, S_kv) viewed as (B, H, S_q, S_kv) and back, as Hugging Face's BART does
    around its mask), that tensor's node: each row of the scores stays the same row."""
    if node.op == "call_method" and node.target in _VIEW_METHODS:
        src = node.args[0] if node.args else None
    elif node.op == "call_function" and node.target is torch.reshape:
        src = _get(node, 0, "input")
    else:
        return None
    if not isinstance(src, fx.Node):
        return None
    t_in, t_out = _tensor(src), _tensor(node)
    if t_in is None or t_out is None or t_in.dim() < 2 or t_out.dim() < 2:
        return None
    if not all(_same(a, b) for a, b in zip(t_in.shape[-2:], t_out.shape[-2:])):
        return None
    return src


def _dropout_src(node: fx.Node) -> Optional[tuple]:
    """``F.dropout(x, p, training)``: (x, p, training)."""
    if _is_fn(node, _DROPOUT_FNS, ("dropout",)):
        x = _get(node, 0, "input")
        p = _get(node, 1, "p", 0.5)
        training = _get(node, 2, "train" if node.target is torch.dropout else "training", True)
        if isinstance(x, fx.Node):
            return x, p, training
    return None


_LOG_SOFTMAX_FNS = {F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax, torch.special.log_softmax}
_EXP_FNS = {torch.exp, torch.Tensor.exp}


def _exp_of_log_softmax(node: fx.Node) -> Optional[fx.Node]:
    """The log_softmax node of ``exp(log_softmax(x))`` (a softmax) when ``node`` is that exp and
    the exp is the log_softmax's only user; else None."""
    if not isinstance(node, fx.Node) or not _is_fn(node, _EXP_FNS, ("exp",)) or len(node.args) != 1 or node.kwargs:
        return None
    src = node.args[0]
    if isinstance(src, fx.Node) and _is_fn(src, _LOG_SOFTMAX_FNS, ("log_softmax",)) and list(src.users) == [node]:
        return src
    return None


_SUM_FNS = {torch.sum, torch.Tensor.sum}


def _reduced_last(node: fx.Node, x: Any, fns: set, method: str) -> bool:
    """Whether ``node`` is ``fns(x, dim, keepdim=True)`` / ``x.<method>(dim, keepdim=True)`` over the
    last dim only (``dim`` -1, the last index, or a one-element list of it), keeping it as size 1."""
    if not _is_fn(node, fns, (method,)) or _get(node, 0, "input") is not x:
        return False
    n = _ndim(x)
    dim = _get(node, 1, "dim")
    if isinstance(dim, (list, tuple)):
        dim = dim[0] if len(dim) == 1 else None
    keepdim = _get(node, 2, "keepdim", False)
    extra = set(node.kwargs) - {"dim", "keepdim", "input"}
    return n is not None and _norm_dim(dim, n) == n - 1 and keepdim is True and not extra and len(node.args) <= 3


def _manual_softmax(node: fx.Node) -> Optional[tuple]:
    """(x, [the sum, the exp]) when ``node`` is a softmax written out: ``e / e.sum(-1, keepdim=True)``
    with ``e = exp(x)`` (x often already shifted by its row max) and the exp and the sum used only
    there; else None."""
    if not _is_fn(node, _DIV_FNS, ("div", "__truediv__")) or len(node.args) != 2 or node.kwargs:
        return None
    e, ssum = node.args
    if not (isinstance(e, fx.Node) and isinstance(ssum, fx.Node)):
        return None
    if not _is_fn(e, _EXP_FNS, ("exp",)) or len(e.args) != 1 or e.kwargs or not isinstance(e.args[0], fx.Node):
        return None
    if not _reduced_last(ssum, e, _SUM_FNS, "sum") or set(e.users) != {node, ssum} or list(ssum.users) != [node]:
        return None
    return e.args[0], [ssum, e]


def _softmax_parts(node: fx.Node) -> Optional[tuple]:
    """(input node, dim, dtype, inner nodes) for a softmax node, the exp of ``exp(log_softmax(x))``
    or the division of a softmax written out (``_manual_softmax``); the inner nodes are the ones
    between the input and ``node`` (the log_softmax; the sum and the exp)."""
    inner = _exp_of_log_softmax(node)
    if inner is not None:
        sm, extra = inner, [inner]
    elif _is_fn(node, _SOFTMAX_FNS, ("softmax",)):
        sm, extra = node, []
    else:
        manual = _manual_softmax(node)
        if manual is None:
            return None
        return manual[0], -1, None, manual[1]
    x = _get(sm, 0, "input")
    if "self" in sm.kwargs:
        x = sm.kwargs["self"]
    dim = _get(sm, 1, "dim")
    dtype = sm.kwargs.get("dtype")
    if sm.target in (F.softmax, F.log_softmax) and len(sm.args) > 3:
        dtype = sm.args[3]
    elif sm.target not in (F.softmax, F.log_softmax) and len(sm.args) > 2:
        dtype = sm.args[2]
    if not isinstance(x, fx.Node):
        return None
    return x, dim, dtype, extra


def _is_softmax(node: fx.Node) -> Optional[tuple]:
    """(input node, dim, dtype) for a softmax node (see ``_softmax_parts``), else None."""
    parts = _softmax_parts(node)
    return None if parts is None else parts[:3]


_AMAX_FNS = {torch.amax, torch.Tensor.amax}
_MAX_FNS = {torch.max, torch.Tensor.max}
_DETACH_FNS = {torch.detach, torch.Tensor.detach}
_SUB_FNS = {operator.sub, operator.isub, torch.sub, torch.Tensor.sub}


def _row_max_nodes(node: Any, x: fx.Node) -> Optional[list]:
    """The nodes computing ``node`` when it is the largest entry of each row of ``x`` (last dim,
    kept as size 1): ``x.amax(-1, keepdim=True)`` or ``x.max(-1, keepdim=True)[0]`` / ``.values``,
    possibly ``.detach()``-ed; else None. Softmax is invariant to subtracting it."""
    chain = []
    cur = node
    while isinstance(cur, fx.Node) and _is_fn(cur, _DETACH_FNS, ("detach",)) and len(cur.args) == 1:
        chain.append(cur)
        cur = cur.args[0]
    if not isinstance(cur, fx.Node):
        return None
    if cur.op == "call_function" and ((cur.target is operator.getitem and cur.args[1:] == (0,))
                                      or (cur.target is getattr and cur.args[1:] == ("values",))):
        chain.append(cur)
        red = cur.args[0]
        if not isinstance(red, fx.Node) or not _reduced_last(red, x, _MAX_FNS, "max"):
            return None
    elif _reduced_last(cur, x, _AMAX_FNS, "amax"):
        red = cur
    else:
        return None
    chain.append(red)
    if any(len(n.users) != 1 for n in chain):  # (the max's indices unused too)
        return None
    return chain


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


# ----------------------------------------------------------------------------- einsum
def _parse_einsum(eq: str, n_ops: int) -> Optional[tuple]:
    """'bhqd,bhkd->bhqk' -> (['bhqd', 'bhkd'], 'bhqk') with a leading '...' kept as '.' in every
    term (only a leading ellipsis, present in all terms, is supported)."""
    if not isinstance(eq, str):
        return None
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != n_ops:
        return None
    ell = ["..." in t for t in terms + [out]]
    if any(ell) and not all(ell):
        return None
    norm = []
    for t in terms + [out]:
        if "..." in t:
            if not t.startswith("..."):
                return None
            t = "." + t[3:]
        if not re.fullmatch(r"\.?[a-zA-Z]*", t) or len(set(t)) != len(t):
            return None
        norm.append(t)
    return norm[:-1], norm[-1]


def _einsum_operands(node: fx.Node) -> Optional[tuple]:
    if not _is_fn(node, _EINSUM_FNS):
        return None
    args = list(node.args)
    if not args or not isinstance(args[0], str):
        return None
    ops = args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if len(ops) != 2 or not all(isinstance(o, fx.Node) for o in ops):
        return None
    parsed = _parse_einsum(args[0], 2)
    if parsed is None:
        return None
    (ta, tb), to = parsed
    return ta, tb, to, ops[0], ops[1]


def _perm_to(src: str, dst: str) -> Optional[tuple]:
    """The permutation p with ``x.permute(p)`` labelled ``dst`` when ``x`` is labelled ``src``
    (a leading '.' is an ellipsis of unknown rank: it must lead both, and is kept in place)."""
    if sorted(src) != sorted(dst):
        return None
    if "." in src:
        if src[0] != "." or dst[0] != ".":
            return None
        return ("ellipsis", tuple(src[1:].index(c) for c in dst[1:]))
    return tuple(src.index(c) for c in dst)


# ----------------------------------------------------------------------------- the pass
class _Reject(Exception):
    """A candidate that is not attention: left alone."""


class _Finder:
    def __init__(self, gm: fx.GraphModule, config: FGAttnConfig):
        self.gm = gm
        self.graph = gm.graph
        self.config = config
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.nodes = list(self.graph.nodes)
        self._nx = None
        self._postdom = None
        self.rejected: list[tuple[str, str, str]] = []  # (node, "softmax" | "sdpa", why): not sites
        # in-place statements the walks took as steps (_statement_write): write -> the node reading it
        self.statement_writes: dict = {}
        self._written_storages: Any = None  # storages the graph writes into (False: unknown), for bias_value

    # -------------------------------------------------------------- structural checks (networkx)
    def nx_graph(self):
        if self._nx is None:
            import networkx as nx

            g = nx.DiGraph()
            for n in self.graph.nodes:
                g.add_node(n)
                for u in n.users:
                    g.add_edge(n, u)
            for w, reader in self.statement_writes.items():  # the reader sees what w wrote
                g.add_edge(w, reader)
            self._nx = g
        return self._nx

    def postdominators(self):
        """Immediate post-dominators: dominators of the reversed graph rooted at a virtual sink
        that every node without users (the graph output, dead nodes) feeds."""
        if self._postdom is None:
            import networkx as nx

            g = self.nx_graph().reverse(copy=True)
            sink = "__fgcompile_sink__"
            g.add_node(sink)
            for n in self.graph.nodes:
                if not n.users and n not in self.statement_writes:
                    g.add_edge(sink, n)
            self._postdom = nx.immediate_dominators(g, sink)
        return self._postdom

    def postdominates(self, a: fx.Node, b: fx.Node) -> bool:
        idom = self.postdominators()
        cur = b
        seen = set()
        while cur in idom and cur not in seen:
            if cur is a:
                return True
            seen.add(cur)
            nxt = idom[cur]
            if nxt is cur:
                break
            cur = nxt
        return False

    def check_region(self, region: list, inputs: list, output: fx.Node) -> None:
        """The region must be exactly the nodes between its inputs and its output, its nodes
        other than the output may only feed the region, and the output post-dominates them."""
        import networkx as nx

        g = self.nx_graph()
        rset = set(region)
        for n in region:
            if n is output:
                continue
            if _mutates(n) and not self._private_write(n, rset):
                # its operand may be read elsewhere, through another name or a view
                raise _Reject(f"{n.name} ({_target_str(n.target)}) is an in-place op")
            for u in n.users:
                if u in rset:
                    continue
                if _mutates(u) and u.args and u.args[0] is n:
                    raise _Reject(f"{n.name} is modified by the in-place op {u.name} ({_target_str(u.target)})")
                raise _Reject(f"{n.name} is also used by {u.name} outside the attention")
        anc_out = nx.ancestors(g, output) | {output}
        anc_in: set = set()
        desc_in: set = set()
        for i in inputs:
            anc_in |= nx.ancestors(g, i) | {i}
            desc_in |= nx.descendants(g, i)
        between = (desc_in & anc_out) - anc_in
        extra = between - rset
        if extra:
            raise _Reject("other computations lie between the attention's inputs and its output: "
                          + ", ".join(sorted(x.name for x in extra)[:5]))
        for n in region:
            if n is not output and not self.postdominates(output, n):
                raise _Reject(f"{output.name} does not post-dominate {n.name}")
        # The rewritten op reads its inputs where the output is computed; eager read each input
        # where the region first reads it (q, k and the mask at the scores). A write in between
        # into an input's memory (the input itself, a view, a slice: the graph's fake values share
        # a storage exactly where the tensors alias) rejects the site; a write whose target is
        # unknown counts as a write into every input.
        first = min(self.order[n] for n in region)
        last = self.order[output]
        read_at = {}  # input -> (where the region first reads it, its storages)
        for i in inputs:
            readers = [self.order[u] for u in i.users if u in rset]
            if readers:
                read_at[i] = (min(readers), _storages([i]))
        for u in self.nodes[first : last + 1]:
            if u in rset:
                continue
            targets = _written(u)
            if targets is None:
                continue
            stores = _storages(targets)
            for i, (at, own) in read_at.items():
                if at < self.order[u] and (stores is None or own is None or own & stores):
                    raise _Reject(f"{u.name} writes into {i.name} (or memory it shares) between the attention's "
                                  "scores and its output")

    def bias_value(self, node: Any) -> Optional[float]:
        """``_additive_mask_value(node)``, provided nothing in the graph writes into a tensor the
        proof reads (nor into memory it shares), nor writes somewhere unknown."""
        seen: list = []
        c = _additive_mask_value(node, seen)
        return c if c is not None and self._unwritten(seen) else None

    def constant_over(self, node: Any, dim: int) -> bool:
        """``_constant_over(node, dim)``, provided nothing in the graph writes into a tensor the
        proof reads (``mask[:, :, i, j] = False`` after a ``repeat``)."""
        seen: list = []
        return _constant_over(node, dim, seen=seen) and self._unwritten(seen)

    def _over_heads(self, mask: Any, heads: Any) -> bool:
        """Whether a 4-D mask (B, H, *, S) holds the same values for every head."""
        if self.constant_over(mask, -3):
            return True
        chain, x = [], mask  # the nodes the structural proof reads: the mask and its first inputs
        while isinstance(x, fx.Node) and len(chain) < 6:
            chain.append(x)
            x = x.args[0] if x.args else None
        return _same_over_heads(mask, heads) and self._unwritten(chain)

    def _unwritten(self, seen: list) -> bool:
        """Whether nothing in the graph writes into the tensors ``seen`` (nor into memory they
        share), nor somewhere unknown."""
        if self._written_storages is None:
            written: Optional[set] = set()
            for u in self.nodes:
                targets = _written(u)
                if targets is None:
                    continue
                st = _storages(targets)
                if st is None:
                    written = None
                    break
                written |= st
            self._written_storages = written if written is not None else False
        if self._written_storages is False:
            return False
        st = _storages(seen)
        return st is not None and not (st & self._written_storages)

    def _private_write(self, n: fx.Node, rset: set) -> bool:
        """Whether the in-place op ``n`` of the region (``s += bias``, ``s *= c``, ``s.mul_(c)``)
        writes into a tensor only the region sees, after its every other read (``s -= s.amax(...)``):
        then it is its out-of-place form. The region's nodes feed only the region (checked), so
        views of the target are region nodes too."""
        t = n.args[0] if n.args else None
        if not isinstance(t, fx.Node) or t not in rset or t.op == "placeholder":
            return False
        if n in self.statement_writes:
            return True
        return all(u is n or (u in rset and self.order[u] < self.order[n]) for u in t.users)

    def _statement_write(self, t: fx.Node, reader: fx.Node) -> Optional[fx.Node]:
        """The in-place op written as a statement on the scores (``s.masked_fill_(m, -inf)``,
        ``s.mul_(c)``, ``s += b`` when Dynamo keeps reading ``s``) between ``t``'s creation and its
        one reader ``reader``: the only other user of ``t``, writing into it, its result unused.
        The walk takes it as the step from ``t`` to ``reader``."""
        users = set(t.users)
        if len(users) != 2 or reader not in users:
            return None
        (w,) = users - {reader}
        if not (_mutates(w) and w.args and w.args[0] is t and not w.users and self.order[w] < self.order[reader]):
            return None
        self._note_statement_write(w, reader)
        return w

    def _note_statement_write(self, w: fx.Node, reader: fx.Node) -> None:
        """Record that ``reader`` sees what the in-place statement ``w`` wrote (an edge of the
        networkx graphs: post-dominance then holds through ``w``)."""
        if w not in self.statement_writes:
            self.statement_writes[w] = reader
            self._nx = self._postdom = None  # the graphs gain the edge w -> reader

    def _zero_bias(self, node: fx.Node, reader: fx.Node) -> Optional[tuple]:
        """``("zero", None)`` when ``node`` is a tensor of zeros the graph makes (``torch.zeros``,
        ``zeros_like``, ``new_zeros``, ``full(size, 0)``) read only by ``reader``; ``("fill", w)``
        when, besides, one ``w = node.masked_fill_(mask, value)`` writes into it before ``reader``
        (torch's documented SDPA reference and HunyuanVideo's "vanilla" attention build their mask
        so); else None."""
        t = _tensor(node)
        if t is None or not t.dtype.is_floating_point:
            return None
        if _is_fn(node, {torch.zeros, torch.zeros_like}, ("new_zeros",)):
            pass
        elif not (_is_fn(node, {torch.full}) and len(node.args) >= 2 and _const_number(node.args[1]) == 0.0):
            return None
        others = set(node.users) - {reader}
        if not others:
            return ("zero", None)
        if len(others) == 1:
            (w,) = others
            if (_is_fn(w, set(), ("masked_fill_",)) and w.args and w.args[0] is node and not w.users
                    and self.order[w] < self.order[reader]):
                return ("fill", w)
        return None

    # -------------------------------------------------------------- sdpa
    def match_sdpa(self, node: fx.Node) -> SiteMatch:
        a = {}
        for i, name in enumerate(_SDPA_ARGS):
            if i < len(node.args):
                a[name] = node.args[i]
            elif name in node.kwargs:
                a[name] = node.kwargs[name]
            else:
                a[name] = _SDPA_DEFAULTS.get(name)
        q, k, v = a["query"], a["key"], a["value"]
        if not all(isinstance(x, fx.Node) and _tensor(x) is not None for x in (q, k, v)):
            raise _Reject("query/key/value are not tensors of the graph")
        tq, tk, tv = _tensor(q), _tensor(k), _tensor(v)
        nd = tq.dim()
        if nd < 2 or tk.dim() != nd or tv.dim() != nd:
            raise _Reject(f"query/key/value ranks {tq.dim()}/{tk.dim()}/{tv.dim()}")
        info = SiteInfo(name="", pattern="sdpa")
        m = SiteMatch(info=info, output=node, q=q, k=k, v=v, nb=nd - 2, scale=0.0, region=[node])
        notes: list[str] = []
        dense: list[str] = []
        # scale
        scale = a["scale"]
        d = tq.shape[-1]
        if scale is None:
            hd = _hint(d)
            m.scale = 1.0 / math.sqrt(hd) if hd else 0.0
            info.scale = m.scale if isinstance(size_of(d), int) else None
        elif _const_number(scale) is not None:
            m.scale = info.scale = float(scale)
        else:
            dense.append(SCALE_NOT_CONSTANT)
        # mask
        mask = a["attn_mask"]
        if mask is not None:
            if not isinstance(mask, fx.Node) or _tensor(mask) is None:
                dense.append("attn_mask is not a tensor of the graph")
                info.mask = "other"
            else:
                m.mask = mask
        dropout = a["dropout_p"]
        if isinstance(dropout, fx.Node) or (_const_number(dropout) or 0.0) != 0.0:
            dense.append(f"dropout_p={dropout}: the kernels have no dropout")
        causal = a["is_causal"]
        if isinstance(causal, fx.Node):
            dense.append("is_causal is not a constant")
        info.is_causal = bool(causal) if not isinstance(causal, fx.Node) else False
        gqa = a["enable_gqa"]
        self.describe(m, gqa=bool(gqa) if not isinstance(gqa, fx.Node) else False, notes=notes, dense=dense)
        return m

    # -------------------------------------------------------------- matmul-softmax
    def match_softmax(self, sm: fx.Node) -> SiteMatch:
        x, dim, sm_dtype, inner = _softmax_parts(sm)
        nd = _ndim(x)
        if nd is None or nd < 2:
            raise _Reject("softmax input of unknown rank")
        if _norm_dim(dim, nd) != nd - 1:
            raise _Reject(f"softmax over dim {dim}, not the last")
        region = [sm] + inner
        dense: list[str] = []
        scale = 1.0
        scale_const = True
        mask_node = None
        mask_invert = False
        mask_kind = "none"
        mask_bias = None  # c of a key mask written as a 0 / c bias (see SiteMatch.mask_bias)
        empty_rows = None  # see SiteMatch.empty_rows
        # ---- backwards from the softmax to the scores matmul
        cur = x
        qk = None
        nd_s = nd  # the rank of the scores where the walk is (leading-dim views change it)
        mask_rank = nd
        reader = region[-1]  # the region node that reads cur (the walk goes against the data flow)
        while True:
            if not isinstance(cur, fx.Node):
                raise _Reject("softmax input is not a graph node")
            w = self._statement_write(cur, reader) if cur not in region else None
            if w is not None:  # s.masked_fill_(m, -inf) as a statement: the reader sees the write
                region.append(cur)
                cur = w
            elif _is_fn(cur, _MATMUL_FNS, _MATMUL_METHODS) or _is_fn(cur, _BADDBMM_FNS, ("baddbmm",)) or _is_fn(cur, _EINSUM_FNS):
                qk = cur
                region.append(cur)
                break
            region.append(cur)
            reader = cur
            src = _cast_src(cur)
            if src is not None:
                cur = src
                continue
            sf = None
            for cand in cur.args[:2]:
                if isinstance(cand, fx.Node) and _tensor(cand) is not None and _ndim(cand) == nd_s:
                    sf = _scalar_factor(cur, cand)
                    if sf is not None:
                        src = cand
                        break
            if sf is not None:
                if sf[0] == "ok":
                    scale *= sf[1]
                    cur = src
                    continue
                # a multiply by a tensor (a tensor scale, or some other op): not attention as served;
                # by a symbolic number (a SymFloat of a dynamic head dim): a non-constant scale
                other = [o for o in (*cur.args[:2], *cur.kwargs.values()) if o is not src][:1]
                if not other or (isinstance(other[0], fx.Node) and _tensor(other[0]) is not None) or not isinstance(other[0], fx.Node):
                    raise _Reject("the scores are multiplied or divided by a tensor")
                scale_const = False
                dense.append(SCALE_NOT_CONSTANT)
                cur = src
                continue
            if _is_fn(cur, _ADD_FNS, ("add", "__add__", "__radd__", "add_", "__iadd__")):
                a0, a1 = cur.args[0], cur.args[1] if len(cur.args) > 1 else cur.kwargs.get("other")
                if cur.kwargs.get("alpha", 1) != 1:
                    raise _Reject("add with alpha")
                s_in, other = (a0, a1) if self._on_path(a0, nd_s) else (a1, a0)
                if not isinstance(s_in, fx.Node):
                    raise _Reject("add of constants")
                bias = self._zero_bias(other, cur) if isinstance(other, fx.Node) else None
                if bias is not None:  # torch's documented SDPA reference: s += zeros (masked_fill_-ed)
                    region.append(other)
                    if bias[0] == "fill":
                        w = bias[1]
                        # the fill joins the region, read by the add: a later write into its mask
                        # is then one into an input the region has read
                        region.append(w)
                        self._note_statement_write(w, cur)
                        mask_kind, mask_node, mask_invert, empty_rows = _fill_mask(
                            ("masked_fill_ of a zero bias", "mask", "value"), _get(w, 1, "mask"), _get(w, 2, "value"),
                            True, mask_kind, mask_node, mask_invert, dense, scale, shift_dtype=_tensor(cur).dtype,
                        )
                        mask_rank = nd_s
                    cur = s_in
                    continue
                c = self.bias_value(other) if isinstance(other, fx.Node) else None
                if c is not None and _masks_out(c * scale) and mask_kind == "none":
                    # a key mask written as a bias (0 / -inf): the scores' key mask (SiteMatch.mask_bias)
                    mask_kind, mask_node, mask_invert, mask_bias = "bool", other, False, c
                    empty_rows = _bias_empty_rows(c, _tensor(cur).dtype)
                    mask_rank = nd_s
                    cur = s_in
                    continue
                if mask_node is not None or mask_kind != "none":
                    dense.append("more than one mask")
                mask_kind = "other"
                if isinstance(other, fx.Node) and _tensor(other) is not None:
                    mask_node = other
                    t = _tensor(other)
                    if t.dtype == torch.bool:
                        dense.append("a boolean mask added to the scores")
                    else:
                        dense.append("float additive mask")
                    mask_node = other
                elif _const_number(other) is None:
                    raise _Reject("add of a non-tensor")
                else:  # + constant: softmax is shift invariant, but keep it honest
                    dense.append("a constant is added to the scores")
                cur = s_in
                continue
            if _is_fn(cur, _MASKED_FILL_FNS, ("masked_fill", "masked_fill_")):
                s_in = cur.args[0]
                mk = _get(cur, 1, "mask")
                val = _get(cur, 2, "value")
                mask_kind, mask_node, mask_invert, empty_rows = _fill_mask(
                    ("masked_fill", "mask", "value"), mk, val, True, mask_kind, mask_node, mask_invert, dense, scale
                )
                mask_rank = nd_s
                cur = s_in
                continue
            if _is_fn(cur, _WHERE_FNS, ("where",)) and len(cur.args) == 3:
                cond, a_, b_ = cur.args
                for i_, (t_, o_) in enumerate(((a_, b_), (b_, a_))):
                    c_ = _full_like_value(o_, t_)
                    if c_ is not None:  # where(c, s, full_like(s, -inf)): a constant fill
                        region.append(o_)
                        a_, b_ = (t_, c_) if i_ == 0 else (c_, t_)
                        break
                if self._on_path(a_, nd_s) and not self._on_path(b_, nd_s):
                    s_in, fill, inv = a_, b_, False
                elif self._on_path(b_, nd_s) and not self._on_path(a_, nd_s):
                    s_in, fill, inv = b_, a_, True
                else:
                    raise _Reject("where over two tensors")
                mask_kind, mask_node, mask_invert, empty_rows = _fill_mask(
                    ("where", "condition", "fill"), cond, fill, inv, mask_kind, mask_node, mask_invert, dense, scale
                )
                mask_rank = nd_s
                cur = s_in
                continue
            if _is_fn(cur, _SUB_FNS, ("sub", "__sub__", "sub_", "__isub__")) and len(cur.args) == 2 and not cur.kwargs:
                chain = _row_max_nodes(cur.args[1], cur.args[0]) if isinstance(cur.args[0], fx.Node) else None
                if chain is not None:  # x - x.amax(-1, keepdim=True): softmax is shift invariant
                    region.extend(chain)
                    cur = cur.args[0]
                    continue
            src = _leading_view_src(cur)
            if src is not None:
                cur, nd_s = src, _ndim(src)
                continue
            raise _Reject(f"{cur.name} ({_target_str(cur.target)}) between the scores and the softmax")
        if mask_kind == "bool" and mask_rank != nd:  # its dims are not those of q's batch dims
            mask_kind = "other"
            dense.append("a boolean mask applied to a reshaped view of the scores")
        # ---- the scores matmul: q and k in standard form
        q_perm = k_perm = None
        k_unsqueeze = v_unsqueeze = ()  # size-1 dims inserted after the permutation (broadcast batch dims)
        k_transpose = False
        einsum_batch = None
        if _is_fn(qk, _EINSUM_FNS):
            parsed = _einsum_operands(qk)
            if parsed is None:
                raise _Reject("scores einsum not of two operands")
            ta, tb, to, qa, kb = parsed
            contracted = [c for c in ta if c in tb and c not in to and c != "."]
            qi = [c for c in ta if c in to and c not in tb]
            ki = [c for c in tb if c in to and c not in ta]
            if len(to) >= 2 and to[-1] in qi and to[-2] in ki:  # written k first: einsum("..kd,..qd->..qk", k, q)
                ta, tb, qa, kb, qi, ki = tb, ta, kb, qa, ki, qi
            # batch dims of q that k lacks and broadcasts over (MQA: einsum("bhid,bjd->bhij", q, k))
            k_missing = [c for c in qi if c in to[:-2]]
            qi = [c for c in qi if c not in k_missing]
            batch = [c for c in to if c in ta and c in tb]
            if len(contracted) != 1 or len(qi) != 1 or len(ki) != 1 or len(to) != len(batch) + len(k_missing) + 2:
                raise _Reject(f"scores einsum {qk.args[0]!r} is not q.k^T")
            if (to[-2:] != qi[0] + ki[0] or set(ta) != set(batch) | set(k_missing) | {qi[0], contracted[0]}
                    or set(tb) != set(batch) | {ki[0], contracted[0]}):
                raise _Reject(f"scores einsum {qk.args[0]!r} is not q.k^T")
            bstr = to[:-2]
            q_perm = _perm_to(ta, bstr + qi[0] + contracted[0])
            k_perm = _perm_to(tb, "".join(batch) + ki[0] + contracted[0])
            k_unsqueeze = tuple(i for i, c in enumerate(bstr) if c in k_missing)
            if k_unsqueeze and "." in bstr:
                raise _Reject("einsum broadcast with an ellipsis")
            if q_perm is None or k_perm is None:
                raise _Reject("einsum layout")
            einsum_batch = (bstr, qi[0], ki[0])
            qa_node, kb_node = qa, kb
            k_is_t = False
        elif _is_fn(qk, _BADDBMM_FNS, ("baddbmm",)):
            inp = _get(qk, 0, "input")
            qa_node, kb_node = _get(qk, 1, "batch1"), _get(qk, 2, "batch2")
            beta = qk.kwargs.get("beta", 1)
            alpha = qk.kwargs.get("alpha", 1)
            after_input = scale  # the factor the input (a bias) is scaled by on its way to the softmax
            if _const_number(alpha) is None:
                dense.append("baddbmm alpha is not a constant")
                scale_const = False
            else:
                scale *= float(alpha)
            c = self.bias_value(inp) if isinstance(inp, fx.Node) else None
            if (_const_number(beta) == 1.0 and c is not None and _masks_out(c * after_input) and mask_kind == "none"
                    and nd_s == nd):
                # diffusers' AttnProcessor: baddbmm(bias, q, k^T, beta=1, alpha=scale), a key mask as a bias
                mask_kind, mask_node, mask_invert, mask_bias = "bool", inp, False, c
                empty_rows = _bias_empty_rows(c, _tensor(qk).dtype)
            elif _const_number(beta) is None or float(beta) != 0.0:
                if mask_kind != "none":
                    dense.append("more than one mask")
                mask_kind = "other"
                dense.append("float additive mask (baddbmm input)")
                if isinstance(inp, fx.Node):
                    mask_node = inp if mask_node is None else mask_node
            elif isinstance(inp, fx.Node) and list(inp.users) == [qk] and inp.op == "call_function" and not any(
                isinstance(a_, fx.Node) and _tensor(a_) is not None for a_ in inp.args
            ):
                region.append(inp)  # the torch.empty(...) that beta=0 ignores
            k_is_t = True
        else:
            if len(qk.args) != 2:
                raise _Reject("matmul arity")
            qa_node, kb_node = qk.args
            k_is_t = True
        if not isinstance(qa_node, fx.Node) or not isinstance(kb_node, fx.Node):
            raise _Reject("scores operands are not graph tensors")
        # scale on q (and k), transposes of k
        qa_node, f, _ = self._strip_scale(qa_node, qk, region, allow_swap=False)
        scale *= f[0]
        if f[1]:
            dense.append(SCALE_NOT_CONSTANT)
            scale_const = False
        kb_node, f, swaps = self._strip_scale(kb_node, qk, region, allow_swap=k_is_t)
        scale *= f[0]
        if f[1]:
            dense.append(SCALE_NOT_CONSTANT)
            scale_const = False
        if k_is_t:
            k_transpose = swaps % 2 == 0  # kb is k^T after an even number of swaps
        else:
            if swaps:
                raise _Reject("einsum operand transposed")
        # ---- forwards from the softmax to the probs @ v matmul
        cur = sm
        drop = None
        while True:
            u = _only_user(cur)
            if u is None:
                raise _Reject(f"the softmax result {cur.name} has {len(cur.users)} users")
            if _cast_src(u) is cur:
                region.append(u)
                cur = u
                continue
            ds = _dropout_src(u)
            if ds is not None and ds[0] is cur:
                drop = ds
                region.append(u)
                cur = u
                continue
            break
        pv = u
        v_perm = None
        out_perm = None
        if _is_fn(pv, _MATMUL_FNS, _MATMUL_METHODS):
            if len(pv.args) != 2 or pv.args[0] is not cur or pv.args[1] is cur:
                raise _Reject("the probabilities are not the left operand of the output matmul")
            v_node = pv.args[1]
        elif _is_fn(pv, _EINSUM_FNS):
            parsed = _einsum_operands(pv)
            if parsed is None:
                raise _Reject("output einsum not of two operands")
            ta, tb, to, pa, vb = parsed
            if pa is cur and vb is not cur:
                tp, tv, v_node = ta, tb, vb
            elif vb is cur and pa is not cur:
                tp, tv, v_node = tb, ta, pa
            else:
                raise _Reject("output einsum operands")
            # the probs tensor is in the scores layout (*batch, S_q, S_kv): label its dims by
            # position with digits (never einsum letters): batch "0", "1", ..., S_q "8", S_kv "9".
            nb_ = nd - 2
            if tp.startswith("."):
                if einsum_batch is None or not einsum_batch[0].startswith("."):
                    raise _Reject("output einsum ellipsis")
                std = "." + "".join(str(i) for i in range(len(tp) - 3)) + "89"
            else:
                if len(tp) != nd:
                    raise _Reject("output einsum rank")
                std = "".join(str(i) for i in range(nb_)) + "89"
            ren = dict(zip(tp, std))
            bstr, qc, kc = std[:-2], "8", "9"
            tv_r = "".join(ren.get(c, c) for c in tv)
            to_r = "".join(ren.get(c, c) for c in to)
            e = [c for c in tv_r if c not in bstr + qc + kc]
            v_batch = "".join(c for c in bstr if c in tv_r)  # v may lack batch dims it broadcasts over
            if (
                len(e) != 1
                or kc not in tv_r
                or qc in tv_r
                or kc in to_r
                or set(tv_r) != set(v_batch) | {kc, e[0]}
                or set(to_r) != set(bstr) | {qc, e[0]}
            ):
                raise _Reject(f"output einsum {pv.args[0]!r} does not contract the key dim with v")
            v_perm = _perm_to(tv_r, v_batch + kc + e[0])
            v_unsqueeze = tuple(i for i, c in enumerate(bstr) if c not in tv_r)
            if v_unsqueeze and "." in bstr:
                raise _Reject("output einsum broadcast with an ellipsis")
            std_out = bstr + qc + e[0]
            out_perm = _perm_to(std_out, to_r)
            if v_perm is None or out_perm is None:
                raise _Reject("output einsum layout")
            if _is_identity(out_perm):
                out_perm = None
        else:
            raise _Reject(f"the probabilities feed {pv.name} ({pv.target}), not a matmul with v")
        if not isinstance(v_node, fx.Node) or _tensor(v_node) is None:
            raise _Reject("v is not a graph tensor")
        region.append(pv)
        qa_node, kb_node = _drop_upcasts(qa_node, kb_node, v_node, region)
        # ---- shapes: q (*b, S_q, D), k (*b, S_kv, D), v (*b, S_kv, D_v)
        tq = _permuted_shape(_tensor(qa_node), q_perm)
        tk = _unsqueezed(_permuted_shape(_tensor(kb_node), k_perm), k_unsqueeze)
        if k_transpose and tk is not None:
            tk = tk[:-2] + [tk[-1], tk[-2]]
        tv = _unsqueezed(_permuted_shape(_tensor(v_node), v_perm), v_unsqueeze)
        if tq is None or tk is None or tv is None:
            raise _Reject("unknown operand shapes")
        if not (len(tq) == len(tk) == len(tv)) or len(tq) < 2:  # more than 4-D: a dense site (describe)
            raise _Reject(f"operand ranks {len(tq)}/{len(tk)}/{len(tv)} are not those of q, k, v")
        if not _equal(tq[-1], tk[-1]) or not _equal(tk[-2], tv[-2]):
            raise _Reject("contraction dims do not line up")
        sc = _tensor(x)
        if sc is None or sc.dim() != len(tq) or not _equal(sc.shape[-2], tq[-2]) or not _equal(sc.shape[-1], tk[-2]):
            raise _Reject("scores are not (..., S_q, S_kv)")
        m = SiteMatch(
            info=SiteInfo(name="", pattern="matmul_softmax"),
            output=pv,
            q=qa_node,
            k=kb_node,
            v=v_node,
            nb=len(tq) - 2,
            scale=scale,
            region=_dedup(region),
            q_perm=q_perm,
            k_perm=k_perm,
            v_perm=v_perm,
            k_unsqueeze=k_unsqueeze,
            v_unsqueeze=v_unsqueeze,
            k_transpose=k_transpose,
            out_perm=out_perm,
        )
        m.info.scale = scale if scale_const else None
        if mask_kind == "bool":
            m.mask, m.mask_invert, m.mask_bias, m.empty_rows = mask_node, mask_invert, mask_bias, empty_rows
        elif mask_kind == "other":
            m.info.mask = "other"
        if drop is not None:
            _, p, training = drop
            if isinstance(p, fx.Node) or isinstance(training, fx.Node):
                dense.append("dropout is not a constant")
            elif (_const_number(p) or 0.0) != 0.0 and training:
                dense.append(f"dropout p={p} in training mode: the kernels have no dropout")
        inputs = [qa_node, kb_node, v_node] + ([mask_node] if isinstance(mask_node, fx.Node) else [])
        extra_inputs = [a_ for n in m.region for a_ in n.all_input_nodes if a_ not in m.region and a_ not in inputs]
        self.check_region(m.region, inputs + extra_inputs, pv)
        if sm_dtype is not None and not isinstance(sm_dtype, torch.dtype):
            raise _Reject("softmax dtype")
        self.describe(m, gqa=True, notes=[], dense=dense, shapes=(tq, tk, tv))
        # q, k, v must be of one dtype for the op; the output's dtype is restored by the rewrite
        return m

    def _on_path(self, n: Any, nd: int) -> bool:
        t = _tensor(n)
        return isinstance(n, fx.Node) and t is not None and t.dim() == nd and t.dtype.is_floating_point and self._reaches_matmul(n)

    def _reaches_matmul(self, n: fx.Node, depth: int = 12) -> bool:
        cur = n
        for _ in range(depth):
            if _is_fn(cur, _MATMUL_FNS, _MATMUL_METHODS) or _is_fn(cur, _BADDBMM_FNS, ("baddbmm",)) or _is_fn(cur, _EINSUM_FNS):
                return True
            nxt = [a for a in cur.args if isinstance(a, fx.Node) and _tensor(a) is not None and _tensor(a).dtype.is_floating_point]
            if not nxt:
                return False
            cur = nxt[0]
        return False

    def _strip_scale(self, node: fx.Node, user: fx.Node, region: list, allow_swap: bool):
        """Walk back from a scores operand through constant scalings (and, for k^T, swaps of the
        last two dims) whose only user is the chain. Returns (base node, (factor, nonconst), swaps)
        (the swaps count only with allow_swap)."""
        factor = 1.0
        nonconst = False
        swaps = 0
        cur = node
        nxt_user = user
        while isinstance(cur, fx.Node) and list(cur.users) == [nxt_user]:
            src = _is_swap_last2(cur) if allow_swap else None
            if src is not None:
                swaps += 1
                region.append(cur)
                nxt_user, cur = cur, src
                continue
            done = False
            for cand in cur.args[:2]:
                if isinstance(cand, fx.Node) and _tensor(cand) is not None and _tensor(cand).dim() == _ndim(cur):
                    sf = _scalar_factor(cur, cand)
                    if sf is not None and sf[0] == "ok":
                        factor *= sf[1]
                        region.append(cur)
                        nxt_user, cur = cur, cand
                        done = True
                    break
            if not done:
                break
        return cur, (factor, nonconst), swaps

    # -------------------------------------------------------------- describe + decide
    def describe(self, m: SiteMatch, gqa: bool, notes: list, dense: list, shapes=None) -> None:
        info = m.info
        cfg = self.config
        if shapes is None:
            tq, tk, tv = (list(_tensor(n).shape) for n in (m.q, m.k, m.v))
        else:
            tq, tk, tv = shapes
        nb = m.nb
        tqt = _tensor(m.q)
        info.dtype = str(tqt.dtype).replace("torch.", "")
        info.device = str(tqt.device)
        s_q, s_kv, d, dv = tq[-2], tk[-2], tq[-1], tv[-1]
        info.seq_len_q, info.seq_len_kv, info.head_dim, info.head_dim_v = (size_of(s) for s in (s_q, s_kv, d, dv))
        if not _equal(tq[-1], tk[-1]):
            raise _Reject("q and k head dims differ")
        if not _equal(tk[-2], tv[-2]):
            raise _Reject("k and v sequence lengths differ")
        # batch dims
        bq, bk, bv = tq[:nb], tk[:nb], tv[:nb]
        if not all(_equal(x, y) for x, y in zip(bk, bv)):
            dense.append("key and value batch dims differ")
        if nb == 2:
            info.batch, info.num_heads, info.num_kv_heads = size_of(bq[0]), size_of(bq[1]), size_of(bk[1])
            if not _equal(bq[0], bk[0]):
                dense.append("query and key batch sizes differ (broadcast)")
            if not _equal(bq[1], bk[1]):
                hq, hk = _hint(bq[1]), _hint(bk[1])
                if not (isinstance(size_of(bq[1]), int) and isinstance(size_of(bk[1]), int)):
                    dense.append("symbolic GQA head counts")
                elif hk == 0 or hq % hk:
                    dense.append(f"num_kv_heads {hk} does not divide num_heads {hq}")
                elif not gqa and hk != 1:
                    dense.append("key/value heads differ from query heads without enable_gqa")
        elif nb == 1:
            info.batch, info.num_heads, info.num_kv_heads = 1, size_of(bq[0]), size_of(bk[0])
            if not _equal(bq[0], bk[0]):
                dense.append("query and key batch sizes differ (broadcast)")
        elif nb == 0:
            info.batch = info.num_heads = info.num_kv_heads = 1
        else:
            info.batch = size_of(bq[0])
            info.num_heads = size_of(math.prod(_hint(x) or 0 for x in bq[1:])) if bq else 1
            info.num_kv_heads = info.num_heads
            dense.append(f"{nb + 2}-D inputs (the kernels serve up to 4-D)")
        # mask
        if m.mask is not None and info.mask == "none":
            kind, why, layout = self.mask_kind(m, tq, tk)
            info.mask = kind
            if why:
                dense.append(why)
            if layout == "n1":
                m.layout = "n1"
                info.batch, info.num_heads, info.num_kv_heads = info.num_heads, 1, 1
        if nb == 1 and m.layout != "n1":
            m.layout = "1n"
        elif nb == 0:
            m.layout = "11"
        # decision
        reasons: list[str] = []
        reasons += dense
        if info.is_causal:
            reasons.append("is_causal=True: the kernels serve non-causal attention")
        if info.mask == "key_padding" and cfg.block_n != 1:
            reasons.append(f"key-padding mask with block_n={cfg.block_n} (served with block_n == 1 only)")
        # a self-attention of a symbolic length serves every length the graph runs: the runtime runs
        # its calls shorter than min_seq_len dense (a short example, e.g. a small warm-up call that
        # made Dynamo recompile with dynamic sizes, must not leave the long calls dense)
        # (k of its own graph input has its own symbol: equal example sizes count as the same length)
        dyn_self = not isinstance(size_of(s_q), int) and (
            _same(s_q, s_kv) or (not isinstance(size_of(s_kv), int) and _hint(s_q) is not None and _hint(s_q) == _hint(s_kv))
        )
        # likewise a symbolic length beside a static long one (one graph serving a self-attention
        # and a cross-attention of the same code, e.g. Wan2.1's attention(): Dynamo made the key
        # length dynamic when the short cross-attention call came; under dynamic=True, where every
        # length is symbolic, a cross-attention to text stays dense)
        dyn_short = [
            not isinstance(size_of(s), int) and isinstance(size_of(o), int) and size_of(o) >= cfg.min_seq_len
            for s, o in ((s_q, s_kv), (s_kv, s_q))
        ]
        for what, s, beside_long in (("seq_len_q", s_q, dyn_short[0]), ("seq_len_kv", s_kv, dyn_short[1])):
            h = _hint(s)
            if h is None:
                reasons.append(f"{what} {size_of(s)} has no size hint")
            elif h < cfg.min_seq_len and not dyn_self and not beside_long:
                reasons.append(f"{what} {size_of(s)}{'' if isinstance(size_of(s), int) else f' (={h})'} < min_seq_len {cfg.min_seq_len} (cross or short attention)")
        if not isinstance(info.head_dim, int):
            reasons.append(f"symbolic head dim {info.head_dim}")
        elif info.head_dim not in SERVED_HEAD_DIMS:
            reasons.append(f"head_dim {info.head_dim} not in {SERVED_HEAD_DIMS}")
        if info.head_dim_v != info.head_dim:
            reasons.append(f"value head dim {info.head_dim_v} != head_dim {info.head_dim}")
        if cfg.block_m not in TRITON_BLOCK_M and (cfg.impl == "triton" or (cfg.impl == "auto" and info.device.startswith("cuda"))):
            reasons.append(f"block_m {cfg.block_m}: the Triton kernels take {TRITON_BLOCK_M}")
        dts = {str(_tensor(n).dtype).replace("torch.", "") for n in (m.q, m.k, m.v)}
        if len(dts) != 1:
            reasons.append(f"q/k/v dtypes differ ({', '.join(sorted(dts))})")
        elif info.dtype not in SERVED_DTYPES:
            reasons.append(f"dtype {info.dtype} not in {SERVED_DTYPES}")
        if info.scale is None and not any("scale" in r or "symbolic head dim" in r for r in reasons):
            reasons.append(SCALE_NOT_CONSTANT)
        elif info.scale is not None and not (math.isfinite(info.scale) and info.scale > 0):
            reasons.append(f"scale {info.scale:g} is not a finite number > 0 (the sparse kernels need one)")
        info.reason = ""
        if reasons:
            info.decision = "dense"
            info.reason = "; ".join(_dedup(reasons))
        else:
            info.decision = "sparse"
            extra = list(notes)
            if info.mask == "key_padding":
                extra.append("key-padding mask folded into the sparsity")
            if info.num_kv_heads != info.num_heads:
                extra.append(f"GQA {info.num_heads}/{info.num_kv_heads}")
            if dyn_self:
                extra.append(f"dynamic sequence length (example {_hint(s_q)}): calls shorter than min_seq_len "
                             f"{cfg.min_seq_len} run dense")
            elif any(dyn_short) and min(_hint(s_q), _hint(s_kv)) < cfg.min_seq_len:
                extra.append(f"dynamic sequence length (example {_hint(s_q)}x{_hint(s_kv)}): calls shorter than "
                             f"min_seq_len {cfg.min_seq_len} run dense")
            elif any(not isinstance(getattr(info, f), int) for f in ("seq_len_q", "seq_len_kv")):
                extra.append(f"dynamic sequence length, decided on its example size {_hint(s_q)}x{_hint(s_kv)}")
            if cfg.predictor == "dense":
                extra.append('predictor="dense": the runtime runs it dense')
            info.run_dense = m.output.meta.get(RUN_DENSE, "") if m.info.pattern == "sdpa" else ""
            if info.run_dense:
                extra.append(f"runs dense at every call: {info.run_dense}")
            kind = "self-attention" if _same(s_q, s_kv) else "attention"
            size_ok = "" if dyn_self or min(_hint(s_q), _hint(s_kv)) < cfg.min_seq_len else f" >= min_seq_len {cfg.min_seq_len}"
            info.reason = kind + f" {info.seq_len_q}x{info.seq_len_kv}{size_ok}" + (
                "; " + "; ".join(extra) if extra else ""
            )

    def mask_kind(self, m: SiteMatch, tq, tk) -> tuple:
        """(kind, dense reason or "", layout or None) for a mask against the scores
        (*batch, S_q, S_kv). A 4-D mask ``pad_k & pad_q`` of a key-padding mask and a query-padding
        one (constant over the keys, e.g. the key mask transposed: HunyuanVideo-1.5's
        ``m & m.transpose(2, 3)``) at an SDPA site is a key-padding mask whose padded query rows
        give 0 (as eager SDPA gives them): ``m.mask`` becomes ``pad_k`` and ``m.q_mask`` ``pad_q``."""
        kind = self._mask_kind(m, tq, tk)
        if kind[0] == "key_padding" or m.nb != 2 or m.mask_invert or m.info.pattern != "sdpa":
            return kind  # (hand-written attention gives NaN or the mean of v, not 0, for a row with no key)
        ops = _and_operands(_strip_bool_cast(m.mask))
        if ops is None or _tensor(m.mask).dim() != 4:
            return kind
        whole = m.mask
        ops = tuple(_strip_bool_cast(x) for x in ops)
        for key_side, q_side in (ops, ops[::-1]):
            m.mask = key_side
            if self._mask_kind(m, tq, tk)[0] == "key_padding" and self._query_padding(q_side, tq):
                m.q_mask = q_side
                return "key_padding", "", None
        m.mask = whole
        return kind

    def _query_padding(self, node: Any, tq) -> bool:
        """Whether ``node`` (bool, 4-D, bool casts stripped) is constant over the keys, one row per
        batch over the heads: size 1 in its last dim or the last two dims of a key-padding-like
        mask swapped."""
        t = _tensor(node)
        if t is None or t.dtype != torch.bool or t.dim() != 4:
            return False
        if not (_is_one(t.shape[0]) or _equal(t.shape[0], tq[0])):
            return False  # another batch size
        if not (_is_one(t.shape[2]) or _equal(t.shape[2], tq[-2])):
            return False  # another query length
        if _is_one(t.shape[3]):
            return _is_one(t.shape[1]) or self._over_heads(node, tq[1])
        src = _is_swap_last2(node)
        ts = _tensor(src) if isinstance(src, fx.Node) else None
        if ts is None or ts.dim() != 4:
            return False
        return (_is_one(ts.shape[2]) or self.constant_over(src, -2)) and (_is_one(ts.shape[1]) or self._over_heads(src, tq[1]))

    def _mask_kind(self, m: SiteMatch, tq, tk) -> tuple:
        t = _tensor(m.mask)
        nb = m.nb
        shape = list(t.shape)
        full = nb + 2
        if t.dtype != torch.bool:
            if m.mask_bias is None:
                c = self.bias_value(m.mask)
                if c is None:
                    return "other", "float additive mask", None
                if not _masks_out(c):
                    return "other", f"float additive mask of 0 / {c:g} (not a -inf / very negative bias)", None
                m.mask_bias = c
                # SDPA's kernels add the mask in float32 (at least)
                m.empty_rows = _bias_empty_rows(c, torch.promote_types(_tensor(m.q).dtype, torch.float32))
        if len(shape) > full:
            return "other", f"attn_mask of shape {_fmt(shape)} is not a key-padding mask", None
        shape = [1] * (full - len(shape)) + shape
        bad = f"attn_mask of shape {_fmt(t.shape)} is not a key-padding mask"
        if not (_is_one(shape[nb]) or self.constant_over(m.mask, -2)):
            return "other", bad, None  # varies over the queries
        if not (_is_one(shape[nb + 1]) or _equal(shape[nb + 1], tk[-2])):
            return "other", bad, None
        if nb == 2:
            if not (_is_one(shape[1]) or self._over_heads(m.mask, tq[1])):
                return "other", bad, None
            if not (_is_one(shape[0]) or _equal(shape[0], tq[0])):
                return "other", bad, None
            return "key_padding", "", None
        if nb == 1:
            if _is_one(shape[0]):
                return "key_padding", "", None
            if _equal(shape[0], tq[0]):
                return "key_padding", "", "n1"
            return "other", bad, None
        if nb == 0:
            return "key_padding", "", None
        return "other", bad, None

    # -------------------------------------------------------------- driver
    def run(self) -> list[SiteMatch]:
        matches: list[SiteMatch] = []
        claimed: set = set()
        for node in list(self.graph.nodes):
            if node.op not in ("call_function", "call_method") or node in claimed:
                continue
            if node.op == "call_function" and _is_fn(node, _SDPA_TARGETS):
                kind = "sdpa"
            elif _is_softmax(node) is not None:
                kind = "softmax"
            else:
                opaque = _opaque_attention(node)
                if opaque is not None:
                    not_expanded = node.meta.get(FLASH_NOT_EXPANDED)
                    why = f" (not rewritten to SDPA: {not_expanded})" if not_expanded else ""
                    self.rejected.append((node.name, "opaque", f"{opaque}: an attention kernel the pass cannot see "
                                          f"into (one opaque call){why}, left as it is; call "
                                          "F.scaled_dot_product_attention there to make it a site"))
                continue
            try:
                m = self.match_sdpa(node) if kind == "sdpa" else self.match_softmax(node)
            except _Reject as e:
                log.debug("fgcompile: %s is not an attention site: %s", node.name, e)
                self.rejected.append((node.name, kind, str(e)))
                continue
            except Exception as e:  # a bug here must not cost the other sites (tests: strict)
                if strict_mode():
                    raise
                log.warning("fgcompile: could not analyse %s (%s: %s); left as it is", node.name, type(e).__name__, e)
                self.rejected.append((node.name, kind, f"could not be analysed ({type(e).__name__}: {e})"))
                continue
            if any(n in claimed for n in m.region):
                continue
            claimed.update(m.region)
            matches.append(m)
        matches.sort(key=lambda m: self.order[m.output])
        # names: module path, unique within the graph ("attention" in the compiled module's own
        # forward: under regional compilation its full name is then the block's path, as under a
        # whole-model compile)
        used: dict[str, int] = {}
        for m in matches:
            base = _module_path(m.output)
            if base is None:
                base, m.info.in_root = "attention", True
            n = used.get(base, 0)
            used[base] = n + 1
            m.info.name = base if n == 0 else f"{base}#{n}"
            m.info.call_site = _call_site(m.output)
        cfg = self.config
        for m in matches:
            if m.info.decision == "sparse" and cfg.is_dense_site(m.info.name):
                m.info.decision = "dense"
                m.info.reason = f"site {m.info.name} matches config.dense_sites {list(cfg.dense_sites)}"
        return matches


def _target_str(t: Any) -> str:
    """A node target for a message: ``"torch.tanh"``, ``"aten.tanh.default"``, ``"mul_"``."""
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", None)
    if name is None or isinstance(t, torch._ops.OpOverload):
        return str(t)
    mod = getattr(t, "__module__", None) or ("torch" if getattr(t, "__self__", None) is torch else None)
    return f"{mod.lstrip('_')}.{name}" if mod else name


def _dedup(xs: list) -> list:
    out, seen = [], set()
    for x in xs:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _is_identity(p: Any) -> bool:
    if p is None:
        return True
    if isinstance(p, tuple) and len(p) == 2 and p[0] == "ellipsis":
        return tuple(p[1]) == tuple(range(len(p[1])))
    return tuple(p) == tuple(range(len(p)))


def expand_perm(p: Any, ndim: int) -> Optional[tuple]:
    """A permutation from ``_perm_to`` (possibly over an ellipsis) as a full permutation of
    ``ndim`` dims, or None for the identity."""
    if p is None:
        return None
    if isinstance(p, tuple) and len(p) == 2 and p[0] == "ellipsis":
        tail = p[1]
        lead = ndim - len(tail)
        full = tuple(range(lead)) + tuple(lead + i for i in tail)
    else:
        full = tuple(p)
    return None if full == tuple(range(len(full))) else full


def _unsqueezed(shape: Optional[list], dims: Sequence[int]) -> Optional[list]:
    """``shape`` with size-1 dims inserted at ``dims`` (increasing positions of the result)."""
    if shape is None:
        return None
    shape = list(shape)
    for d in dims:
        shape.insert(d, 1)
    return shape


def _permuted_shape(t: Optional[torch.Tensor], perm: Any) -> Optional[list]:
    if t is None:
        return None
    shape = list(t.shape)
    full = expand_perm(perm, len(shape))
    if full is None:
        return shape
    if len(full) != len(shape):
        return None
    return [shape[i] for i in full]


def _fmt(shape: Sequence) -> str:
    return "(" + ", ".join(str(size_of(s)) for s in shape) + ")"


def find_attention_sites(gm: fx.GraphModule, config: FGAttnConfig, rejected: Optional[list] = None) -> list[SiteMatch]:
    """Every attention site of the Dynamo graph ``gm`` (in graph order), each with its
    ``SiteInfo`` (name, shapes, mask kind, decision and reason). The graph is not modified.
    ``rejected``: a list that gets ``(node name, "softmax" or "sdpa", why)`` for every softmax or
    SDPA node that is not served as an attention site (a spelling the pass does not follow)."""
    if not isinstance(config, FGAttnConfig):
        raise ValueError(f"config: expected an FGAttnConfig, got {type(config).__name__}")
    f = _Finder(gm, config)
    matches = f.run()
    if rejected is not None:
        rejected.extend(f.rejected)
    return matches
