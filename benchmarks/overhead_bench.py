"""Run-time overheads around the sparse kernel (what a compiled model does at every call), on an
H100-class GPU: B=1, H=12, D=128, bf16, block_m=128, block_n=1, S = 32,760 (Wan 480p) and 75,600 (720p).

- pack_from_bits: cached bitmap -> PackedSlices (every sparse call of the "profile" predictor):
  the Triton kernel (a small sweep of CHUNK x warps) vs the torch ops (unpack_bits + pack_slices);
- pack_bits: bool keep mask -> bitmap: Triton vs the int32 torch formulation vs the old int64 one;
- profile call: profile_attention_bits (fused threshold, writes the bitmap) vs profile_attention
  (float32 block maxima) + keep_from_block_max + pack_bits, and dense cuDNN SDPA;
- pooled predictor: pooled_bits (Triton query pooling + matmul + Triton selection) vs
  pooled_slices + pack_bits (torch), its parts (the pooling by torch ops vs the Triton pass; the
  selection at CDF_STEPS vs the former 12 steps, and the search plans of equal precision,
  ``predictors.CDF_PLANS``), and its share of dense cuDNN (budget 5%).
Each Triton result is checked against the torch path in the same run. do_bench medians, ms.

    python benchmarks/overhead_bench.py [--seqs 32760,75600] [--out benchmarks/results/overhead_h100.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from fgcompile import predictors  # noqa: E402
from fgcompile.attention import profile_attention, profile_attention_bits  # noqa: E402
from fgcompile.kernels import packing  # noqa: E402
from fgcompile.kernels.triton_pack import packed_from_bits_triton  # noqa: E402


def bench(fn, rep=60):
    return float(do_bench(fn, warmup=10, rep=rep))


def old_pack_bits(keep):
    n = keep.shape[-1]
    nw = -(-n // 32)
    x = F.pad(keep.to(torch.int64), (0, nw * 32 - n)).reshape(keep.shape[:-1] + (nw, 32))
    w = (x << torch.arange(32, device=keep.device)).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def cudnn_dense(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def run(S, out_rows, sweep):
    B, H, D, bm = 1, 12, 128, 128
    dev = "cuda"
    nqb = -(-S // bm)
    row = {"S": S}
    torch.manual_seed(0)
    # q scaled: peaked softmax rows, so the profiled mask is not all-kept (random rows are near uniform)
    q = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16) * 3
    k = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)
    row["cudnn_dense_ms"] = bench(lambda: cudnn_dense(q, k, v))

    # -- bitmap -> PackedSlices
    keep = torch.rand(B, H, nqb, S, device=dev) < 0.3
    keep[:, :, :, :1024] = True  # some full tiles
    words = packing.pack_bits(keep)
    a = packing.packed_from_bits(words, S, bm, 1, S)
    b = packing.packed_from_bits(words, S, bm, 1, S, impl="torch")
    row["pack_from_bits_equal"] = all(
        torch.equal(getattr(a, n), getattr(b, n)) for n in ("counts", "indices", "full_counts", "full_tiles")
    )
    del a, b
    row["pack_from_bits_triton_ms"] = bench(lambda: packing.packed_from_bits(words, S, bm, 1, S))
    row["pack_from_bits_torch_ms"] = bench(lambda: packing.packed_from_bits(words, S, bm, 1, S, impl="torch"), rep=40)
    row["pack_from_bits_triton_nofull_ms"] = bench(lambda: packing.packed_from_bits(words, S, bm, 1, S, 0))
    idx_bytes = 4 * B * H * nqb * S
    row["pack_from_bits_GBps"] = idx_bytes / row["pack_from_bits_triton_ms"] / 1e6
    if sweep:
        sw = {}
        for chunk in (1024, 2048, 4096):
            for warps in (2, 4, 8):
                try:
                    sw[f"c{chunk}w{warps}"] = bench(
                        lambda: packed_from_bits_triton(words, S, bm, 1, S, 128, chunk=chunk, num_warps=warps), rep=30
                    )
                except Exception as e:  # noqa: BLE001
                    sw[f"c{chunk}w{warps}"] = repr(e)[:80]
        row["pack_from_bits_sweep_ms"] = sw

    # -- bool -> bitmap
    row["pack_bits_equal"] = torch.equal(packing.pack_bits(keep), old_pack_bits(keep)) and torch.equal(
        packing.pack_bits(keep, impl="torch"), words
    )
    row["pack_bits_triton_ms"] = bench(lambda: packing.pack_bits(keep))
    row["pack_bits_torch_int32_ms"] = bench(lambda: packing.pack_bits(keep, impl="torch"), rep=40)
    row["pack_bits_torch_int64_old_ms"] = bench(lambda: old_pack_bits(keep), rep=40)
    del keep, words

    # -- profiled call
    out1, bits, kept = profile_attention_bits(q, k, v, alpha=0.5, block_m=bm)
    out2, probs = profile_attention(q, k, v, block_m=bm)
    ref_bits = packing.pack_bits(predictors.keep_from_block_max(probs, alpha=0.5))
    row["profile_out_equal"] = torch.equal(out1, out2)
    row["profile_bits_mismatch"] = int((packing.unpack_bits(bits, S) != packing.unpack_bits(ref_bits, S)).sum())
    row["profile_density"] = float(kept.float().mean() / S)
    del out1, out2, probs, ref_bits, bits, kept
    row["profile_fused_ms"] = bench(lambda: profile_attention_bits(q, k, v, alpha=0.5, block_m=bm), rep=100)

    def float_path():
        o, p = profile_attention(q, k, v, block_m=bm)
        return o, packing.pack_bits(predictors.keep_from_block_max(p, alpha=0.5))

    row["profile_float_path_ms"] = bench(float_path, rep=100)
    row["profile_fused_over_cudnn"] = row["profile_fused_ms"] / row["cudnn_dense_ms"]

    # -- pooled predictor (self-similar query blocks so the top-CDF rule, not the fallback, runs)
    qp = q / 3 + 2.0 * torch.randn(1, H, 1, D, device=dev, dtype=torch.bfloat16)
    pb = predictors.pooled_bits(qp, k, tau=0.9, block_m=bm)
    pk = predictors.pooled_slices(qp, k, tau=0.9, block_m=bm)
    got = packing.unpack_bits(pb, S)
    row["pooled_disagree_frac"] = float((got != pk).float().mean())
    row["pooled_density"] = float(got.float().mean())
    del pb, pk, got
    row["pooled_bits_ms"] = bench(lambda: predictors.pooled_bits(qp, k, tau=0.9, block_m=bm))
    row["pooled_torch_ms"] = bench(
        lambda: packing.pack_bits(predictors.pooled_slices(qp, k, tau=0.9, block_m=bm)), rep=60
    )
    logits, dis, valid = predictors._pooled_parts(qp, k, gamma=0.5, block_m=bm, block_n=1, scale=D**-0.5, key_padding=None, keep_lowp=True)
    from fgcompile.kernels.triton_pooled import pooled_select_bits_triton

    from fgcompile.kernels.triton_pooled import pool_queries_triton

    qk_, dk_ = pool_queries_triton(qp, bm, 0.5, D**-0.5, torch.float32)
    qt_, dt_ = predictors._pooled_queries(qp, gamma=0.5, block_m=bm, scale=D**-0.5, ct=torch.float32, out_dtype=torch.float32, kernel=False)
    row["pool_queries_kernel_max_abs_err"] = float((qk_ - qt_).abs().max())
    row["pool_queries_dissimilar_disagree"] = int((dk_ != dt_).sum())
    row["pool_queries_kernel_ms"] = bench(lambda: pool_queries_triton(qp, bm, 0.5, D**-0.5, torch.bfloat16))
    for name, kern in (("torch", False), ("kernel", True)):  # the pooling by torch ops / by the Triton pass
        row[f"pooled_parts_{name}_ms"] = bench(
            lambda: predictors._pooled_parts(qp, k, gamma=0.5, block_m=bm, block_n=1, scale=D**-0.5, key_padding=None,
                                             keep_lowp=True, pool_kernel=kern)
        )
    row["cdf_steps"], row["cdf_arity"] = predictors.CDF_STEPS, predictors.CDF_ARITY
    row["pooled_select_kernel_ms"] = bench(
        lambda: pooled_select_bits_triton(logits, valid, dis, 0.9, predictors.CDF_STEPS, arity=predictors.CDF_ARITY))
    row["pooled_select_kernel_12_steps_ms"] = bench(lambda: pooled_select_bits_triton(logits, valid, dis, 0.9, 12))
    # search plans of equal precision (bisection, 3 / 15 thresholds per pass): same bits, which is fastest
    ref_bits = pooled_select_bits_triton(logits, valid, dis, 0.9, predictors.CDF_STEPS, arity=1)
    row["pooled_select_plans"] = {
        f"arity{a}_passes{n}": {
            "ms": bench(lambda: pooled_select_bits_triton(logits, valid, dis, 0.9, n, arity=a)),
            "bits_equal": bool(torch.equal(pooled_select_bits_triton(logits, valid, dis, 0.9, n, arity=a), ref_bits)),
        }
        for a, n in predictors.CDF_PLANS
    }
    if sweep:
        row["pooled_select_sweep_ms"] = {
            f"w{w}": bench(lambda: pooled_select_bits_triton(logits, valid, dis, 0.9, predictors.CDF_STEPS, num_warps=w), rep=30)
            for w in (8, 16, 32)
        }
    row["pooled_over_cudnn"] = row["pooled_bits_ms"] / row["cudnn_dense_ms"]
    del logits
    out_rows.append(row)
    print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="32760,75600")
    ap.add_argument("--out", default="benchmarks/results/overhead_h100.json")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    rows = []
    for S in [int(s) for s in args.seqs.split(",")]:
        try:
            run(S, rows, sweep=not args.no_sweep and S == 32760)
        except Exception as e:  # noqa: BLE001  keep the other size's figures
            rows.append({"S": S, "error": repr(e)[:500]})
            print("ERROR", S, repr(e)[:500], flush=True)
        torch.cuda.empty_cache()
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": "B=1, H=12, D=128, bf16, block_m=128, block_n=1",
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
