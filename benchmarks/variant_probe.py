"""Variant probe: candidate tile configs of the sparse kernel and knobs of the pooled predictor,
timed in one run against the dense baselines of the same run (GPU only).

Sparse kernel, Wan 480p self-attention (B=1, H=12, S=32,760, D=128, bf16, block_m=128, block_n=1),
random slice masks that keep a fixed share of keys per query block (as the density budget does):
each config's output is checked first (poisoned output buffer, float64 reference on two heads),
then timed (do_bench median) next to SDPA cuDNN and SDPA flash. (Session 7 also timed each 128-row
query block run as two 64-row programs over the same key list, two per SM: 13-50% slower in every
tile shape, results/session7/variant_probe_h200_tiles.json; that launch option was removed.)

Layout (``--parts layout``): the shipped config on contiguous (B, H, S, D) q/k/v/out and on
(B, S, H, D) tensors seen through transpose(1, 2), as diffusers' attention passes them.

Pooled predictor: ``pooled_bits`` end to end, then its parts: the query pooling at 4 / 8 warps, the
selection at 8 / 16 / 32 warps and 8 to 12 search steps (the kept density each gives: fewer steps
keep a few more keys near the threshold, never fewer).

    python benchmarks/variant_probe.py [--out benchmarks/results/variant_probe_<device>.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from triton.testing import do_bench  # noqa: E402

from fgcompile import predictors  # noqa: E402
from fgcompile.testing.metrics import rel_err  # noqa: E402
from fgcompile.attention import pack_slices  # noqa: E402
from fgcompile.kernels import packing, reference  # noqa: E402
from fgcompile.kernels.triton_pooled import pool_queries_triton, pooled_select_bits_triton  # noqa: E402
from fgcompile.kernels.triton_sparse import sparse_attention_triton  # noqa: E402
from results_io import write_result  # noqa: E402

B, H, S, D, BM = 1, 12, 32760, 128, 128

#: name -> sparse-kernel config (the first is the shipped heuristic config)
KERNEL_CONFIGS = {
    "m128_n128_w8_s3": {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "PAD_TAIL": True},
    # the shipped config without splitting the last wave's blocks (triton_sparse.tail_split)
    "m128_n128_w8_s3_no_tail_split": {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "PAD_TAIL": True, "SLOTS": 0},
    "m128_n128_w8_s3_masked_tail": {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "PAD_TAIL": False},
    # the shipped config once more, last: the run's own noise
    "m128_n128_w8_s3_again": {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "PAD_TAIL": True},
    "m128_n128_w8_s2": {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "m128_n64_w8_s3": {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    "m128_n64_w8_s4": {"BLOCK_N": 64, "num_warps": 8, "num_stages": 4},
    # two programs per SM (96 KB of shared memory, registers capped at 128 per thread), so that
    # their softmax and tensor-core phases interleave: 3% slower than the shipped config at d0.6
    # (session 11; BLOCK_N 32 variants 15-18% slower: results/session11/variant_probe_h200_2cta.json)
    "m128_n64_w8_s2_r128": {"BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "maxnreg": 128},
}


def ms(fn, rep=100):
    return float(do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def budget_mask(density, gen):
    """bool (B, H, nQB, S): each query block keeps round(density * S) random keys."""
    nqb = -(-S // BM)
    n = round(density * S)
    r = torch.rand(B, H, nqb, S, device="cuda", generator=gen)
    thr = r.kthvalue(S - n + 1, dim=-1, keepdim=True).values
    return r >= thr


def dense_baselines(q, k, v) -> tuple[float, float]:
    """(SDPA cuDNN ms, SDPA flash ms) on q, k, v: the dense baselines of a run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        cudnn = ms(lambda: F.scaled_dot_product_attention(q, k, v))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = ms(lambda: F.scaled_dot_product_attention(q, k, v))
    return cudnn, flash


