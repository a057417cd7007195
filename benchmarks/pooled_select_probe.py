"""Where the pooled predictor's selection kernel spends its time, and variants of it (GPU probe).

At Wan 480p (B=1, H=12, 32,760 tokens, block_m=128: 3,072 rows of 32,760 bf16 pooled logits) the
selection (``kernels.triton_pooled._pooled_select``, one program of 16 warps per row, the row in
registers) takes ~0.38 ms of the predictor's ~0.57 ms on an H100, of which 8 bisection passes
~0.15 ms (benchmarks/NOTES.md). One program fills an SM (its registers), so the row's load is not
overlapped with another row's compute. Variants, each checked bit for bit against the shipped
kernel on the same logits:

- ``shipped``: the product's kernel (``pooled_select_bits_triton``); ``warps8`` / ``warps32``;
  ``steps0``: no search passes (the rest of the kernel's cost);
- ``2d``: the row as a (TILE // 32, 32) tile from the load on: the bit packing sums each row of
  32 keep flags without reshaping a 1-D tensor;
- ``persist`` / ``2d_persist``: one program per SM (times ``--per-sm``) walking rows with
  ``tl.range(..., num_stages=2)``, so the next row's logits can load while this one is searched.

Prints a table and writes JSON (device, versions, times, the predictor's total with each variant
against cuDNN in the same run).

    python benchmarks/pooled_select_probe.py [--out OUT.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fgcompile.kernels.triton_pooled import _search_start  # noqa: E402


@triton.jit
def _row_body(L, DIS, BITS, r, tau, one_minus_tau, NKB, NW, STEPS: tl.constexpr, TILE: tl.constexpr,
              TWO_D: tl.constexpr):
    l_base = L + r * NKB
    w_base = BITS + r * NW
    search = tl.load(DIS + r) == 0
    if TWO_D:
        offs = tl.arange(0, TILE // 32)[:, None] * 32 + tl.arange(0, 32)[None, :]
    else:
        offs = tl.arange(0, TILE)
    ok = offs < NKB
    lg = tl.load(l_base + offs, mask=ok, other=float("-inf")).to(tl.float32)
    if TWO_D:
        m = tl.max(tl.max(lg, 1), 0)
    else:
        m = tl.max(lg, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(lg - m)
    if TWO_D:
        z = tl.sum(tl.sum(e, 1), 0)
    else:
        z = tl.sum(e, 0)
    n = tl.maximum(NKB, 1).to(tl.float32)
    lo, hi, target = _search_start(z, n, tau, one_minus_tau)
    if search:
        for _ in range(STEPS):
            mid = 0.5 * (lo + hi)
            sel = tl.where(e >= tl.exp(mid), e, 0.0)
            if TWO_D:
                mass = tl.sum(tl.sum(sel, 1), 0)
            else:
                mass = tl.sum(sel, 0)
            good = mass >= target
            lo, hi = tl.where(good, mid, lo), tl.where(good, hi, mid)
    keep = tl.where(search, (e >= tl.exp(lo)) & (e > 0.0), ok)
    shifts = tl.arange(0, 32)
    if TWO_D:
        words = tl.sum(keep.to(tl.int32) << shifts[None, :], axis=1)
    else:
        words = tl.sum(tl.reshape(keep.to(tl.int32), [TILE // 32, 32]) << shifts[None, :], axis=1)
    widx = tl.arange(0, TILE // 32)
    tl.store(w_base + widx, words, mask=widx < NW)


@triton.jit
def _select_variant(L, DIS, BITS, tau, one_minus_tau, R, NKB, NW, STEPS: tl.constexpr, TILE: tl.constexpr,
                    TWO_D: tl.constexpr, PERSIST: tl.constexpr, STAGES: tl.constexpr):
    if PERSIST:
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        for r in tl.range(pid, R, nprog, num_stages=STAGES):
            _row_body(L, DIS, BITS, r + tl.zeros([], tl.int64), tau, one_minus_tau, NKB, NW, STEPS, TILE, TWO_D)
    else:
        _row_body(L, DIS, BITS, tl.program_id(0).to(tl.int64), tau, one_minus_tau, NKB, NW, STEPS, TILE, TWO_D)


def main(argv=None) -> None:
    from results_io import write_result

    from fgcompile import predictors
    from fgcompile.kernels.triton_common import pow2_at_least
    from fgcompile.kernels.triton_pooled import pooled_select_bits_triton

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=32760)
    p.add_argument("--per-sm", type=int, default=1, help="programs per SM of the persistent variants")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev, dt = torch.device("cuda"), torch.bfloat16
    B, H, S, D, bm, tau, gamma = 1, 12, args.seq, 128, 128, 0.9, 0.5
    g = torch.Generator(device=dev).manual_seed(0)
    # self-similar query blocks (as overhead_bench.py): the top-CDF search runs, not the fallback
    q = torch.randn(B, H, S, D, device=dev, dtype=dt, generator=g)
    q = q + 2.0 * torch.randn(B, H, 1, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(B, H, S, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(B, H, S, D, device=dev, dtype=dt, generator=g)
    scale = D**-0.5
    logits, dissimilar, valid = predictors._pooled_parts(q, k, gamma=gamma, block_m=bm, block_n=1, scale=scale,
                                                        key_padding=None, keep_lowp=True, pool_kernel=True)
    assert valid is None
    logits = logits.contiguous()
    steps = predictors.CDF_STEPS
    Bq, Hq, nqb, nkb = logits.shape
    R, nw = Bq * Hq * nqb, -(-nkb // 32)
    tile = max(32, pow2_at_least(nkb))
    dis = dissimilar.to(torch.bool).contiguous().view(torch.uint8)
    ref = pooled_select_bits_triton(logits, None, dissimilar, tau, steps)
    n_sm = torch.cuda.get_device_properties(dev).multi_processor_count

    def variant(two_d: bool, persist: bool, warps: int = 16, stages: int = 2, steps_: int = steps):
        out = torch.empty_like(ref)
        grid = (min(R, n_sm * args.per_sm),) if persist else (R,)

        def run():
            _select_variant[grid](logits, dis, out, float(tau), float(1 - tau), R, nkb, nw, STEPS=steps_, TILE=tile,
                                  TWO_D=two_d, PERSIST=persist, STAGES=stages, num_warps=warps)
            return out
        return run

    cases = {
        "shipped": lambda: pooled_select_bits_triton(logits, None, dissimilar, tau, steps),
        "warps8": lambda: pooled_select_bits_triton(logits, None, dissimilar, tau, steps, num_warps=8),
        "warps32": lambda: pooled_select_bits_triton(logits, None, dissimilar, tau, steps, num_warps=32),
        "steps0": lambda: pooled_select_bits_triton(logits, None, dissimilar, tau, 0),
        "1d_copy": variant(False, False),
        "2d": variant(True, False),
        "2d_warps32": variant(True, False, warps=32),
        "persist": variant(False, True),
        "2d_persist": variant(True, True),
        "2d_persist_s3": variant(True, True, stages=3),
    }
    rows = {}
    for name, fn in cases.items():
        try:
            got = fn()
            torch.cuda.synchronize()
            equal = None if name == "steps0" else bool(torch.equal(got, ref))
            ms = triton.testing.do_bench(fn, warmup=25, rep=200)
            rows[name] = dict(ms=ms, bits_equal=equal)
        except Exception as e:  # a variant that does not compile or run: reported, the others go on
            rows[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    parts_ms = triton.testing.do_bench(
        lambda: predictors._pooled_parts(q, k, gamma=gamma, block_m=bm, block_n=1, scale=scale, key_padding=None,
                                         keep_lowp=True, pool_kernel=True), warmup=25, rep=200)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn_ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                                           warmup=10, rep=100)
    for r in rows.values():
        if "ms" in r:
            r["predictor_ms"] = parts_ms + r["ms"]
            r["predictor_over_cudnn"] = r["predictor_ms"] / cudnn_ms
    searched = float((dissimilar == 0).float().mean())
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               rows_searched=searched,
               shape=f"B={B}, H={H}, S={S}, D={D}, bf16, block_m={bm}, tau={tau}, steps={steps}",
               rows_logits=R, parts_ms=parts_ms, cudnn_ms=cudnn_ms, variants=rows)
    write_result(out, "pooled_select_probe", args.out)
    print(f"parts {parts_ms:.4f} ms, cuDNN {cudnn_ms:.3f} ms, rows searched {searched:.3f}")
    print(f"{'variant':<16} {'select ms':>9} {'equal':>6} {'predictor/cuDNN':>15}")
    for name, r in rows.items():
        if "ms" in r:
            print(f"{name:<16} {r['ms']:>9.4f} {str(r['bits_equal']):>6} {r['predictor_over_cudnn']:>15.4f}")
        else:
            print(f"{name:<16} {r['error']}")


if __name__ == "__main__":
    main()
