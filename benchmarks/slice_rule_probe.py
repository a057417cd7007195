"""Does the profiled rule itself hold M x 1 slices back? The FG-Attn rule against a mass rule.

    python3 benchmarks/slice_rule_probe.py                    # default 8 x 16 x 16 grid, 5 heads, D 64 (CPU, ~2 min)
    python3 benchmarks/slice_rule_probe.py --grid 4 30 52     # Wan's frame shape (6,240 tokens; CPU, several minutes)

On the synthetic suite (``fgcompile.testing.synthetic``), for 128 x 1 slices and 128 x 128 tiles, a
tile's score is either

- "max": the largest softmax probability of any of its (query, key) pairs (the FG-Attn rule that
  ``fgcompile.profile_slices`` thresholds at alpha / S_kv), or
- "mass": the sum of its softmax probabilities (the attention mass it carries, which bounds the
  output error a dropped tile causes more directly than its largest entry);

and the tiles whose score is above a quantile of all scores (one threshold for every head) are kept.
Sweeping the quantile gives density against output relative error (``sparse_attention_reference``
against ``dense_attention_reference``, float32); the density at 1% error is interpolated as in
``quality.py``. The question: is the saving of slices over tiles at 1% error (the FG-Attn claim: at
least 25%) limited by the rule or by the attention maps?

Writes ``benchmarks/results/slice_rule_<device>[_<name>].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fgcompile.kernels.reference import dense_attention_reference, sparse_attention_reference  # noqa: E402
from fgcompile.testing.metrics import rel_err  # noqa: E402
from fgcompile.testing.synthetic import make_attention_inputs  # noqa: E402
from quality import TARGET, density_at, density_of  # noqa: E402

GRANULARITIES = (("128x1", 128, 1), ("128x128", 128, 128))
RULES = ("max", "mass")
#: kept fraction of tiles swept per granularity (fine slices are sparser at equal error)
KEEP_FRACTIONS = {
    1: (0.04, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.94),
    128: (0.7, 0.75, 0.8, 0.84, 0.87, 0.9, 0.92, 0.94, 0.96, 0.98),
}


def tile_scores(p: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of the probabilities p (B, H, S_q, S_kv): (largest entry, sum), each float32 of
    shape (B, H, ceil(S_q / block_m), ceil(S_kv / block_n)); edge tiles are zero-padded."""
    B, H, S_q, S_kv = p.shape
    nb, nk = -(-S_q // block_m), -(-S_kv // block_n)
    t = torch.nn.functional.pad(p, (0, nk * block_n - S_kv, 0, nb * block_m - S_q))
    t = t.reshape(B, H, nb, block_m, nk, block_n)
    return t.amax(dim=(3, 5)), t.sum(dim=(3, 5))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=int, nargs=3, default=(8, 16, 16), metavar=("F", "H", "W"))
    ap.add_argument("--heads", type=int, default=5)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--pattern", default="mixed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)

    q, k, v = make_attention_inputs(*args.grid, heads=args.heads, head_dim=args.head_dim, pattern=args.pattern,
                                    seed=args.seed)
    _, _, S, D = q.shape
    scale = D**-0.5
    dense = dense_attention_reference(q, k, v, scale)
    p = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, -1)
    rows, summary = [], {}
    for gran, bm, bn in GRANULARITIES:
        by_rule = dict(zip(RULES, tile_scores(p, bm, bn)))
        for rule, score in by_rule.items():
            flat = score.flatten().sort().values
            points = []
            for frac in KEEP_FRACTIONS[bn]:
                thr = flat[min(int((1 - frac) * flat.numel()), flat.numel() - 1)]
                keep = score > thr
                out = sparse_attention_reference(q, k, v, keep, bm, bn, scale)
                row = {"granularity": gran, "rule": rule, "kept_fraction": frac,
                       "density": density_of(keep, bm, bn, S, S), "rel_err": rel_err(out, dense)}
                rows.append(row)
                points.append((row["density"], row["rel_err"]))
            d, exact = density_at(points)
            summary[f"{rule}_{gran}"] = {"density_at_1pct": d, "bracketed": exact}
            print(f"{rule:5s} {gran:8s} density at {TARGET:.0%} error: {d:.3f}" if d else f"{rule} {gran}: not reached",
                  flush=True)
    for rule in RULES:
        a, b = summary[f"{rule}_128x1"]["density_at_1pct"], summary[f"{rule}_128x128"]["density_at_1pct"]
        summary[f"{rule}_saving"] = (1 - a / b) if a and b else None
        print(f"{rule:5s} rule: 128 x 1 needs {summary[f'{rule}_saving']:.1%} less density than 128 x 128"
              if a and b else f"{rule}: no saving (a density was not reached)")
    result = {"device": "cpu", "torch": torch.__version__, "grid": list(args.grid), "heads": args.heads,
              "head_dim": args.head_dim, "pattern": args.pattern, "seed": args.seed, "target_rel_err": TARGET,
              "rows": rows, "summary": summary}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "slice_rule_cpu" + (f"_{args.name}" if args.name else "") + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
