"""Kernel benchmark (issue 4): fgcompile's sparse kernel against cuDNN / flash SDPA and
FlexAttention, on an H100-class GPU.

Shapes B=1, H=12, D=128, bf16, S = 32,760 (Wan 480p: 21 x 30 x 52) and 75,600 (720p: 21 x 45 x 80).
Masks (block_m = 128, block_n = 1, the same for every head):
  - random slice masks at kept density 1.0, 0.6, 0.3, 0.1;
  - structured masks on the video grid: 3D-local heads (frames within +-wt, rows within +-wh of the
    block's queries) and temporal heads (the block's own spatial positions, or rows +-wh, in every
    frame).
Baselines, in the same run: SDPA with the cuDNN backend, SDPA flash, FlexAttention with a 128 x 128
BlockMask of random tiles at the same density (all full blocks: its fastest path), and
FlexAttention with the 128 x 128 BlockMask covering the same fine-grained mask (full blocks where a
tile is kept whole, partial blocks with a mask_mod reading the slice mask: the same function).
Times are triton.testing.do_bench medians (ms) of the kernel alone: masks are packed once and
reused (as across diffusion steps); pack_ms gives the packing time. "limit_ms" = density x cuDNN
time; "gap_to_limit" = ours / limit.

    python benchmarks/kernel_bench.py [--seqs 32760,75600] [--out benchmarks/results/kernel_<device>.json]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("FGCOMPILE_AUTOTUNE", "1")  # the direct launches autotune (the recorded picks)
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from fgcompile.attention import pack_slices  # noqa: E402
from fgcompile.testing.metrics import rel_err  # noqa: E402
from fgcompile.kernels import reference  # noqa: E402
from fgcompile.kernels.gluon_sparse_sm90 import launch_sparse_kernel_sm90, sm90_supported  # noqa: E402
from fgcompile.kernels.triton_sparse import best_config, sparse_attention_triton  # noqa: E402
from flex_masks import slice_covering_block_mask, tile_block_mask, tile_reference  # noqa: E402

GRIDS = {32760: (21, 30, 52), 75600: (21, 45, 80)}
B, H, D, BM = 1, 12, 128, 128
DENSITIES = (1.0, 0.6, 0.3, 0.1)
STRUCTURED = {
    # name: (kind, frame window wt, row window wh) -- the block's own columns are all covered
    "local3d_small": ("local", 2, 3),
    "local3d_large": ("local", 5, 6),
    "temporal_same_pos": ("temporal_pos", None, None),
    "temporal_rows": ("temporal_rows", None, 1),
}


def bench_ms(fn, rep=200):
    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def structured_mask(S, kind, wt, wh, device):
    """bool (1, 1, nQB, S): query block i keeps key j by the video-grid rule of ``kind``."""
    T, Hh, W = GRIDS[S]
    n = torch.arange(S, device=device)
    t, h, w = n // (Hh * W), (n // W) % Hh, n % W
    nqb = -(-S // BM)
    keep = torch.zeros(nqb, S, dtype=torch.bool, device=device)
    if kind == "temporal_pos":  # the block's own spatial positions, in every frame
        sp = h * W + w
        for i in range(nqb):
            rows = n[i * BM : (i + 1) * BM]
            hit = torch.zeros(Hh * W, dtype=torch.bool, device=device)
            hit[sp[rows]] = True
            keep[i] = hit[sp]
        return keep[None, None]
    chunk = 8
    for i0 in range(0, nqb, chunk):
        i1 = min(nqb, i0 + chunk)
        qi = torch.arange(i0 * BM, min(S, i1 * BM), device=device)
        qt, qh = t[qi], h[qi]
        ok = (qh[:, None] - h[None, :]).abs() <= wh
        if kind == "local":
            ok &= (qt[:, None] - t[None, :]).abs() <= wt
        pad = (i1 - i0) * BM - qi.numel()
        if pad:
            ok = torch.cat([ok, torch.zeros(pad, S, dtype=torch.bool, device=device)])
        keep[i0:i1] = ok.reshape(i1 - i0, BM, S).any(1)
    return keep[None, None]


def flex_block_mask_random(density, S, device, gen):
    """A BlockMask of random 128 x 128 tiles kept with probability ``density``, all full blocks, and
    its (B, H, nQB, nKB) tile mask."""
    n = -(-S // 128)
    tk = torch.rand(B, H, n, n, device=device, generator=gen) < density
    return tile_block_mask(tk, 128, S, mask_mod=False), tk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="32760,75600")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--check", action="store_true", help="check the tuned kernel against the reference first")
    args = ap.parse_args()
    dev = "cuda"
    name = torch.cuda.get_device_name()
    slug = "h100" if "H100" in name else ("h200" if "H200" in name else name.lower().replace(" ", "_"))
    out_path = args.out or os.path.join(os.path.dirname(__file__), "results", f"kernel_{slug}.json")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows, misc = [], {}

    def write(summary, complete):
        """The JSON so far (after every row: a run cut short by its time limit keeps its rows)."""
        result = {
            "device": name,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "shape": {"B": B, "H": H, "D": D, "dtype": "bfloat16", "block_m": BM, "block_n": 1},
            "timing": "triton.testing.do_bench median, warmup 25 ms, rep 200 ms",
            "complete": complete,
            "rows": rows,
            "summary": summary,
            "misc": misc,
            "autotune": best_config(),
        }
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    for S in [int(x) for x in args.seqs.split(",")]:
        q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
        scale = D ** -0.5
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            t_cudnn = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            t_flash = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        t_flex_dense = None
        # The autotuner keys on (head dim, block_n, block_m, full-tile size, S bucket), not on the
        # mask: tune once on a gather-heavy mask (random, density 0.3), as a deployment would
        # tune on its typical masks; every row below then uses that config.
        nqb = -(-S // BM)
        warm = pack_slices(torch.rand(B, H, nqb, S, device=dev, generator=gen) < 0.3, block_m=BM, seq_len_kv=S)
        sparse_attention_triton(q, k, v, warm, scale)
        del warm
        print(f"S={S}: cudnn {t_cudnn:.3f} ms, flash {t_flash:.3f} ms", flush=True)
        nqb = -(-S // BM)
        cases = [("random", d, None) for d in DENSITIES] + [("structured", None, nm) for nm in STRUCTURED]
        for kind, dens, sname in cases:
            if kind == "random":
                keep = torch.rand(B, H, nqb, S, device=dev, generator=gen) < dens
                label = f"random_d{dens}"
            else:
                knd, wt, wh = STRUCTURED[sname]
                keep = structured_mask(S, knd, wt, wh, dev).expand(B, H, nqb, S).contiguous()
                label = sname
            density = keep.float().mean().item()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            packed = pack_slices(keep, block_m=BM, seq_len_kv=S)
            torch.cuda.synchronize()
            pack_ms = (time.perf_counter() - t0) * 1e3
            out = torch.empty_like(q)
            t_ours = bench_ms(lambda: sparse_attention_triton(q, k, v, packed, scale, out=out))
            cfg = best_config()
            row = {
                "S": S, "mask": label, "kind": kind, "density": round(density, 4),
                "full_tile_fraction": round(float(packed.full_counts.sum() * 128 / max(1, keep.sum().item())), 4),
                "ours_ms": round(t_ours, 4), "pack_ms": round(pack_ms, 2),
                "cudnn_ms": round(t_cudnn, 4), "flash_ms": round(t_flash, 4),
                "limit_ms": round(density * t_cudnn, 4),
                "gap_to_limit": round(t_ours / (density * t_cudnn), 3),
                "speedup_vs_cudnn": round(t_cudnn / t_ours, 3),
                "kept_tflops": round(4 * B * H * S * S * D * density / (t_ours * 1e-3) / 1e12, 1),
            }
            p0 = pack_slices(keep, block_m=BM, seq_len_kv=S, full_tile=0)
            if kind == "random" and dens == 1.0:
                row["ours_nofull_ms"] = round(bench_ms(lambda: sparse_attention_triton(q, k, v, p0, scale, out=out)), 4)
            if sm90_supported(q, k, v, out, BM, 1, 0):
                # the Gluon sm_90 kernel: what the product launches on Hopper (no full tiles); its
                # output against the Triton kernel's on the same mask (both bf16)
                o90 = torch.full_like(q, float("nan"))
                t90 = bench_ms(lambda: launch_sparse_kernel_sm90(q, k, v, o90, p0.counts, p0.indices, scale))
                row["ours_sm90_ms"] = round(t90, 4)
                row["sm90_vs_triton_rel_diff"] = round(rel_err(o90, out), 6)
                row["speedup_vs_cudnn_sm90"] = round(t_cudnn / t90, 3)
                del o90
            del p0
            if kind == "random" and dens == 0.3 and args.check and S == 32760:
                hs = slice(0, 2)
                torch.backends.cuda.matmul.allow_tf32 = True
                ref = reference.sparse_attention_reference(q[:, hs], k[:, hs], v[:, hs], keep[:, hs], BM, 1, scale)
                torch.backends.cuda.matmul.allow_tf32 = False
                err = rel_err(out[:, hs], ref)
                misc["check_rel_err_S32760_d03_heads01"] = err
                print(f"  check vs reference (heads 0-1): rel err {err:.2e}", flush=True)
                assert err < 1e-2, err
            if flex is not None:
                if kind == "random":
                    bm_eq, tiles = flex_block_mask_random(dens, S, dev, gen)
                    row["flex_equal_ms"] = round(bench_ms(lambda: flex(q, k, v, block_mask=bm_eq, scale=scale)), 4)
                    row["flex_equal_tile_density"] = round(tiles.float().mean().item(), 4)
                    # FlexAttention's own output against the tile-sparse reference, heads 0-1 (session 18
                    # saw it off by 56% on a tile BlockMask on the GPU)
                    fo = flex(q, k, v, block_mask=bm_eq, scale=scale)
                    row["flex_equal_rel_err"] = round(rel_err(fo[:, :2], tile_reference(q, k, v, tiles, 128, scale)), 5)
                    del fo
                    row["speedup_vs_flex_equal"] = round(row["flex_equal_ms"] / t_ours, 3)
                    if "ours_sm90_ms" in row:
                        row["speedup_sm90_vs_flex_equal"] = round(row["flex_equal_ms"] / row["ours_sm90_ms"], 3)
                    if dens == 1.0:
                        t_flex_dense = row["flex_equal_ms"]
                    del bm_eq
                bm_cov, d_cov = slice_covering_block_mask(keep, S)
                row["flex_covering_ms"] = round(bench_ms(lambda: flex(q, k, v, block_mask=bm_cov, scale=scale)), 4)
                row["flex_covering_tile_density"] = round(d_cov, 4)
                row["speedup_vs_flex_covering"] = round(row["flex_covering_ms"] / t_ours, 3)
                if "ours_sm90_ms" in row:
                    row["speedup_sm90_vs_flex_covering"] = round(row["flex_covering_ms"] / row["ours_sm90_ms"], 3)
                # the covering BlockMask computes the same function as the slice mask: its output
                # against the sparse kernel's (heads 0-1)
                fo = flex(q, k, v, block_mask=bm_cov, scale=scale)[:, :2].float()
                row["flex_covering_vs_ours_rel_diff"] = round(rel_err(fo, out[:, :2]), 5)
                del fo
                del bm_cov
            row["config"] = cfg
            rows.append(row)
            print("  " + json.dumps({x: row[x] for x in row if x != "config"}), flush=True)
            write({}, complete=False)
            del keep, packed
            torch.cuda.empty_cache()
        misc[f"flex_dense_ms_S{S}"] = t_flex_dense

    def pick(S, mask):
        return next(r for r in rows if r["S"] == S and r["mask"] == mask)

    summary = {}
    if any(r["S"] == 32760 for r in rows):
        r03, r10 = pick(32760, "random_d0.3"), pick(32760, "random_d1.0")
        summary["speedup_vs_cudnn_d03"] = round(r03["cudnn_ms"] / r03["ours_ms"], 3)
        summary["ratio_to_cudnn_d10"] = round(r10["ours_ms"] / r10["cudnn_ms"], 3)
        if "ours_sm90_ms" in r03:
            summary["speedup_vs_cudnn_d03_sm90"] = r03["speedup_vs_cudnn_sm90"]
            summary["speedup_sm90_vs_flex_equal_d03"] = r03.get("speedup_sm90_vs_flex_equal")
        if flex is not None:
            summary["speedup_vs_flex_equal_d03"] = r03["speedup_vs_flex_equal"]
            st = [r for r in rows if r["S"] == 32760 and r["kind"] == "structured"]
            summary["speedup_vs_flex_covering_temporal"] = min(r["speedup_vs_flex_covering"] for r in st if r["mask"].startswith("temporal"))
            summary["min_speedup_vs_flex_covering_structured"] = min(r["speedup_vs_flex_covering"] for r in st)
    write(summary, complete=True)
    print(f"\nwrote {out_path}")
    hdr = (f"{'S':>6} {'mask':<18} {'dens':>6} {'ours':>8} {'sm90':>8} {'limit':>8} {'gap':>5} {'cudnn':>7} {'flexEq':>7} "
           f"{'eqErr':>6} {'flexCov':>7} {'covDiff':>7} {'TF/s':>5}")
    print(hdr)
    nan = float("nan")
    for r in rows:
        print(
            f"{r['S']:>6} {r['mask']:<18} {r['density']:>6.3f} {r['ours_ms']:>8.3f} {r.get('ours_sm90_ms', nan):>8.3f} "
            f"{r['limit_ms']:>8.3f} {r['gap_to_limit']:>5.2f} {r['cudnn_ms']:>7.2f} {r.get('flex_equal_ms', nan):>7.2f} "
            f"{r.get('flex_equal_rel_err', nan):>6.3f} {r.get('flex_covering_ms', nan):>7.2f} "
            f"{r.get('flex_covering_vs_ours_rel_diff', nan):>7.4f} {r['kept_tflops']:>5.0f}"
        )
    print("summary:", json.dumps(summary))


if __name__ == "__main__":
    main()
