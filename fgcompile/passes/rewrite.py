"""Replace matched attention sites by ``torch.ops.fgcompile.site_attention``.

For each chosen ``(SiteMatch, handle)``, new nodes are inserted just before the site's output:

    q4 = <permute / transpose / unsqueeze of the site's q>      (B, H, S_q, D)
    k4, v4 likewise                                              (B, H_kv, S_kv, D[_v])
    key_padding = <the bool mask, negated if it marks masked-out keys, reshaped to (B, S_kv)>
    out4 = torch.ops.fgcompile.site_attention(q4, k4, v4, key_padding, scale, handle)
    out  = <squeeze / permute / cast back to the site output's layout and dtype>

The new nodes get fake values (``meta["example_value"]``) computed under the graph's fake mode,
and the result is checked against the site output's fake value (shape and dtype) before anything
is replaced. Only then do the output's users switch to the new result, and the site's matched
region (and nothing else) is erased. A site whose rewrite fails is undone (its new nodes erased,
the graph unchanged), marked dense with the failure as its reason, and logged; with
``FGCOMPILE_STRICT=1`` the failure is raised instead.

Sizes come from the graph (``aten.sym_size`` nodes) where they are symbolic.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from ..config import strict_mode
from ..lowering import ops as _ops  # noqa: F401  (registers torch.ops.fgcompile.site_attention)
from .find_attention import SiteMatch, _bias_threshold, _hint, _val, expand_perm, size_of

__all__ = ["rewrite_sites", "rewrite_site"]

log = logging.getLogger("fgcompile")


class _Builder:
    """Inserts nodes before ``anchor``, computing their fake values; ``undo`` erases them."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, like: fx.Node):
        self.gm = gm
        self.graph = gm.graph
        self.anchor = anchor
        self.nodes: list[fx.Node] = []
        self.meta = {k: like.meta[k] for k in ("nn_module_stack", "stack_trace", "source_fn_stack") if k in like.meta}
        fake = like.meta.get("example_value")
        self.fake_mode = getattr(fake, "fake_mode", None)

    def _value(self, x: Any) -> Any:
        if isinstance(x, fx.Node):
            v = x.meta.get("example_value", x.meta.get("val"))
            if v is None:
                raise RuntimeError(f"node {x.name} has no example value")
            return v
        if isinstance(x, (list, tuple)):
            return type(x)(self._value(y) for y in x)
        if isinstance(x, dict):
            return {k: self._value(y) for k, y in x.items()}
        return x

    def _ctx(self):
        return self.fake_mode if self.fake_mode is not None else contextlib.nullcontext()

    def fn(self, target: Callable, *args: Any, value_fn: Optional[Callable] = None, **kwargs: Any) -> fx.Node:
        """``target(*args, **kwargs)`` as a new node; its fake value is that call on the inputs'
        fake values, or ``value_fn(*args' fake values)`` where given."""
        with self.graph.inserting_before(self.anchor):
            n = self.graph.call_function(target, tuple(args), dict(kwargs))
        self.nodes.append(n)
        n.meta.update(self.meta)
        with self._ctx():
            if value_fn is not None:
                n.meta["example_value"] = value_fn(*self._value(args))
            else:
                n.meta["example_value"] = target(*self._value(args), **self._value(kwargs))
        return n

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            n = self.graph.call_method(name, tuple(args), dict(kwargs))
        self.nodes.append(n)
        n.meta.update(self.meta)
        vals = self._value(args)
        with self._ctx():
            n.meta["example_value"] = getattr(vals[0], name)(*vals[1:], **self._value(kwargs))
        return n

    def size(self, node: fx.Node, dim: int) -> Any:
        """The size of ``node``'s dim: an int when static, else a sym_size node."""
        s = node.meta["example_value"].shape[dim]
        v = size_of(s)
        if isinstance(v, int):
            return v
        return self.fn(torch.ops.aten.sym_size.int, node, dim)

    def undo(self) -> None:
        for n in reversed(self.nodes):
            if n.users:
                for u in list(n.users):
                    if u not in self.nodes:
                        raise RuntimeError(f"cannot undo: {n.name} is used by {u.name}")
            self.graph.erase_node(n)
        self.nodes = []

    def replace_first_output(self, node: fx.Node, out: fx.Node) -> None:
        """Replace the first output of ``node`` (a call returning a tuple, read through
        ``getitem(node, i)``) by ``out``, built with this builder, and erase ``node`` and its
        getitems (the others must be unread). If ``out``'s shape or dtype differs from that
        output's, the new nodes are erased and RuntimeError raised, the graph unchanged."""
        first = next((u for u in node.users if u.args[1] == 0), None)
        old = _val(first) if first is not None else None
        new = out.meta["example_value"]
        if old is not None and (tuple(old.shape) != tuple(new.shape) or old.dtype != new.dtype):
            self.undo()
            raise RuntimeError(f"rewritten output {tuple(new.shape)} {new.dtype} != {tuple(old.shape)} {old.dtype}")
        for u in list(node.users):
            if u.args[1] == 0:
                u.replace_all_uses_with(out)
            self.graph.erase_node(u)
        self.graph.erase_node(node)


