"""fgcompile's custom operators.

``fgcompile::site_attention(q, k, v, key_padding, scale, site, owner=None) -> out``
    One attention site of a compiled model, as ONE opaque op (the CPU path, and the CUDA fallback
    for sites the kernel cannot take). q: (B, H, S_q, D); k, v: (B, H_kv, S_kv, D) with
    H % H_kv == 0 (GQA); key_padding: bool (B, S_kv), True = a real key, or None; scale: the softmax
    scale; site: the handle of the site's template (name, config) in ``fgcompile.runtime``; owner:
    a parameter of the compiled model (the graph's first parameter input), whose identity selects
    the model's state at run time: Dynamo reuses one compiled graph for every instance of a
    module class, so the state cannot be a constant of the graph. The site's state runs the
    schedule (dense warm-up, profiled calls, predictor) and the sparse kernel. Returns a
    contiguous (B, H, S_q, D_v) tensor of q's dtype. Opaque to Inductor
    (``torch.library.custom_op`` with a fake implementation): on the CPU Inductor cannot compile
    Triton, and the op is stateful (the schedule advances every call).

On CUDA the backend splits a site in two (``fgcompile.lowering.cuda``):

``fgcompile::site_plan(q, k, v, key_padding, scale, site, owner, block_m, block_n, full_tile,
index_cap=0) -> (counts, indices, full_counts, full_tiles, dense_out, use_dense)``
    The schedule step (``fgcompile.runtime.plan_site`` -> ``SiteState.plan``), opaque, stateful,
    tagged ``torch.Tag.cudagraph_unsafe`` so that Inductor's graph partitioning keeps it out of
    CUDA graphs. All outputs are fresh, contiguous tensors of fixed shapes (the fake's):
    counts / full_counts int32 (B, H, nQB); indices int32 (B, H, nQB, index_cap or nKB: the
    lowering passes the density budget's bound ``predictors.density_budget(nKB, density)`` of a
    site compiled with one, 0 = nKB; at 720p and density 0.3, 0.64 GB instead of 2.1 GB per call); full_tiles int32
    (B, H, nQB, max(S_kv // full_tile, 1)) (one column when full_tile is 0); dense_out (B, H, S_q,
    D_v) in q's dtype; use_dense a 0-d bool.
    - sparse call: the ``PackedSlices`` of the call; ``use_dense`` False, ``dense_out``
      uninitialised (never selected).
    - dense / profiled call: ``plan()`` has already computed the exact output: it is returned as
      ``dense_out`` with ``use_dense`` True, and the packing keeps NOTHING (counts and full_counts
      0; the kernel then only writes zeros, a few microseconds).
    The graph passes ``dense_out`` and ``use_dense`` on to ``sparse_attention``, which copies
    ``dense_out`` over its output where ``use_dense`` holds (a small kernel after the sparse one).

    Why not the all-kept packing (the kernel recomputing dense attention)? It would run a dense
    pass of the sparse kernel (the Triton kernel: ~1.23x cuDNN, 14 ms at Wan-1.3B's shape) on top of the profiled
    call's own dense pass, at every warm-up and profiled call (one call in ten by default: ~+20%
    of a site's time), its output would differ from ``site_attention``'s by rounding, and its
    index lists (403 MB at Wan's shape) would have to be cached or rebuilt. The select (the copy
    kernel ``triton_sparse._copy_dense``, in the same triton_op) reads ``dense_out`` only on those
    calls, is bitwise exact for both kinds of calls, and writes the output in q's layout (no
    permute copy after the site where q is a permuted view, as in diffusers; a ``torch.where``
    after the kernel cost 0.1 ms per Wan layer).

``fgcompile::sparse_attention(q, k, v, counts, indices, full_counts, full_tiles, scale, block_m,
block_n, seq_len_kv, full_tile, autotune=False, dense_out=None, use_dense=None, out_like_q=True) -> out``
    The sparse kernel as a ``torch.library.triton_op`` around
    ``fgcompile.kernels.triton_sparse.launch_sparse_kernel`` (the same launch as the direct call)
    with ``wrap_triton``: Inductor traces the launch, copies the kernel's source into its output
    code, specialised by head dim, dtype, tile sizes (constexprs) and GQA ratio (a constant
    argument of the launch). ``autotune`` (decided by the lowering pass: ``mode="max-autotune"`` or
    ``FGCOMPILE_AUTOTUNE=1``): Inductor autotunes the configs the kernel's prune predicate keeps;
    otherwise the launch uses one heuristic config (the H100's autotuner pick for 128-row blocks),
    which keeps compile time near the default backend's. It is an argument, not read from the
    environment at trace time, so that it is part of the graph and of Inductor's cache key. Returns
    a (B, H, S_q, D) tensor of q's dtype: dense_out where the 0-d bool ``use_dense`` holds (both
    given by ``site_plan``), else the sparse result; in q's layout (``torch.empty_like(q)``) with
    ``out_like_q``, else contiguous. The lowering asks for q's layout at SDPA sites (eager cuDNN
    and flash SDPA return q's, or the (B, S, H, D) permuted, layout) and for contiguous at
    hand-written ones (a matmul's output is contiguous), so the graph after the site sees the
    strides it saw in eager and a ``.view`` there keeps working.
    Callable eagerly too (it launches the kernel).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["site_attention", "site_plan", "plan_shapes", "sparse_out", "sparse_attention_op"]


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
    from . import warmup

    warmup.wait()
    return runtime.run_site(site, q, k, v, key_padding, scale, owner)


@site_attention.register_fake
def _site_attention_fake(q, k, v, key_padding, scale, site, owner=None):
    # The real op returns a contiguous (B, H, S_q, D_v) tensor.
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# ----------------------------------------------------------------------------- CUDA: plan + kernel
def _cdiv(a, b):
    return -(-a // b)


def plan_shapes(q, k, v, block_m: int, block_n: int, full_tile: int, index_cap: int = 0) -> dict:
    """The shapes of ``site_plan``'s outputs (ints or SymInts). ``index_cap``: index columns (a
    bound on every row's kept key blocks, the density budget's), 0 for nKB."""
    B, H, S_q, _ = q.shape
    S_kv = k.shape[2]
    nqb = _cdiv(S_q, block_m)
    nkb = _cdiv(S_kv, block_n)
    cols = torch.sym_max(S_kv // full_tile, 1) if full_tile > 0 else 1
    return {
        "counts": (B, H, nqb),
        "indices": (B, H, nqb, index_cap if index_cap > 0 else nkb),
        "full_counts": (B, H, nqb),
        "full_tiles": (B, H, nqb, cols),
        "dense_out": (B, H, S_q, v.shape[-1]),
    }


_plan_tags = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("fgcompile::site_plan", mutates_args=(), tags=_plan_tags)
def site_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: Optional[torch.Tensor],
    scale: float,
    site: int,
    owner: Optional[torch.Tensor],
    block_m: int,
    block_n: int,
    full_tile: int,
    index_cap: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .. import runtime
    from . import warmup

    warmup.wait()
    shapes = plan_shapes(q, k, v, block_m, block_n, full_tile, index_cap)
    dev = q.device
    out, packed = runtime.plan_site(site, q, k, v, key_padding, scale, owner, int(shapes["indices"][-1]))
    if packed is None:  # a dense call: the exact output is known; the kernel keeps nothing
        tensors = [
            torch.zeros(shapes["counts"], device=dev, dtype=torch.int32),
            torch.empty(shapes["indices"], device=dev, dtype=torch.int32),  # never read (counts 0)
            torch.zeros(shapes["full_counts"], device=dev, dtype=torch.int32),
            torch.zeros(shapes["full_tiles"], device=dev, dtype=torch.int32),
        ]
    else:
        tensors = _packed_tensors(packed, shapes, dev, block_m, block_n, full_tile)
    if out is not None:  # dense or profiled call: select the exact output
        dense_out = out.to(q.dtype).contiguous()
        if dense_out is out and _may_alias(out, (q, k, v, key_padding, owner)):
            dense_out = dense_out.clone()
        return (*tensors, dense_out, torch.ones((), device=dev, dtype=torch.bool))
    dense_out = torch.empty(shapes["dense_out"], device=dev, dtype=q.dtype)  # not selected
    return (*tensors, dense_out, torch.zeros((), device=dev, dtype=torch.bool))


def _packed_tensors(packed, shapes, dev, block_m: int, block_n: int, full_tile: int) -> list:
    """counts, indices, full_counts, full_tiles of ``packed``, contiguous int32, in the shapes the
    fake implementation declares."""
    if (packed.block_m, packed.block_n) != (block_m, block_n):
        raise RuntimeError(
            f"fgcompile::site_plan: the site's plan is packed for block_m={packed.block_m}, block_n={packed.block_n}; "
            f"the compiled graph expects block_m={block_m}, block_n={block_n}"
        )
    if packed.full_tile not in (0, full_tile):
        raise RuntimeError(
            f"fgcompile::site_plan: the site's plan uses full tiles of {packed.full_tile} keys; the compiled "
            f"kernel expects {full_tile} (or none)"
        )
    tensors = []
    for name, t in (("counts", packed.counts), ("indices", packed.indices),
                    ("full_counts", packed.full_counts), ("full_tiles", packed.full_tiles)):
        want = tuple(int(s) for s in shapes[name])
        if name == "full_tiles" and packed.full_tile == 0 and tuple(t.shape) != want:
            # no full tiles in this packing (full_counts are 0): any column count does; fit the fake's
            t = torch.zeros(want, device=dev, dtype=torch.int32)
        if tuple(t.shape) != want:
            raise RuntimeError(f"fgcompile::site_plan: {name} has shape {tuple(t.shape)}, expected {want}")
        if t.dtype != torch.int32:
            t = t.to(torch.int32)
        if not t.is_contiguous():
            t = t.contiguous()  # the torch packing returns row-padded views (stride nKB + 1)
        tensors.append(t)
    return tensors


def _may_alias(t: torch.Tensor, others) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(o is not None and o.untyped_storage().data_ptr() == ptr for o in others)


@site_plan.register_fake
def _site_plan_fake(q, k, v, key_padding, scale, site, owner, block_m, block_n, full_tile, index_cap=0):
    s = plan_shapes(q, k, v, block_m, block_n, full_tile, index_cap)
    i32 = dict(dtype=torch.int32, device=q.device)
    return (
        q.new_empty(s["counts"], **i32),
        q.new_empty(s["indices"], **i32),
        q.new_empty(s["full_counts"], **i32),
        q.new_empty(s["full_tiles"], **i32),
        q.new_empty(s["dense_out"]),
        q.new_empty((), dtype=torch.bool),
    )


def sparse_out(q: torch.Tensor, out_like_q: bool) -> torch.Tensor:
    """The (uninitialised) output of ``sparse_attention`` for ``q`` (B, H, S_q, D): q's layout
    (``torch.empty_like``: a permuted (B, S, H, D) q gives the same permutation), or contiguous.
    The op allocates it; the lowering pass uses it for the node's fake value."""
    return torch.empty_like(q) if out_like_q else q.new_empty(q.shape)


