"""Dense attention with a key-padding mask: SDPA's backends against fgcompile's sparse kernels
keeping every real key, on an H100-class GPU.

A site with a key-padding mask (HunyuanVideo's padded prompt, batches of prompts of different
lengths) that runs dense (a site denser than ``max_density``, warm-up calls, ``dense_sites``)
calls SDPA with a bool mask (B, 1, 1, S_kv). This probe times, per shape, in one run:

- ``sdpa_masked``: SDPA with the mask, the backend PyTorch picks (what ``runtime.dense_attention``
  and the default compile run), and per backend (cuDNN, efficient; flash takes no mask);
- ``sdpa_unmasked_cudnn``: cuDNN SDPA without a mask over every key (padded ones too): the speed a
  mask costs;
- ``gluon`` / ``triton``: the sparse kernels on the lists of every real key (the bitmap of the
  key-padding mask for every head and query block, packed as a site packs it); ``pack_ms``: that
  packing.

Correctness: each output against SDPA's masked output, and every output's first 256 query rows
against a float64 reference (fresh random inputs; outputs poisoned with NaN before each launch).

    python benchmarks/masked_dense_probe.py   # writes benchmarks/results/masked_dense_<device>.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_result  # noqa: E402

# name: (B, H, S_kv (= S_q), D, padded keys per batch item)
CASES = {
    "hunyuan_480p_b1": (1, 24, 25696, 128, (160,)),
    "hunyuan_480p_b2": (2, 24, 25696, 128, (160, 40)),
    "cogvideox_like_d64": (1, 48, 17776, 64, (100,)),
    "wan_like_d128": (1, 12, 32760, 128, (300,)),
}
BLOCK_M = 128


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def reference_rows(q, k, v, key_padding, scale, rows=256):
    """Float64 attention of the first ``rows`` queries over the real keys: (B, H, rows, D)."""
    s = (q[:, :, :rows].double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~key_padding[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1) @ v.double()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import triton

    from fgcompile.kernels import packing
    from fgcompile.kernels.gluon_sparse_sm90 import launch_sparse_kernel_sm90, sm90_supported
    from fgcompile.kernels.triton_sparse import sparse_attention_triton
    from fgcompile.testing.metrics import rel_err

    dev = torch.device("cuda")
    rows = []
    for name in [c for c in args.cases.split(",") if c]:
        B, H, S, D, pads = CASES[name]
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        key_padding = torch.ones(B, S, dtype=torch.bool, device=dev)
        for b, n in enumerate(pads):
            key_padding[b, S - n:] = False
        mask = key_padding[:, None, None, :]
        scale = D ** -0.5
        ref = reference_rows(q, k, v, key_padding, scale)
        row = {"case": name, "B": B, "H": H, "S": S, "D": D, "padded": list(pads)}

        def check(key, out):
            row[f"{key}_rel_err_f64"] = rel_err(out[:, :, :ref.shape[2]], ref)

        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        check("sdpa_masked", masked)
        row["sdpa_masked_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale))
        for backend, label in ((SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.EFFICIENT_ATTENTION, "efficient")):
            try:
                with sdpa_kernel(backend):
                    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
                    check(f"sdpa_masked_{label}", o)
                    row[f"sdpa_masked_{label}_ms"] = bench_ms(
                        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale))
            except RuntimeError as e:
                row[f"sdpa_masked_{label}_ms"] = None
                row[f"sdpa_masked_{label}_error"] = str(e)[:200]
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            row["sdpa_unmasked_cudnn_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))

        # every real key of every head and query block, as a site packs a key-padded call's bitmap
        nqb = -(-S // BLOCK_M)
        bits = packing.pack_bits(key_padding)[:, None, None, :].expand(B, H, nqb, -1)

        def pack():
            return packing.packed_from_bits(bits, S, BLOCK_M, 1, S, 0, cap=S)

        packed = pack()
        row["pack_ms"] = bench_ms(pack)
        row["kept_density"] = float(key_padding.float().mean())
        out = torch.full_like(q, float("nan"))
        sparse_attention_triton(q, k, v, packed, scale, out=out)
        check("triton", out)
        row["triton_vs_sdpa_masked"] = rel_err(out, masked)
        row["triton_ms"] = bench_ms(lambda: sparse_attention_triton(q, k, v, packed, scale, out=out))
        out = torch.full_like(q, float("nan"))
        if sm90_supported(q, k, v, out, BLOCK_M, 1, 0):
            launch_sparse_kernel_sm90(q, k, v, out, packed.counts, packed.indices, scale)
            check("gluon", out)
            row["gluon_vs_sdpa_masked"] = rel_err(out, masked)
            row["gluon_ms"] = bench_ms(lambda: launch_sparse_kernel_sm90(q, k, v, out, packed.counts, packed.indices, scale))
        else:
            row["gluon_ms"] = None
        for key in ("gluon_ms", "triton_ms", "sdpa_unmasked_cudnn_ms"):
            if row.get(key):
                row[f"sdpa_masked_over_{key[:-3]}"] = row["sdpa_masked_ms"] / row[key]
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del q, k, v, packed, bits, out, masked, ref
        torch.cuda.empty_cache()

    result = {
        "what": "dense attention with a key-padding mask: SDPA backends vs the sparse kernels keeping every real key",
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "dtype": "bfloat16", "block_m": BLOCK_M, "rows": rows,
        "command": "python benchmarks/masked_dense_probe.py",
    }
    write_result(result, "masked_dense", args.out)
    print(f"{'case':20} {'masked':>8} {'cudnn-m':>8} {'eff-m':>8} {'unmasked':>8} {'gluon':>8} {'triton':>8} {'pack':>6}")
    for r in rows:
        f = lambda x: f"{x:8.2f}" if isinstance(x, float) else f"{'-':>8}"  # noqa: E731
        print(f"{r['case']:20} {f(r['sdpa_masked_ms'])} {f(r.get('sdpa_masked_cudnn_ms'))} {f(r.get('sdpa_masked_efficient_ms'))} "
              f"{f(r['sdpa_unmasked_cudnn_ms'])} {f(r.get('gluon_ms'))} {f(r.get('triton_ms'))} {r['pack_ms']:6.3f}")


if __name__ == "__main__":
    main()