def failed_rewrite(rewrite: Callable[[], Any]) -> Optional[str]:
    """Run ``rewrite`` (a pass's rewrite of one node, which leaves the graph as it was when it
    raises): None if it succeeded, else why it failed ("TypeError: ..."). Nothing may crash a
    user's compile; under FGCOMPILE_STRICT=1 (the tests) the error is raised."""
    try:
        rewrite()
        return None
    except Exception as e:
        if strict_mode():
            raise
        return f"{type(e).__name__}: {e}"


def _std(b: _Builder, node: fx.Node, perm: Any, transpose: bool = False, unsqueeze: Sequence[int] = ()) -> fx.Node:
    t = node.meta["example_value"]
    full = expand_perm(perm, t.dim())
    if full is not None:
        node = b.method("permute", node, *full)
    for d in unsqueeze:  # batch dims the operand broadcasts over (SiteMatch.k_unsqueeze)
        node = b.method("unsqueeze", node, d)
    if transpose:
        node = b.method("transpose", node, -2, -1)
    return node


#: the size-1 dims a layout lacks (or has) against (B, H, S, D), in the order they are added
_MISSING_DIMS = {"bh": (), "1n": (0,), "n1": (1,), "11": (0, 0)}


def _layout_dims(b: _Builder, node: fx.Node, layout: str, method: str) -> fx.Node:
    if layout not in _MISSING_DIMS:
        raise ValueError(f"layout: unknown {layout!r}")
    for dim in _MISSING_DIMS[layout]:
        node = b.method(method, node, dim)
    return node


def _to4d(b: _Builder, node: fx.Node, layout: str) -> fx.Node:
    return _layout_dims(b, node, layout, "unsqueeze")


def _from4d(b: _Builder, node: fx.Node, layout: str) -> fx.Node:
    return _layout_dims(b, node, layout, "squeeze")


def _key_padding(b: _Builder, m: SiteMatch, q4: fx.Node, k4: fx.Node) -> Optional[fx.Node]:
    if m.mask is None:
        return None
    mk = m.mask
    if m.mask_bias is not None:  # a key mask written as a 0 / very negative bias
        mk = b.fn(torch.gt, mk, _bias_threshold(m.mask_bias, m.mask))
    if m.mask_invert:
        mk = b.fn(torch.logical_not, mk)
    full = m.nb + 2
    nd = mk.meta["example_value"].dim()
    for _ in range(full - nd):
        mk = b.method("unsqueeze", mk, 0)
    # (*batch, 1, S_kv or 1) -> (b0 or 1, S_kv or 1): drop the query dim and the head dim
    mk = b.method("select", mk, m.nb, 0)  # the query dim
    if m.nb == 2:
        mk = b.method("select", mk, 1, 0)  # the head dim
    elif m.nb == 0:
        mk = b.method("unsqueeze", mk, 0)
    batch = b.size(q4, 0)
    s_kv = b.size(k4, 2)
    mk = b.method("expand", mk, batch, s_kv)
    if m.empty_rows == "all":  # every key masked by one finite shift: softmax over all
        mk = b.fn(torch.logical_or, mk, b.fn(torch.logical_not, b.method("any", mk, -1, True)))
    return b.method("contiguous", mk)


