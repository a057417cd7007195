"""Where a sparse call stops paying: the sparse kernels with their per-call packing against dense
SDPA, on scattered slice masks of high density, on an H100-class GPU.

``FGAttnConfig.max_density`` (default 0.9; 0.8 before this probe) sends a site whose profiled mask keeps more than that
fraction of its slices to dense attention until the next profiled call. The default was set when
the Triton kernel took 1.23x cuDNN's time with every slice kept. This probe times, per shape and
kept density, in one run (H100: a sparse call beats cuDNN up to density 0.9 at Wan2.1 480p, 1.0
at HunyuanVideo 480p, 0.95 at CogVideoX-5B, ``results/max_density_h100.json``):

- ``cudnn_ms`` / ``flash_ms``: SDPA with the cuDNN / flash backend (what a dense call runs);
- ``gluon_ms`` / ``triton_ms``: the sparse kernels alone on a random slice mask (each slice kept
  with probability ``density``, independently: the most scattered mask of that density);
- ``pack_ms``: ``packing.packed_from_bits`` of the mask's bitmap without a density budget (what
  every sparse call of a site with ``mask_storage="host"`` does before its kernel);
- ``call_ms`` = the faster kernel + ``pack_ms``, and ``call_over_cudnn``.

Correctness: the first 256 query rows of each kernel's output against a float64 reference of the
same mask (fresh random inputs, outputs poisoned with NaN before the checked launch).

    python benchmarks/max_density_probe.py   # writes benchmarks/results/max_density_<device>.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from masked_dense_probe import bench_ms  # noqa: E402
from results_io import write_result  # noqa: E402

# name: (B, H, S (= S_q = S_kv), D)
CASES = {
    "wan_480p": (1, 12, 32760, 128),
    "hunyuan_480p": (1, 24, 25696, 128),
    "cogvideox_5b": (1, 48, 17776, 64),
}
DENSITIES = (0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
BLOCK_M = 128
ROWS = 256  # query rows checked against float64


def reference_rows(q, k, v, keep, scale):
    """Float64 attention of the first ``ROWS`` queries over the slices ``keep`` (B, H, nQB, S) keeps."""
    s = (q[:, :, :ROWS].double() @ k.double().transpose(-1, -2)) * scale
    rows_keep = keep[:, :, : ROWS // BLOCK_M].repeat_interleave(BLOCK_M, dim=2)
    s = s.masked_fill(~rows_keep, float("-inf"))
    return torch.softmax(s, -1) @ v.double()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    p.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import triton

    from fgcompile.kernels import packing
    from fgcompile.kernels.gluon_sparse_sm90 import launch_sparse_kernel_sm90, sm90_supported
    from fgcompile.kernels.triton_sparse import sparse_attention_triton
    from fgcompile.testing.metrics import rel_err

    dev = torch.device("cuda")
    densities = [float(d) for d in args.densities.split(",") if d]
    rows = []
    for name in [c for c in args.cases.split(",") if c]:
        B, H, S, D = CASES[name]
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        scale = D ** -0.5
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
        nqb = -(-S // BLOCK_M)
        for d in densities:
            keep = torch.rand(B, H, nqb, S, device=dev, generator=g) < d
            bits = packing.pack_bits(keep)
            ref = reference_rows(q, k, v, keep, scale)
            del keep

            def pack():
                return packing.packed_from_bits(bits, S, BLOCK_M, 1, S, 0, cap=S)

            packed = pack()
            row = {"case": name, "B": B, "H": H, "S": S, "D": D, "density": d,
                   "kept_density": float(packed.counts.double().sum()) / (B * H * nqb * S),
                   "cudnn_ms": cudnn_ms, "flash_ms": flash_ms, "pack_ms": bench_ms(pack)}
            out = torch.full_like(q, float("nan"))
            sparse_attention_triton(q, k, v, packed, scale, out=out)
            row["triton_rel_err_f64"] = rel_err(out[:, :, :ROWS], ref)
            row["triton_ms"] = bench_ms(lambda: sparse_attention_triton(q, k, v, packed, scale, out=out))
            out = torch.full_like(q, float("nan"))
            if sm90_supported(q, k, v, out, BLOCK_M, 1, 0):
                launch_sparse_kernel_sm90(q, k, v, out, packed.counts, packed.indices, scale)
                row["gluon_rel_err_f64"] = rel_err(out[:, :, :ROWS], ref)
                row["gluon_ms"] = bench_ms(
                    lambda: launch_sparse_kernel_sm90(q, k, v, out, packed.counts, packed.indices, scale))
            kernel_ms = min(x for x in (row.get("gluon_ms"), row["triton_ms"]) if x)
            row["call_ms"] = kernel_ms + row["pack_ms"]
            row["call_over_cudnn"] = row["call_ms"] / cudnn_ms
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            del packed, bits, out, ref
            torch.cuda.empty_cache()
        del q, k, v

    # per case, the highest density at which a sparse call (kernel + packing) beats cuDNN
    crossover = {}
    for name in dict.fromkeys(r["case"] for r in rows):
        wins = [r["density"] for r in rows if r["case"] == name and r["call_over_cudnn"] < 1.0]
        crossover[name] = max(wins) if wins else None
    result = {
        "what": "sparse kernels + per-call packing vs dense SDPA on random slice masks of high density",
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "dtype": "bfloat16", "block_m": BLOCK_M, "block_n": 1, "rows": rows,
        "highest_density_faster_than_cudnn": crossover,
        "timing": "triton.testing.do_bench median, warmup 25 ms, rep 200 ms",
        "command": "python benchmarks/max_density_probe.py",
    }
    write_result(result, "max_density", args.out)
    print(f"{'case':14} {'dens':>5} {'cudnn':>7} {'flash':>7} {'gluon':>7} {'triton':>7} {'pack':>6} {'call/cudnn':>10} {'err':>8}")
    for r in rows:
        f = lambda x: f"{x:7.2f}" if isinstance(x, float) else f"{'-':>7}"  # noqa: E731
        print(f"{r['case']:14} {r['density']:5.2f} {f(r['cudnn_ms'])} {f(r['flash_ms'])} {f(r.get('gluon_ms'))} "
              f"{f(r['triton_ms'])} {r['pack_ms']:6.3f} {r['call_over_cudnn']:10.3f} "
              f"{max(r.get('gluon_rel_err_f64', 0), r['triton_rel_err_f64']):8.1e}")
    print("highest density faster than cuDNN:", crossover)


if __name__ == "__main__":
    main()