def launch_sparse_op(q, k, v, counts, indices, full_counts, full_tiles, scale: float, block_m: int, block_n: int,
                     full_tile: int, autotune: bool, dense_out, use_dense, out_like_q: bool, wrap,
                     sm90: bool = False) -> torch.Tensor:
    """The body of ``fgcompile::sparse_attention``: allocate the output (:func:`sparse_out`) and
    launch the kernel through ``wrap`` (``wrap_triton`` in the op; the early compile's recorder in
    ``lowering.cuda``, which must see the very launch Inductor traces). ``sm90``: the lowering pass
    chose the Gluon sm_90 kernel (``triton_sparse.sm90_serves``), called through the opaque
    ``fgcompile::sparse_attention_sm90``; an argument of the op, so that the choice is part of the
    graph (and of Inductor's cache key), not of the environment at run time. Returns the output."""
    from ..kernels.triton_sparse import launch_sparse_kernel

    return launch_sparse_kernel(
        q, k, v, sparse_out(q, out_like_q), counts, indices, full_counts, full_tiles,
        scale, block_m, block_n, full_tile, autotune=autotune, wrap=wrap,
        dense_out=dense_out, use_dense=use_dense, sm90=sm90, sm90_launch=sparse_attention_sm90_op() if sm90 else None,
    )


