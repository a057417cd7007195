"""The cost of ``fgcompile.query_order`` (``FGAttnConfig(query_order="pca")`` computes it once per
profiled call) at video-DiT sizes, against dense cuDNN attention in the same run, on a GPU.

Per case (B, H, S, D; bf16 queries of the synthetic suite's Wan grid where the size is Wan's, else
random), in one run:

- ``order_ms``: ``query_order(q, 128)`` (do_bench median, warm; the bisection on q's
  ``reorder.RANK`` leading principal directions), and ``order_over_cudnn``;
  ``order_ms_by_steps``: the same with ``reorder.POWER_STEPS`` set to each of ``--steps`` (the
  default's entry is ``order_ms``);
- ``full_ms``: ``query_order(q, 128, rank=D)`` (the bisection on q itself);
- ``einsum_ms``: the session-25 form of the full-dim bisection (six power steps as einsums over
  the rows of every group, ``einsum_order`` below), kept here as the baseline of the ratio
  ``einsum_over_order``; ``same_order``: the fraction of positions where it and ``rank=D`` agree
  (the same arithmetic in another order: near-ties can swap);
- ``peak_mib``: the order's transient GPU memory (peak allocated above what was allocated before);
- ``cudnn_ms`` / ``flash_ms``: SDPA with the cuDNN / flash backend on q, k = q, v = q
  (``variant_probe.dense_baselines``, the dense baselines of every benchmark run).

    python benchmarks/query_order_bench.py   # writes benchmarks/results/query_order_<device>.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fgcompile import reorder  # noqa: E402
from fgcompile.reorder import POWER_STEPS, query_order  # noqa: E402
from results_io import write_result  # noqa: E402

# name: (B, H, S, D)
CASES = {
    "wan_480p": (1, 12, 32760, 128),
    "hunyuan_480p": (1, 24, 25696, 128),
    "hunyuan_480p_b2": (2, 24, 25696, 128),
    "cogvideox_5b": (1, 48, 17776, 64),
}
BLOCK_M = 128


def _einsum_direction(xs: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """The session-25 power steps: two einsum passes over the group's rows per step."""
    v = start.expand(*xs.shape[:3], -1)
    for _ in range(reorder.POWER_STEPS):
        v = torch.einsum("bhgnd,bhgn->bhgd", xs, torch.einsum("bhgnd,bhgd->bhgn", xs, v))
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return v


def einsum_order(q: torch.Tensor, block_m: int) -> torch.Tensor:
    """The session-25 form of ``query_order``: the same groups, start vector and steps, the power
    iteration as einsums over each group's centred rows."""
    return reorder._bisect(q, block_m, _einsum_direction)


def main(argv=None) -> dict:
    from triton.testing import do_bench
    from variant_probe import dense_baselines

    from fgcompile.testing.synthetic import make_attention_inputs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    p.add_argument("--steps", default="6,16", help="power steps to time the order with (reorder.POWER_STEPS)")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler's table of one warm query_order call per case (CUDA time by op)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs CUDA")
    import triton

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "block_m": BLOCK_M, "power_steps": POWER_STEPS, "timing": "triton.testing.do_bench median, warm",
              "cases": {}}
    for name in args.cases.split(","):
        B, H, S, D = CASES[name]
        if S == 21 * 30 * 52 and B == 1:
            q = make_attention_inputs(21, 30, 52, heads=H, head_dim=D, dtype=torch.bfloat16, device="cuda")[0]
            source = "synthetic suite, 21 x 30 x 52"
        else:
            q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(0))
            source = "random"
        cudnn, flash = dense_baselines(q, q, q)
        order = query_order(q, BLOCK_M)  # the plan, then a clean peak
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        order = query_order(q, BLOCK_M)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ok = bool((order.sort(-1).values == torch.arange(S, device="cuda")).all())
        order_ms = float(do_bench(lambda: query_order(q, BLOCK_M), warmup=10, rep=100, return_mode="median"))
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                query_order(q, BLOCK_M)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18), flush=True)
        by_steps = {}
        for steps in (int(x) for x in args.steps.split(",")):
            if steps == POWER_STEPS:  # the default: order_ms above
                by_steps[steps] = order_ms
                continue
            reorder.POWER_STEPS = steps
            by_steps[steps] = float(do_bench(lambda: query_order(q, BLOCK_M), warmup=10, rep=100, return_mode="median"))
        reorder.POWER_STEPS = POWER_STEPS
        full = query_order(q, BLOCK_M, rank=D)
        full_ms = float(do_bench(lambda: query_order(q, BLOCK_M, rank=D), warmup=5, rep=50, return_mode="median"))
        old = einsum_order(q, BLOCK_M)
        einsum_ms = float(do_bench(lambda: einsum_order(q, BLOCK_M), warmup=5, rep=50, return_mode="median"))
        row = {"B": B, "H": H, "S": S, "D": D, "q": source, "cudnn_ms": cudnn, "flash_ms": flash, "order_ms": order_ms,
               "order_over_cudnn": order_ms / cudnn, "order_ms_by_steps": by_steps, "full_ms": full_ms, "einsum_ms": einsum_ms, "einsum_over_order": einsum_ms / order_ms,
               "same_order": float((old == full).float().mean()), "is_permutation": ok, "peak_mib": peak}
        result["cases"][name] = row
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        del q, order, old, full
        torch.cuda.empty_cache()
    write_result(result, "query_order", args.out)
    print(f"\n{'case':18s} {'cuDNN ms':>9s} {'order ms':>9s} {'/cuDNN':>7s} {'full ms':>8s} {'einsum ms':>10s} {'speedup':>8s} "
          f"{'same':>6s} {'peak MiB':>9s}")
    for n, r in result["cases"].items():
        print(f"{n:18s} {r['cudnn_ms']:9.3f} {r['order_ms']:9.3f} {r['order_over_cudnn']:7.3f} {r['full_ms']:8.3f} "
              f"{r['einsum_ms']:10.3f} {r['einsum_over_order']:8.2f} {r['same_order']:6.3f} {r['peak_mib']:9.0f}")
    return result


if __name__ == "__main__":
    main()
