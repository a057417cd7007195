"""Attention time at equal output error (issue 5), in one run: on the synthetic video-attention suite
(``fgcompile.testing.synthetic``) at the Wan 480p size, for each granularity, the sparsest profile
mask whose output error against dense attention is at most the target, and the time of the kernel
that serves that granularity on that very mask.

    python benchmarks/equal_error_bench.py [--target 0.01] [--out ...]      # CUDA (an H100)
    python benchmarks/equal_error_bench.py --grid 4 8 16 --heads 2 --no-time  # the search alone, any device
    python benchmarks/equal_error_bench.py --source toy      # the trained toy DiT's own calls (CPU: 26 min),
                                                             # equal_error_toy_<device>.json, no timing

Masks: the profile rule of ``fgcompile.predictors`` (keep a tile iff the largest softmax probability
of any of its query/key pairs exceeds alpha / S_kv), alpha bisected on a log scale (``--steps``) to
the largest alpha whose relative error ``||O_sparse - O_dense||_F / ||O_dense||_F`` (float32
reference, ``sparse_attention_reference``) is at most ``--target``. Granularities (query rows x keys):

- 128 x 1, 64 x 1, 32 x 1: fgcompile's sparse kernel on the slice mask: the Gluon sm_90 kernel at
  128 rows on Hopper (what compiled models launch there) and the Triton kernel (autotuned) at each M;
- 128 x 128 and 64 x 64: FlexAttention on the BlockMask of the kept tiles (full blocks: a kept tile
  is computed whole), the block-sparse baseline at its own equal-error density;
- 128 x 1 "pca": the same on queries in the order ``fgcompile.query_order`` gives (what a model
  compiled with ``FGAttnConfig(query_order="pca")`` runs): the mask is made on the reordered
  queries, and the timed call reorders q, runs the kernel and puts the output rows back;
  ``query_order_ms`` is the order's own time (once per profiled call); "64x1-pca": the same at
  64-query blocks (the order made at 64 rows; the Triton kernel);
- 128 x 128 "pca-qk": tiles on queries in that order against keys (and values) in their own "pca"
  order (``query_order(k)``), so that a tile is alike queries against alike keys: the tile layout
  that needs the least density on the suite (``quality.py --query-order pca``); the timed call
  reorders q, k and v, runs FlexAttention and puts the output rows back; "pca-qk-full": the same
  with both orders made on the full head dim (``query_order(.., rank=D)``; the default order works
  on the 16 leading principal directions, and either may serve tiles better); "pca-qkw": both
  orders made in the metric of the logits (``quality.cross_metric``: queries grouped by their
  logits, keys by theirs against the queries; the best tiles on the CPU suite). Slice savings
  (``density_saving_vs_128x128``) are judged against the best tile layout measured;
- dense: SDPA with the cuDNN backend and with the flash backend.

Times are ``triton.testing.do_bench`` medians (ms), warm. Each timed kernel's own output is checked
against the float32 dense reference too (``kernel_rel_err``: the mask's error plus bf16 rounding);
``output_valid`` is False where it exceeds twice the target, and such a row gives no ratio.
Writes ``benchmarks/results/equal_error_<device>.json`` (device, torch/triton versions, shape,
per granularity alpha, density, error, times; ratios to cuDNN and to FlexAttention at
equal error, per tile layout) and prints a table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fgcompile.testing.metrics import rel_err  # noqa: E402
from fgcompile.kernels.reference import dense_attention_reference, sparse_attention_reference  # noqa: E402
from fgcompile.predictors import keep_from_block_max, profile_scores  # noqa: E402
from fgcompile.testing.synthetic import make_attention_inputs  # noqa: E402
from quality import density_of, grouping  # noqa: E402
from results_io import write_result  # noqa: E402

#: name -> (query rows, keys per tile, what serves it); a "-pca" name: queries in the "pca" order,
#: a "-pca-qk" name: keys and values in their own "pca" order as well
GRANULARITIES = {
    "128x1": (128, 1, "fgcompile"),
    "128x1-pca": (128, 1, "fgcompile"),
    "64x1": (64, 1, "fgcompile"),
    "64x1-pca": (64, 1, "fgcompile"),
    "32x1": (32, 1, "fgcompile"),
    "128x128": (128, 128, "flex"),
    "128x128-pca-qk": (128, 128, "flex"),
    "128x128-pca-qk-full": (128, 128, "flex"),
    "128x128-pca-qkw": (128, 128, "flex"),
    "64x64": (64, 64, "flex"),
}

#: the tile layouts a slice saving is judged against (the best of those measured)
TILE_BASELINES = ("128x128", "128x128-pca-qk", "128x128-pca-qk-full", "128x128-pca-qkw")


#: a timed kernel's output error may exceed the target by this factor (bf16 rounding) and still count
VALID_FACTOR = 2.0

#: the alpha of FG-Attn's published runs (0.6 also used); every granularity's sweep includes it
PAPER_ALPHA = 0.5


def search_alpha(err_of, target: float, steps: int, lo: float = 1e-3, hi: float = 1e4):
    """The largest alpha in [lo, hi] (bisection on log alpha, ``steps`` evaluations) with
    ``err_of(alpha) <= target``, assuming the error grows with alpha. Returns (alpha, evaluations);
    alpha is None when even ``lo`` misses the target. ``err_of(lo)`` is evaluated first."""
    seen = {lo: err_of(lo)}
    if seen[lo] > target:
        return None, seen
    seen[hi] = err_of(hi)
    if seen[hi] <= target:
        return hi, seen
    best, a, b = lo, math.log(lo), math.log(hi)
    for _ in range(steps):
        mid = math.exp((a + b) / 2)
        seen[mid] = err_of(mid)
        if seen[mid] <= target:
            best, a = mid, math.log(mid)
        else:
            b = math.log(mid)
    return best, seen


def search_rows(q, k, v, grans, target: float, steps: int, timing: bool, dense=None) -> dict:
    """Per granularity name: the bisected alpha, its density and error, the sweep, and (``timing``)
    the kernel's time on that mask. q/k/v (B, H, S, D) self-attention; ``dense``: the dense output."""
    B, H, S, D = q.shape
    scale = D ** -0.5
    if dense is None:
        dense = dense_attention_reference(q, k, v, scale)
    rows = {}
    for name in grans:
        bm, bn, _ = GRANULARITIES[name]
        perm, kperm, qo, ko, vo, do, order_ms = None, None, q, k, v, dense, None
        if "-pca" in name:
            from fgcompile.reorder import RANK, order_rows

            rank = D if name.endswith("-full") else RANK
            logits = name.endswith("-qkw")  # both orders in the metric of the logits (quality.cross_metric)
            perm = grouping(q, k, bm, rank, logits)
            qo, do = order_rows(q, perm), order_rows(dense, perm)
            if "-qk" in name:
                kperm = grouping(k, q, bn, rank, logits)
                ko, vo = order_rows(k, kperm), order_rows(v, kperm)
            if timing:
                from triton.testing import do_bench

                order_ms = float(do_bench(lambda: grouping(q, k, bm, rank, logits), warmup=25, rep=100, return_mode="median"))
        scores = profile_scores(qo, ko, block_m=bm, scale=scale)
        densities = {}

        def err_of(alpha):
            keep = keep_from_block_max(scores, alpha=alpha, block_n=bn)
            densities[alpha] = density_of(keep, bm, bn, S, S)
            return rel_err(sparse_attention_reference(qo, ko, vo, keep, bm, bn, scale), do)

        alpha, seen = search_alpha(err_of, target, steps)
        if PAPER_ALPHA not in seen:  # FG-Attn's own setting, for the record
            seen[PAPER_ALPHA] = err_of(PAPER_ALPHA)
        row = {"block_m": bm, "block_n": bn, "alpha": alpha, "query_order": "pca" if perm is not None else "none",
               "key_order": "pca" if kperm is not None else "none",
               "sweep": [{"alpha": a, "density": densities[a], "rel_err": e} for a, e in sorted(seen.items())]}
        if perm is not None:
            row["order_rank"] = min(rank, D)  # the dims the bisection worked in
        if order_ms is not None:
            row["query_order_ms"] = order_ms
        if alpha is not None:
            row["density"], row["rel_err"] = densities[alpha], seen[alpha]
            if timing:
                keep = keep_from_block_max(scores, alpha=alpha, block_n=bn)
                row.update(time_granularity(name, q, k, v, keep, scale, dense, perm, kperm))
                del keep
        rows[name] = row
        print(f"{name:8s} alpha {alpha}  density {row.get('density')}  rel_err {row.get('rel_err')}", flush=True)
        scores = qo = ko = vo = do = None  # free them before the next granularity's
        if q.is_cuda:
            torch.cuda.empty_cache()
    return rows