_SM90_OP = None
_LIB = None  # the torch.library.Library of the ops defined without custom_op (kept alive here)


def sparse_attention_sm90_op():
    """``torch.ops.fgcompile.sparse_attention_sm90`` (q, k, v, out, counts, indices, scale) -> None,
    registered on first use: the Gluon sm_90 kernel (``kernels.gluon_sparse_sm90``) writing
    ``out`` in place, as an opaque op (``triton_sparse.launch_sm90``: the Triton kernel where the
    Gluon one fails to build or launch). ``launch_sparse_kernel`` calls it inside the
    ``sparse_attention`` triton_op for the launches that kernel serves: Inductor traces a triton_op's
    ``wrap_triton`` launches into its program, but not a Gluon launch, so this one stays a call
    (its output is still an Inductor buffer, written in place).

    Defined with ``torch.library.Library`` (schema, a CUDA kernel and a fake), not
    ``torch.library.custom_op``: a custom_op that mutates an argument dispatches through Python
    autograd and ADInplaceOrView kernels, about 25 us a call on the host against 2 us here, paid
    at every sparse call. It has no autograd kernel: the backend never lowers a graph that needs
    gradients (``dynamo_backend._grad_needed``)."""
    global _SM90_OP, _LIB
    if _SM90_OP is not None:
        return _SM90_OP
    from ..kernels.triton_sparse import launch_sm90

    if _LIB is None:
        _LIB = torch.library.Library("fgcompile", "FRAGMENT")
    _LIB.define("sparse_attention_sm90(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor counts, "
                "Tensor indices, float scale) -> ()")

    def kernel(q, k, v, out, counts, indices, scale) -> None:
        launch_sm90(q, k, v, out, counts, indices, scale)

    _LIB.impl("sparse_attention_sm90", kernel, "CUDA")
    torch.library.register_fake("fgcompile::sparse_attention_sm90", lambda *args: None, lib=_LIB)
    _SM90_OP = torch.ops.fgcompile.sparse_attention_sm90.default
    return _SM90_OP


