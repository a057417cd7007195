"""The CUDA lowering of attention sites: the sparse kernel becomes part of Inductor's program.

Design (issue 6). After the rewrite pass every sparse site is one opaque
``fgcompile::site_attention`` node. On a CUDA site (device read from the fake tensors of the
Dynamo graph at compile time) this pass replaces it by::

    counts, indices, full_counts, full_tiles, dense_out, use_dense = fgcompile::site_plan(
        q, k, v, key_padding, scale, site, owner, block_m, block_n, full_tile,
        index_cap)                                                               # opaque, stateful
    out = fgcompile::sparse_attention(q, k, v, counts, indices, full_counts, full_tiles,
                                      scale, block_m, block_n, S_kv, full_tile,
                                      autotune, dense_out, use_dense, like_q)     # triton_op

Why ``torch.library.triton_op`` + ``wrap_triton`` and not a registered lowering building a Triton
template (as FlexAttention does in torch/_inductor/kernel/flex/): the kernel already exists, is
tested and benchmarked (benchmarks/NOTES.md), and its structure (two loops with data-dependent
bounds read from the count tensors, gathers of K/V rows by index) is not an Inductor template
(Jinja template code + ``TritonTemplate`` choices + ``autotune_select_algorithm``), which would
mean maintaining a second copy of the kernel against private, version-dependent Inductor
internals (torch 2.11 and 2.13 differ there). A triton_op is a public API: Inductor traces the
launch (``triton_kernel_wrapper_functional``), copies the kernel's source into its output code
with the constexprs bound (head dim, tile sizes, full-tile size; dtype in the pointer types; the
GQA ratio is a constant argument of the launch), runs the kernel's own ``prune_configs_by``
predicate at trace time on the fake arguments and autotunes the surviving ``triton.autotune``
configs with its own autotuner (``user_autotune``) at the first call. Inductor also sees the op's
inputs and output as buffers (memory planning, no copies).

What does NOT change per call is in the op's arguments; what does (the schedule, the mask) is in
``site_plan``'s outputs, which the graph consumes as tensors: no host synchronisation, no
recompilation when the mask changes, and ``site_plan`` is tagged ``torch.Tag.cudagraph_unsafe``
so that ``mode="reduce-overhead"`` (graph partitioning) replays everything else in CUDA graphs and
runs the schedule eagerly between them. Why the ``dense_out``/``use_dense`` select (a copy
kernel after the sparse kernel, in the same op) instead of an all-kept packing for dense/profiled
calls: see ``fgcompile.lowering.ops``.

Sites the kernel cannot take stay opaque ``site_attention`` nodes (also on CUDA): impl="reference",
a head dim that is not a multiple of 8 up to 128 or is symbolic, D_v != D, block_m outside
(16, 32, 64, 128), a dtype other than fp16/bf16/fp32; and sites that run dense at every call
(``SiteInfo.run_dense``: no kernel nor index buffers in the graph for them). On the CPU nothing changes. ``FGCOMPILE_LOWERING=0`` keeps every
site opaque (the pre-issue-6 path; for comparisons and as an escape hatch).

Every CUDA site that runs the Triton kernels also gets its schedule step's kernels compiled in the
background while Inductor compiles the graph (``fgcompile.lowering.warmup``).
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from ..config import TRITON_BLOCK_M
from . import ops as _ops

__all__ = ["lower_cuda_sites", "lowering_blocker", "full_tile_for", "index_cap_for"]

log = logging.getLogger("fgcompile")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _val(x: Any) -> Any:
    if isinstance(x, fx.Node):
        return x.meta.get("example_value", x.meta.get("val"))
    return x


def full_tile_for(block_n: int) -> int:
    """The full-tile size the compiled kernel is specialised for: the run-time packing's
    (``packing.model_full_tile``). A packing without full tiles (S_kv shorter than a tile) runs on
    the same kernel: its full_counts are 0."""
    from ..kernels.packing import model_full_tile

    return model_full_tile(block_n)


def index_cap_for(s_kv: Any, block_n: int, density: Optional[float]) -> int:
    """The index columns of a site's ``site_plan`` (0 = nKB): the density budget's bound on every
    row, when the site is compiled with a budget and a static S_kv. A later ``configure()`` that
    raises the budget runs those calls' kernel inside ``site_plan`` (``runtime.plan_site``)."""
    from ..predictors import density_budget

    if density is None or not isinstance(s_kv, int):
        return 0
    n_kb = -(-s_kv // block_n)
    cap = density_budget(n_kb, density)
    return cap if cap < n_kb else 0


#: per-call key lists of one site above which the lowering warns (without a density budget they
#: take B * H * ceil(S_q / block_m) * ceil(S_kv / block_n) int32: HunyuanVideo at 720p, 129 frames,
#: 9.9 GiB a call)
LARGE_LISTS_BYTES = 4 << 30


def large_lists_warning(name: str, indices: Sequence[Any], budget: bool) -> Optional[str]:
    """The warning for a site whose per-call key lists, ``site_plan``'s ``indices`` of shape
    ``indices`` ((B, H, nQB, columns) int32, ``ops.plan_shapes``), exceed ``LARGE_LISTS_BYTES``, or
    None (also for symbolic sizes). ``budget``: the columns are a density budget's bound."""
    if not all(isinstance(x, int) for x in indices):
        return None
    B, H, nqb, cols = indices
    nbytes = 4 * B * H * nqb * cols
    if nbytes <= LARGE_LISTS_BYTES:
        return None
    return (f"fgcompile: site {name}: its per-call key lists take {nbytes / 2**30:.1f} GiB of GPU memory "
            f"(B={B}, H={H}, {nqb} query blocks, {cols} key columns){'' if budget else ' without a density budget'}; "
            f"FGAttnConfig(density=...) bounds them (density 0.3: 30% of that)")


def lowering_blocker(q: Any, k: Any, v: Any, config: Any) -> Optional[str]:
    """Why a site (fake q, k, v and its config) cannot be lowered to the kernel; None if it can."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "no fake tensor values"
    if q.device.type != "cuda":
        return f"device {q.device.type} (Inductor compiles Triton for CUDA only)"
    if config.impl == "reference":
        return "impl='reference'"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}"
    D = q.shape[-1]
    if not isinstance(D, int) or not isinstance(v.shape[-1], int):
        return "symbolic head dim"
    if D > 128 or D % 8 != 0:
        return f"head dim {D} (the kernel takes multiples of 8 up to 128)"
    if v.shape[-1] != D:
        return f"value head dim {v.shape[-1]} != {D}"
    if config.block_m not in TRITON_BLOCK_M:
        return f"block_m {config.block_m} (the kernel takes {TRITON_BLOCK_M})"
    return None


def _insert(graph: fx.Graph, meta: dict, fake_mode, target, args, value_fn=None) -> fx.Node:
    n = graph.call_function(target, tuple(args))
    n.meta.update(meta)
    if fake_mode is not None:  # Dynamo graphs carry fake values; later passes read them
        vals = [_val(a) for a in args]
        with fake_mode:
            n.meta["example_value"] = value_fn(*vals) if value_fn else target(*vals)
    return n


def lower_cuda_sites(gm: fx.GraphModule, autotune: bool = False, inductor_patches: Optional[dict] = None) -> int:
    """Replace every CUDA ``site_attention`` node of ``gm`` that the kernel can take by
    ``site_plan`` + ``sparse_attention`` (in place). ``autotune``: whether the sparse
    kernel autotunes (``triton_sparse.autotune_wanted`` of the compile's mode).
    ``inductor_patches``: the Inductor config patches the compile will run under (the early
    compile predicts Inductor's kernel source under them). Returns how many were lowered."""
    import os

    from .. import runtime
    from ..kernels.triton_sparse import sm90_serves
    from . import early_compile, torch_private, warmup

    lowering_on = os.environ.get("FGCOMPILE_LOWERING", "1") != "0"
    op = torch.ops.fgcompile.site_attention.default
    graph = gm.graph
    lowered = 0
    early = None  # this graph's early-compile session (Inductor's kernel numbering)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (op, _ops.site_attention):
            continue
        args = list(node.args) + [None] * (7 - len(node.args))
        q, k, v, kp, scale, site, owner = args[:7]
        template = runtime.template_of(int(site))
        cfg = template.config
        qv, kv, vv = _val(q), _val(k), _val(v)
        why = lowering_blocker(qv, kv, vv, cfg) if lowering_on else "FGCOMPILE_LOWERING=0"
        if why is None and getattr(template.info, "run_dense", ""):
            # no kernel in the graph for a site that never runs sparse (nor its index buffers):
            # the opaque op computes its dense calls (SiteState._dense)
            why = f"it runs dense at every call ({template.info.run_dense})"
        if why is not None:
            if isinstance(qv, torch.Tensor) and qv.device.type == "cuda":
                log.info("fgcompile: site %s stays an opaque op on CUDA: %s", template.name, why)
                if not lowering_on:  # the opaque op launches the same Triton kernels
                    warmup.schedule(template.name, cfg, qv, kv, vv, _val(kp), float(scale), None, lowered=False)
            continue
        sparse_op = _ops.sparse_attention_op()  # raises naming the API if this torch lacks triton_op
        fake_mode = getattr(qv, "fake_mode", None)
        meta = {k_: node.meta[k_] for k_ in ("nn_module_stack", "stack_trace", "source_fn_stack") if k_ in node.meta}
        bm, bn = int(cfg.block_m), int(cfg.block_n)
        ft = full_tile_for(bn)
        cap = index_cap_for(kv.shape[2], bn, cfg.density)
        large = large_lists_warning(template.name, _ops.plan_shapes(qv, kv, vv, bm, bn, ft, cap)["indices"], cap > 0)
        if large is not None:
            log.warning(large)
        # the output's layout: what eager gave the graph after the site (see ops.sparse_attention_op)
        like_q = getattr(template.info, "pattern", "sdpa") == "sdpa"
        # the Gluon sm_90 kernel, where it serves the site: an opaque op inside the sparse op (no
        # Inductor source to compile early); the choice is the op's last argument
        gluon = sm90_serves(qv, kv, vv, _ops.sparse_out(qv, like_q), bm, bn, ft, autotune=bool(autotune), symbolic=True)
        if gluon:
            # registered now, in this process: the compiled graph calls it at run time, and on an
            # FX-graph-cache hit Inductor loads that code without tracing the op that registers it
            _ops.sparse_attention_sm90_op()
        with graph.inserting_before(node):
            plan = _insert(graph, meta, fake_mode, torch.ops.fgcompile.site_plan.default,
                           (q, k, v, kp, float(scale), int(site), owner, bm, bn, ft, cap))
            parts = [_insert(graph, meta, fake_mode, operator.getitem, (plan, i)) for i in range(6)]
            counts, indices, full_counts, full_tiles, dense_out, use_dense = parts
            s_kv = kv.shape[2]
            if not isinstance(s_kv, int):
                s_kv = _insert(graph, meta, fake_mode, torch.ops.aten.sym_size.int, (k, 2))
            out = _insert(
                graph, meta, fake_mode, sparse_op,
                (q, k, v, counts, indices, full_counts, full_tiles, float(scale), bm, bn, s_kv, ft, bool(autotune),
                 dense_out, use_dense, like_q, gluon),
                value_fn=lambda q_, *rest: _ops.sparse_out(q_, like_q),
            )
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        lowered += 1
        if not autotune and not gluon:  # Inductor's source for the kernel, compiled from now on (early_compile)
            fakes = [_val(n) for n in (q, k, v, counts, indices, full_counts, full_tiles)]
            args = (*fakes, float(scale), bm, bn, ft, False, _val(dense_out), _val(use_dense), like_q)
            launch = lambda wrap, a=args: _ops.launch_sparse_op(*a, wrap)  # noqa: E731

            with torch_private.timed("fgcompile.early_compile"):
                early = early_compile.early_compile_site(early, launch, inductor_patches, qv.device)
        cols = cap or (-(-s_kv // bn) if isinstance(s_kv, int) else None)  # site_plan's index columns
        if cols is not None:
            with torch_private.timed("fgcompile.schedule_precompile"):
                warmup.schedule(template.name, cfg, qv, kv, vv, _val(kp), float(scale), cols, lowered=not gluon)
        log.info(
            "fgcompile: site %s lowered for CUDA: site_plan + sparse_attention (%s, block_m=%d, block_n=%d, full_tile=%d)",
            template.name, "Gluon sm_90" if gluon else "Triton", bm, bn, ft,
        )
    if lowered:
        graph.lint()
        gm.recompile()
    return lowered
