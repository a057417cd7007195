"""What bounds the bitmap -> kept-key lists packing (``packed_from_bits``) at Wan 480p?

At every sparse call with a cached mask the run time packs the site's bitmap into index lists. In
the model (``kernel_in_model_h100.json``) that costs 0.30 ms per layer at density 0.3 and 0.73 ms
at 0.6 (cap = the budget), in proportion to the kept keys written (~0.4 TB/s), while the same
kernel writes a 0.3-dense mask's lists at cap = nKB (zero-filled tails: 3.3x the bytes) in
0.34 ms. This script times the kernel on masks with exactly the budget's count per row (as the
density budget makes them), at densities 0.3 and 0.6 and cap = the budget, over a grid of its
launch parameters (keys per loop step ``chunk``, ``num_warps`` and programs per row ``segments``) and with int16 lists (half
the bytes scattered: is the kernel bound by its stores?), and checks every variant against the
default one.

    python benchmarks/pack_probe.py [--out OUT.json]       # the timing grid
    python benchmarks/pack_probe.py --once                  # one launch of the default, for ncu:
    ncu --clock-control none -k regex:_packed_from_bits -c 1 --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        python benchmarks/pack_probe.py --once
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

B, H, S, BLOCK_M = 1, 12, 32760, 128
FT = 0  # full_tile of the packing, set in main()


def budget_bits(density: float, gen: torch.Generator):
    """A bitmap whose rows each keep exactly round(density * S) random keys, and that count."""
    from fgcompile.kernels.packing import pack_bits

    per_row = int(round(density * S))
    scores = torch.rand(B, H, -(-S // BLOCK_M), S, device=gen.device, generator=gen)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(per_row, -1).indices, True)
    return pack_bits(keep), per_row


def main(argv=None) -> None:
    import triton
    from results_io import write_result

    from fgcompile.kernels.packing import model_full_tile
    from fgcompile.kernels.triton_pack import PACK_CHUNK, PACK_WARPS, packed_from_bits_triton

    global FT
    FT = model_full_tile(1)  # the compiled model's packing (no full tiles: rows may be split into segments)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--once", action="store_true", help="one launch of the default config at density 0.3 (for ncu)")
    args = p.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.once:
        bits, cap = budget_bits(0.3, gen)
        packed_from_bits_triton(bits, S, BLOCK_M, 1, S, FT, cap=cap)
        torch.cuda.synchronize()
        return
    rows = []
    for density in (0.3, 0.6):
        bits, cap = budget_bits(density, gen)
        ref = packed_from_bits_triton(bits, S, BLOCK_M, 1, S, FT, cap=cap, segments=1)
        idx_bytes = ref.indices.numel() * 4
        grid = [(c, w, g) for c in (512, 1024, 2048) for w in (2, 4, 8) for g in (1, 2, 4, 8)]
        grid.append((PACK_CHUNK, PACK_WARPS, None))  # the default launch (segments for ~PACK_PROGRAMS programs)
        for chunk, warps, seg in grid:
            kw = dict(cap=cap, chunk=chunk, num_warps=warps, segments=seg)
            got = packed_from_bits_triton(bits, S, BLOCK_M, 1, S, FT, **kw)
            same = all(torch.equal(a, b) for a, b in zip(
                (got.counts, got.indices, got.full_counts), (ref.counts, ref.indices, ref.full_counts)))
            ms = triton.testing.do_bench(lambda: packed_from_bits_triton(bits, S, BLOCK_M, 1, S, FT, **kw),
                                         warmup=10, rep=100, return_mode="median")
            rows.append(dict(density=density, cap=cap, chunk=chunk, num_warps=warps, segments=seg, index_dtype="int32",
                             ms=ms, equal=same, index_GBps=idx_bytes / ms / 1e6, default=seg is None))
            print(f"d{density} chunk {chunk:5d} warps {warps} segments {seg}: {ms:.4f} ms  {idx_bytes / ms / 1e6:7.1f} GB/s"
                  f"{'  (default)' if seg is None else ''}{'' if same else '  MISMATCH'}", flush=True)
        # the same writes in half the bytes: is the kernel bound by the bytes it scatters?
        got16 = packed_from_bits_triton(bits, S, BLOCK_M, 1, S, FT, cap=cap, index_dtype=torch.int16)
        same16 = torch.equal(got16.indices.to(torch.int32), ref.indices)
        ms16 = triton.testing.do_bench(
            lambda: packed_from_bits_triton(bits, S, BLOCK_M, 1, S, FT, cap=cap, index_dtype=torch.int16),
            warmup=10, rep=100, return_mode="median")
        rows.append(dict(density=density, cap=cap, chunk=PACK_CHUNK, num_warps=PACK_WARPS, segments=None, index_dtype="int16", ms=ms16,
                         equal=same16, index_GBps=idx_bytes / 2 / ms16 / 1e6, default=False))
        print(f"d{density} int16 lists (default launch): {ms16:.4f} ms{'' if same16 else '  MISMATCH'}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "shape": dict(B=B, H=H, S=S, block_m=BLOCK_M, block_n=1, full_tile=FT), "rows": rows}
    for d in (0.3, 0.6):
        best = min((r for r in rows if r["density"] == d and r["index_dtype"] == "int32"), key=lambda r: r["ms"])
        dflt = next(r for r in rows if r["density"] == d and r["default"])
        result[f"best_d{d}"] = best
        result[f"default_over_best_d{d}"] = dflt["ms"] / best["ms"]
        one = next(r for r in rows if r["density"] == d and r["chunk"] == PACK_CHUNK and r["num_warps"] == PACK_WARPS
                   and r["segments"] == 1)
        result[f"one_segment_over_default_d{d}"] = one["ms"] / dflt["ms"]
        print(f"d{d}: default {dflt['ms']:.4f} ms, one segment per row {one['ms']:.4f} ms, best {best['ms']:.4f} ms "
              f"(chunk {best['chunk']}, warps {best['num_warps']}, segments {best['segments']})")
    write_result(result, "pack_probe", args.out)


if __name__ == "__main__":
    main()