_SPARSE_OP = None


def sparse_attention_op():
    """``torch.ops.fgcompile.sparse_attention`` (the triton_op), registered on first use. Raises
    RuntimeError naming the API if this torch lacks ``torch.library.triton_op``/``wrap_triton``."""
    global _SPARSE_OP
    if _SPARSE_OP is not None:
        return _SPARSE_OP
    from .inductor import triton_op_api

    triton_op, wrap_triton = triton_op_api()

    @triton_op("fgcompile::sparse_attention", mutates_args=())
    def sparse_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        counts: torch.Tensor,
        indices: torch.Tensor,
        full_counts: torch.Tensor,
        full_tiles: torch.Tensor,
        scale: float,
        block_m: int,
        block_n: int,
        seq_len_kv: int,
        full_tile: int,
        autotune: bool = False,
        dense_out: Optional[torch.Tensor] = None,
        use_dense: Optional[torch.Tensor] = None,
        out_like_q: bool = True,
        sm90: bool = False,
    ) -> torch.Tensor:
        return launch_sparse_op(
            q, k, v, counts, indices, full_counts, full_tiles, scale, block_m, block_n, full_tile,
            autotune, dense_out, use_dense, out_like_q, wrap_triton, sm90,
        )

    _SPARSE_OP = torch.ops.fgcompile.sparse_attention.default
    return _SPARSE_OP
