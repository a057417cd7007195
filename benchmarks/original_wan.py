"""The original Wan2.1 repository's transformer code on its SDPA path (fgcompile.testing.original_wan:
its ``rope_apply`` and ``attention()`` break the graph, so every layer's attention runs in one graph
segment without parameters) at Wan2.1-1.3B's block sizes, whole-model ``torch.compile``:
default (backend="inductor") against backend="fgattn". (On CUDA the repository's blocks call
flash-attn's varlen kernel, which fgcompile rewrites into SDPA (not measured here: no flash-attn
on the GPU machine); this is the path of its ``attention()`` fallback and of the forks that route
to SDPA.)

The model runs as the repository's pipeline runs it: float32 weights under
``torch.autocast(dtype=torch.bfloat16)``, ``attention()`` casting q/k/v to bfloat16; tokens of a
480p, 81-frame latent, grid (21, 30, 52) = 32,760 tokens, 512 text tokens; random weights.

Rows (the fgattn side compiled afresh for each, as its index buffers are sized by the budget):
``d0.6`` / ``d0.3``: the density budget over a near-zero alpha (each query block keeps its strongest
60% / 30% of keys: speed at a known density). Reported per row: the first call's wall time
(compile + the profiled call), the median forward time (CUDA events, after the profiled call),
the speedup over the default compile, the error of the profiled call against the default output
(exact attention: float noise only), the sparse calls' error (random weights: not a quality
figure), and the per-layer sites fgcompile ran sparse (``fgcompile.stats`` names).

    python benchmarks/original_wan.py                       # H100: benchmarks/results/original_wan_<device>.json
    python benchmarks/original_wan.py --tiny --device cpu   # a smoke run on a tiny config
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

import fgcompile
from fgcompile.testing.metrics import rel_err
from fgcompile.testing.original_wan import WAN_13B, WanModel, inputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_wan import first_call, kernel_breakdown, timed  # noqa: E402
from results_io import device_tag, write_result  # noqa: E402

TINY = dict(dim=128, num_heads=2, ffn_dim=256, depth=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny config and grid (a smoke run)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--settings", default="d0.3,d0.6", help="rows, of d0.3 and d0.6")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Padding mask is disabled")
    device = torch.device(args.device)
    cfg = TINY if args.tiny else WAN_13B
    grid, text = ((2, 8, 8), 16) if args.tiny else ((21, 30, 52), 512)
    tokens = grid[0] * grid[1] * grid[2]
    torch.manual_seed(0)
    model = WanModel(**cfg, cast=True).to(device).eval()
    x = inputs(grid, text, cfg["dim"], device=device)
    block_m = 128 if device.type == "cuda" else 64
    min_seq = 64 if args.tiny else 4096
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    rows = []
    with torch.no_grad(), autocast:
        torch._dynamo.reset()
        default = torch.compile(model)
        ref, default_first_s = first_call(lambda: default(*x), device)
        default_ms = timed(lambda: default(*x), args.reps, device)
        _, _, default_attn_ms, _ = kernel_breakdown(lambda: default(*x), device)
        print(f"default: first call {default_first_s:.1f} s, forward {default_ms:.1f} ms", flush=True)
        for setting in [s for s in args.settings.split(",") if s]:
            density = {"d0.3": 0.3, "d0.6": 0.6}[setting]
            torch._dynamo.reset()
            fg = torch.compile(model, backend=fgcompile.backend(
                alpha=1e-6, density=density, profile_every=10 ** 6, dense_calls=0, block_m=block_m,
                min_seq_len=min_seq, max_density=1.0))
            out, fg_first_s = first_call(lambda: fg(*x), device)  # the profiled call: dense attention
            profiled_err = rel_err(out.float(), ref.float())
            sparse_err = rel_err(fg(*x).float(), ref.float())
            fg_ms = timed(lambda: fg(*x), args.reps, device)
            attn_ms, other_ms, dense_attn_ms, top = kernel_breakdown(lambda: fg(*x), device)
            st = fgcompile.stats(fg)
            sparse_sites = sorted(n for n, s in st.items() if s.sparse_calls > 0)
            row = {
                "setting": setting, "density": density, "first_call_s": round(fg_first_s, 2),
                "fgattn_ms": round(fg_ms, 2), "default_ms": round(default_ms, 2),
                "speedup": round(default_ms / fg_ms, 3), "profiled_call_rel_err": profiled_err,
                "sparse_call_rel_err": sparse_err, "sites": len(st), "sparse_sites": len(sparse_sites),
                "sparse_site_names": sparse_sites[:4] + (["..."] if len(sparse_sites) > 4 else []),
                "mean_density": round(sum(st[n].mean_density for n in sparse_sites) / max(len(sparse_sites), 1), 4),
                "attention_ms": attn_ms, "other_ms": other_ms, "dense_attention_ms": dense_attn_ms,
                "default_attention_ms": default_attn_ms, "top_kernels": top,
            }
            rows.append(row)
            print(f"{setting}: first call {fg_first_s:.1f} s, forward {fg_ms:.1f} ms, speedup {row['speedup']:.2f}, "
                  f"{len(sparse_sites)}/{len(st)} sites sparse, profiled err {profiled_err:.2e}", flush=True)
    import triton

    result = {
        "what": "the original Wan2.1 transformer code (graph breaks in rope_apply and attention()), whole-model "
                "torch.compile, default vs fgattn, bf16 autocast",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton.__version__,
        "config": cfg, "grid": list(grid), "tokens": tokens, "text_tokens": text, "batch": 1, "reps": args.reps,
        "default_first_call_s": round(default_first_s, 2), "default_ms": round(default_ms, 2), "rows": rows,
        "command": "python benchmarks/original_wan.py" + (" --tiny --device cpu" if args.tiny else ""),
    }
    out = args.out or (None if not args.tiny else os.path.join("/tmp", f"original_wan_tiny_{device_tag()}.json"))
    write_result(result, "original_wan", out)
    print(f"{'row':6} {'default ms':>11} {'fgattn ms':>10} {'speedup':>8} {'sparse sites':>13}")
    for r in rows:
        print(f"{r['setting']:6} {r['default_ms']:11.1f} {r['fgattn_ms']:10.1f} {r['speedup']:8.2f} "
              f"{r['sparse_sites']:>6}/{r['sites']}")


if __name__ == "__main__":
    main()