def kernel_part(res):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    scale = D ** -0.5
    cudnn, flash = dense_baselines(q, k, v)
    res["kernel"] = {"cudnn_ms": cudnn, "flash_ms": flash, "rows": []}
    print(f"cudnn {cudnn:.3f} ms  flash {flash:.3f} ms", flush=True)
    hs = slice(0, 2)
    for dens in (0.6, 0.3):
        keep = budget_mask(dens, gen)
        packed = pack_slices(keep, block_m=BM, seq_len_kv=S, full_tile=0)
        torch.backends.cuda.matmul.allow_tf32 = False
        ref = reference.sparse_attention_reference(q[:, hs].double(), k[:, hs].double(), v[:, hs].double(),
                                                   keep[:, hs], BM, 1, scale)
        for name, cfg in KERNEL_CONFIGS.items():
            row = {"density": dens, "config": name, **cfg}
            out = torch.full_like(q, float("nan"))
            try:
                sparse_attention_triton(q, k, v, packed, scale, config=cfg, out=out)
                torch.cuda.synchronize()
                row["rel_err_vs_fp64"] = rel_err(out[:, hs], ref)
                row["nan"] = bool(out.isnan().any())
                t = ms(lambda: sparse_attention_triton(q, k, v, packed, scale, config=cfg, out=out))
                row.update(ms=t, speedup_vs_cudnn=cudnn / t, ratio_to_limit=t / (dens * cudnn),
                           kept_tflops=4 * B * H * S * S * D * dens / (t * 1e-3) / 1e12)
            except Exception as e:  # a config that does not compile or fit: recorded, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            res["kernel"]["rows"].append(row)
            print(f"d{dens} {name:18s} " + (f"{row['ms']:.3f} ms  x{row['speedup_vs_cudnn']:.3f}  "
                  f"limit x{row['ratio_to_limit']:.3f}  err {row['rel_err_vs_fp64']:.1e}" if "ms" in row else row["error"]),
                  flush=True)
        del keep, packed, ref


def layout_part(res):
    """The shipped config on q/k/v/out as contiguous (B, H, S, D) tensors and as diffusers passes
    them, (B, S, H, D) tensors seen through transpose(1, 2); cuDNN on the same two layouts."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(2)
    cfg = KERNEL_CONFIGS["m128_n128_w8_s3"]
    scale = D ** -0.5
    out_rows = res["layout"] = []
    for layout in ("bhsd", "bshd"):
        if layout == "bhsd":
            q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        else:
            q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
                       for _ in range(3))
        out = torch.empty_like(q)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cudnn = ms(lambda: F.scaled_dot_product_attention(q, k, v))
        for dens in (0.6, 0.3):
            packed = pack_slices(budget_mask(dens, gen), block_m=BM, seq_len_kv=S, full_tile=0)
            t = ms(lambda: sparse_attention_triton(q, k, v, packed, scale, config=cfg, out=out))
            out_rows.append({"layout": layout, "density": dens, "ms": t, "cudnn_ms": cudnn, "speedup_vs_cudnn": cudnn / t})
            print(f"layout {layout} d{dens}: {t:.3f} ms, cudnn {cudnn:.3f} ms", flush=True)
            del packed


def pooled_part(res):
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    qp = q + 2.0 * torch.randn(1, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)  # self-similar blocks
    out = res["pooled"] = {"steps_default": predictors.CDF_STEPS}
    out["pooled_bits_ms"] = ms(lambda: predictors.pooled_bits(qp, k, tau=0.9, block_m=BM))
    out["pool_ms"] = {f"w{w}": ms(lambda: pool_queries_triton(qp, BM, 0.5, D ** -0.5, torch.bfloat16, num_warps=w))
                      for w in (4, 8)}
    logits, dis, valid = predictors._pooled_parts(qp, k, gamma=0.5, block_m=BM, block_n=1, scale=D ** -0.5,
                                                  key_padding=None, keep_lowp=True)
    out["parts_ms"] = ms(lambda: predictors._pooled_parts(qp, k, gamma=0.5, block_m=BM, block_n=1, scale=D ** -0.5,
                                                          key_padding=None, keep_lowp=True))
    ref = pooled_select_bits_triton(logits, valid, dis, 0.9, 12)
    ref_kept = packing.unpack_bits(ref, S)
    out["density_12_steps"] = float(ref_kept.float().mean())
    sel = out["select"] = {}
    for steps in (8, 9, 10, 12):
        bits = pooled_select_bits_triton(logits, valid, dis, 0.9, steps)
        kept = packing.unpack_bits(bits, S)
        sel[f"steps{steps}"] = {
            "density": float(kept.float().mean()),
            "superset_of_12": bool((kept | ~ref_kept).all()),
            **{f"w{w}_ms": ms(lambda: pooled_select_bits_triton(logits, valid, dis, 0.9, steps, num_warps=w))
               for w in (8, 16, 32)},
        }
        print(f"select steps {steps}: {sel[f'steps{steps}']}", flush=True)
    print(f"pooled_bits {out['pooled_bits_ms']:.3f} ms, parts {out['parts_ms']:.3f}, pool {out['pool_ms']}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--parts", default="kernel,pooled", help="of kernel, layout, pooled")
    args = ap.parse_args()
    import triton

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shape": f"B={B}, H={H}, S={S}, D={D}, bf16, block_m={BM}, block_n=1"}
    parts = args.parts.split(",")
    if "kernel" in parts:
        kernel_part(res)
    if "layout" in parts:
        layout_part(res)
    if "pooled" in parts:
        pooled_part(res)
    print("wrote", write_result(res, "variant_probe", args.out))


if __name__ == "__main__":
    main()