def savings(rows: dict) -> dict:
    """1 - density / (the least density of the 128 x 128 tile layouts measured, ``TILE_BASELINES``),
    per granularity that reached the target."""
    tiles = [rows[n]["density"] for n in TILE_BASELINES if rows.get(n, {}).get("density")]
    coarse = min(tiles) if tiles else None
    return {n: 1 - r["density"] / coarse for n, r in rows.items() if coarse and r.get("density")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", choices=("synthetic", "toy"), default="synthetic",
                    help="synthetic: the suite at --grid; toy: the calls of the shipped trained toy DiT "
                         "(4,096 tokens, 6 heads, D 64) at --toy-steps x --toy-layers of one sampling trajectory")
    ap.add_argument("--grid", type=int, nargs=3, default=(21, 30, 52), metavar=("F", "H", "W"))
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--pattern", default="mixed")
    ap.add_argument("--toy-steps", type=int, nargs="+", default=[0, 12])
    ap.add_argument("--toy-layers", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--target", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=12, help="bisection steps per granularity")
    ap.add_argument("--granularities", default=",".join(GRANULARITIES))
    ap.add_argument("--no-time", action="store_true", help="the density search only (any device)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("FGCOMPILE_AUTOTUNE", "1")  # the Triton launches autotune (each M its best config)
    grans = args.granularities.split(",")
    for g in grans:
        if g not in GRANULARITIES:
            ap.error(f"--granularities: expected names from {list(GRANULARITIES)}, got {g!r}")
    timing = not args.no_time and args.source == "synthetic"
    if timing and not torch.cuda.is_available():
        ap.error("timing needs CUDA (or pass --no-time)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "source": args.source,
        "target_rel_err": args.target,
        "timing": "triton.testing.do_bench median, warm" if timing else None,
    }

    if args.source == "toy":
        from predictor_trajectory import trajectory_attention

        calls = []

        def on_call(step, layer, q, k, v, out):
            print(f"step {step} layer {layer}", flush=True)
            rows = search_rows(q, k, v, grans, args.target, args.steps, False, out)
            calls.append({"step": step, "layer": layer, "rows": rows, "saving_vs_128x128": savings(rows)})

        trajectory_attention(on_call, at_steps=args.toy_steps, layers=args.toy_layers, device=device)
        result["shape"] = {"model": "shipped toy video DiT (examples/weights)", "B": 2, "S": 4096, "D": 64,
                           "batch": "CFG: [conditional, unconditional]", "dtype": "float32"}
        result["calls"] = calls
        result["mean_density"] = {n: sum(c["rows"][n]["density"] for c in calls) / len(calls) for n in grans
                                  if all(c["rows"][n].get("density") for c in calls)}
        result["saving_of_mean_density_vs_128x128"] = savings({n: {"density": d} for n, d in result["mean_density"].items()})
        write_result(result, "equal_error_toy", args.out)
        print(f"\n{'granularity':12s} {'mean density':>12s} {'saving vs 128x128':>18s}")
        for n, d in result["mean_density"].items():
            print(f"{n:12s} {d:12.4f} {result['saving_of_mean_density_vs_128x128'].get(n, float('nan')):18.3f}")
        return result

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = make_attention_inputs(*args.grid, heads=args.heads, head_dim=args.head_dim, pattern=args.pattern,
                                    dtype=dtype, device=device)
    B, H, S, D = q.shape
    rows = search_rows(q, k, v, grans, args.target, args.steps, timing)
    result["shape"] = {"grid": list(args.grid), "B": B, "H": H, "S": S, "D": D,
                       "dtype": str(dtype).replace("torch.", ""), "pattern": args.pattern}
    result["rows"] = rows
    if timing:
        from variant_probe import dense_baselines

        cudnn, flash = dense_baselines(q, k, v)
        result["cudnn_ms"], result["flash_ms"] = cudnn, flash
        # a baseline counts only where its own output is right (its mask's error plus bf16 rounding)
        for r in rows.values():
            if r.get("ms") is not None:
                r["output_valid"] = bool(r.get("kernel_rel_err", float("inf")) <= VALID_FACTOR * args.target)
        flex = {n: rows[n]["ms"] for n in TILE_BASELINES if rows.get(n, {}).get("output_valid")}
        for r in rows.values():
            if r.get("ms") and r.get("output_valid"):
                r["ratio_to_cudnn"] = r["ms"] / cudnn
                for n, ms in flex.items():  # "speedup_vs_flex_128x128_equal_error", ..._128x128-pca-qk_...
                    r[f"speedup_vs_flex_{n}_equal_error"] = ms / r["ms"]
    result["density_saving_vs_128x128"] = savings(rows)
    write_result(result, "equal_error", args.out)
    print(f"\n{'granularity':12s} {'alpha':>8s} {'density':>8s} {'rel_err':>8s} {'kernel':>10s} {'ms':>8s} {'k_err':>8s} {'vs cuDNN':>8s}")
    for n, r in rows.items():
        print(f"{n:12s} {_fmt(r.get('alpha'))} {_fmt(r.get('density'))} {_fmt(r.get('rel_err'))} "
              f"{str(r.get('kernel', '-')):>10s} {_fmt(r.get('ms'))} {_fmt(r.get('kernel_rel_err'))} {_fmt(r.get('ratio_to_cudnn'))}")
    if timing:
        print(f"cuDNN dense {result['cudnn_ms']:.3f} ms, flash {result['flash_ms']:.3f} ms")
    return result


def _fmt(x) -> str:
    return f"{x:8.4g}" if isinstance(x, (int, float)) else f"{'-':>8s}"


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def time_granularity(name, q, k, v, keep, scale, dense, perm=None, kperm=None) -> dict:
    """Time the kernel that serves ``name`` on ``keep`` (do_bench median, ms) and check its output.
    ``perm``: the query order ``keep`` was made in; the timed call then reorders q, launches, and
    puts the output rows back. ``kperm``: the key order of ``keep`` (the timed call reorders k and v
    too)."""
    from triton.testing import do_bench

    from fgcompile.reorder import order_rows, restore_rows

    bm, bn, what = GRANULARITIES[name]
    B, H, S, D = q.shape
    out = torch.full_like(q, float("nan"))

    def bench(fn):
        """fn() launches and returns its output; (median ms, its output's error on poisoned memory)."""
        fn()  # compile / autotune outside the timing
        out.fill_(float("nan"))
        err = rel_err(fn(), dense)
        return float(do_bench(fn, warmup=25, rep=200, return_mode="median")), err

    def call(launch):
        """launch(q', k', v') -> the kernel's output for queries q' (in q's order unless perm)."""
        if perm is None:
            return lambda: launch(q, k, v)
        if kperm is None:
            return lambda: restore_rows(launch(order_rows(q, perm), k, v), perm, like=q)
        return lambda: restore_rows(launch(order_rows(q, perm), order_rows(k, kperm), order_rows(v, kperm)), perm, like=q)

    res = {}
    try:
        if what == "fgcompile":
            from fgcompile.attention import pack_slices
            from fgcompile.kernels.gluon_sparse_sm90 import launch_sparse_kernel_sm90, sm90_supported
            from fgcompile.kernels.triton_sparse import sparse_attention_triton

            packed = pack_slices(keep, block_m=bm, block_n=bn, seq_len_kv=S)
            res["triton_ms"], res["triton_rel_err"] = bench(call(lambda qx, kx, vx: sparse_attention_triton(qx, kx, vx, packed, scale, out=out)))
            res["kernel"], res["ms"], res["kernel_rel_err"] = "triton", res["triton_ms"], res["triton_rel_err"]
            if sm90_supported(q, k, v, out, bm, bn, 0):
                p0 = pack_slices(keep, block_m=bm, block_n=bn, seq_len_kv=S, full_tile=0)
                res["gluon_ms"], res["gluon_rel_err"] = bench(
                    call(lambda qx, kx, vx: (launch_sparse_kernel_sm90(qx, kx, vx, out, p0.counts, p0.indices, scale), out)[1]))
                res["kernel"], res["ms"], res["kernel_rel_err"] = "gluon_sm90", res["gluon_ms"], res["gluon_rel_err"]
        else:
            from flex_masks import tile_block_mask
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
            mask = tile_block_mask(keep, bm, S)
            opts = {"BLOCK_M": bm, "BLOCK_N": bm} if bm < 128 else None
            res["ms"], res["kernel_rel_err"] = bench(
                call(lambda qx, kx, vx: flex(qx, kx, vx, block_mask=mask, scale=scale, kernel_options=opts)))
            res["kernel"] = f"flex_{bm}"
    except Exception as e:  # a kernel that cannot take this launch is recorded, not fatal
        res["error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"  {name}: {res['error']}", flush=True)
    return res


if __name__ == "__main__":
    main()