def _uniform_empty_rows(b: _Builder, kp: fx.Node, o4: fx.Node, q4: fx.Node, v4: fx.Node) -> fx.Node:
    """``o4`` (B, H, S_q, D_v) with the rows of every batch item whose key mask ``kp`` (bool
    (B, S_kv), True = kept) keeps no key set to the mean of v over the keys, as eager gives where
    a finite fill replaces every score of such a row (``SiteMatch.empty_rows == "uniform"``).
    ``v4``: (B or 1, H_kv, S_kv, D_v), H_kv dividing H (GQA: query head h reads key head
    h // (H / H_kv))."""
    mean = b.method("mean", v4, -2, True)  # (B or 1, H_kv, 1, D_v)
    h, h_kv = _hint(q4.meta["example_value"].shape[1]), _hint(v4.meta["example_value"].shape[1])
    if h_kv not in (1, h):
        if h is None or h_kv is None or h % h_kv:
            raise RuntimeError(f"key/value heads {h_kv} do not divide query heads {h}")
        mean = b.method("repeat_interleave", mean, h // h_kv, 1)
    mean = b.method("to", mean, o4.meta["example_value"].dtype)
    empty = b.fn(torch.logical_not, b.method("any", kp, -1))  # (B,)
    empty = b.method("view", empty, -1, 1, 1, 1)
    return b.fn(torch.where, empty, mean, o4)


def _zero_padded_queries(b: _Builder, m: SiteMatch, o4: fx.Node, q4: fx.Node) -> fx.Node:
    """``o4`` (B, H, S_q, D) with the rows of the queries ``m.q_mask`` pads out set to 0, as eager
    SDPA gives for a row whose mask keeps no key. ``m.q_mask``: bool (B or 1, H or 1, S_q or 1,
    S_kv or 1), constant over the keys and the heads (the finder checked): its key 0 and head 0."""
    qm = b.method("select", m.q_mask, 3, 0)  # (B, H, S_q)
    qm = b.method("select", qm, 1, 0)  # (B, S_q)
    qm = b.method("expand", qm, b.size(q4, 0), b.size(q4, 2))
    qm = b.method("unsqueeze", b.method("unsqueeze", qm, 1), 3)  # (B, 1, S_q, 1)
    return b.method("masked_fill", o4, b.fn(torch.logical_not, qm), 0.0)


def _like_layout(b: _Builder, o: fx.Node, old: torch.Tensor) -> fx.Node:
    """``o`` (the site's new output, same shape as ``old``) in ``old``'s memory layout where that
    layout is a permutation of a contiguous one and differs from ``o``'s: eager SDPA returns q's
    layout, e.g. (B, S, H, D) memory for diffusers' transposed q, and code after it may rely on it
    (``out.transpose(1, 2).view(B, S, -1)``). ``permute``, ``contiguous``, the inverse ``permute``:
    no copy where ``o`` already has that layout (the CUDA kernel writes q's layout). Size-1 dims
    are ignored; any other layout (expanded, overlapping, no example sizes) leaves ``o`` as it is."""
    new = o.meta["example_value"]
    shape = [_hint(x) for x in old.shape]
    want = [_hint(x) for x in old.stride()]
    have = [_hint(x) for x in new.stride()]
    if None in shape or None in want or None in have:
        return o
    dims = [d for d in range(old.dim()) if shape[d] != 1]
    if all(want[d] == have[d] for d in dims):
        return o
    order = sorted(range(old.dim()), key=lambda d: (shape[d] != 1, -want[d], d))  # outermost first
    expect, step = [0] * old.dim(), 1
    for d in reversed(order):
        expect[d], step = step, step * shape[d]
    if any(expect[d] != want[d] for d in dims):
        return o
    inverse = sorted(range(old.dim()), key=lambda d: order[d])
    x = b.method("permute", o, *order)
    x = b.method("contiguous", x)
    return b.method("permute", x, *inverse)


def _same_size(a: Any, b: Any) -> bool:
    """Whether two sizes are provably equal without a guard: the same int or expression, or
    expressions that the shape environment simplifies to one another (``(s0**2)//s0`` and ``s0``,
    as a reshape under ``dynamic=True`` can produce)."""
    if size_of(a) == size_of(b):
        return True
    if not isinstance(a, torch.SymInt) and not isinstance(b, torch.SymInt):
        return False
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def _check_same(new: torch.Tensor, old: torch.Tensor, name: str) -> None:
    ns, os_ = [size_of(s) for s in new.shape], [size_of(s) for s in old.shape]
    if len(ns) != len(os_) or not all(_same_size(a, b) for a, b in zip(new.shape, old.shape)):
        raise RuntimeError(f"site {name}: the rewritten output has shape {ns}, the original {os_}")
    if new.dtype != old.dtype:
        raise RuntimeError(f"site {name}: the rewritten output has dtype {new.dtype}, the original {old.dtype}")


def rewrite_site(gm: fx.GraphModule, m: SiteMatch, handle: int) -> fx.Node:
    """Rewrite one site (atomic: on failure the graph is left as it was and the error raised).
    Returns the node that replaced the site's output."""
    graph = gm.graph
    out = m.output
    old = out.meta.get("example_value")
    if not isinstance(old, torch.Tensor):
        raise RuntimeError(f"site {m.info.name}: the output has no fake tensor value")
    region = set(m.region)
    for n in m.region:
        if n.graph is not graph:
            raise RuntimeError(f"site {m.info.name}: node {n.name} is not in the graph")
        if n is not out and any(u not in region for u in n.users):
            raise RuntimeError(f"site {m.info.name}: node {n.name} has users outside the site")
    b = _Builder(gm, out, out)
    try:
        q = _std(b, m.q, m.q_perm)
        k = _std(b, m.k, m.k_perm, m.k_transpose, m.k_unsqueeze)
        v = _std(b, m.v, m.v_perm, unsqueeze=m.v_unsqueeze)
        q4, k4, v4 = (_to4d(b, x, m.layout) for x in (q, k, v))
        kp = _key_padding(b, m, q4, k4)
        scale = float(m.scale)
        if not scale > 0 and not scale < 0:
            raise RuntimeError(f"site {m.info.name}: scale {m.scale!r} is not a number")
        o4 = b.fn(torch.ops.fgcompile.site_attention.default, q4, k4, v4, kp, scale, int(handle))
        if m.q_mask is not None:
            o4 = _zero_padded_queries(b, m, o4, q4)
        if m.empty_rows == "uniform" and kp is not None:
            o4 = _uniform_empty_rows(b, kp, o4, q4, v4)
        o = _from4d(b, o4, m.layout)
        full = expand_perm(m.out_perm, o.meta["example_value"].dim())
        if full is not None:
            o = b.method("permute", o, *full)
        if o.meta["example_value"].dtype != old.dtype:
            o = b.method("to", o, old.dtype)
        o = _like_layout(b, o, old)
        _check_same(o.meta["example_value"], old, m.info.name)
    except Exception:
        b.undo()
        raise
    # Commit: the site's users take the new result, the matched region goes.
    out.replace_all_uses_with(o)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(m.region, key=lambda n: order[n], reverse=True):
        if not n.users:
            graph.erase_node(n)
    return o


def rewrite_sites(gm: fx.GraphModule, chosen: Sequence[tuple]) -> None:
    """Replace each chosen ``(SiteMatch, handle)`` by ``torch.ops.fgcompile.site_attention``, in
    place. A site whose rewrite fails is left dense (its ``info`` says why); with
    ``FGCOMPILE_STRICT=1`` the failure is raised."""
    replaced: dict = {}  # a rewritten site's old output -> its new result (a later site's input)
    for m, handle in chosen:
        for attr in ("q", "k", "v", "mask"):
            x = getattr(m, attr)
            while x is not None and x in replaced:
                x = replaced[x]
            setattr(m, attr, x)
        try:
            replaced[m.output] = rewrite_site(gm, m, handle)
        except Exception as e:
            if strict_mode():
                raise
            m.info.decision = "dense"
            m.info.reason = f"rewrite failed ({type(e).__name__}: {e})"
            log.warning("fgcompile: site %s left dense: the rewrite failed (%s: %s)", m.info.name, type(e).__name__, e)
    gm.graph.lint()
    gm.recompile()
