"""Attention error of each predictor along a real sampling trajectory of the trained toy DiT.

Samples one video with dense attention (eager) and, at chosen steps and layers, applies each
predictor to that call's q and k: the kept density and the relative error of the sparse output
against the dense one, per batch element (CFG: conditional, unconditional). Shows *where* a
predictor fails, which PSNR over a whole video cannot (benchmarks/quality_video.py).

    python benchmarks/predictor_trajectory.py                 # CPU, ~6 min: seed 1, steps 0, 6, 12
    python benchmarks/predictor_trajectory.py --device cuda

Writes benchmarks/results/predictor_trajectory_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fgcompile import predictors as P  # noqa: E402
from fgcompile.testing.metrics import rel_err  # noqa: E402
from fgcompile.kernels.reference import sparse_attention_reference  # noqa: E402
from fgcompile.testing.pretrained import load_toy_video_dit  # noqa: E402
from fgcompile.testing.sampler import euler_sample, null_labels, seeded_noise  # noqa: E402
from fgcompile.testing.shapes_data import NUM_LABELS, label_name  # noqa: E402


def trajectory_attention(on_call, *, seed: int = 1, label: int = 5, sample_steps: int = 25, at_steps=(0, 6, 12),
                         layers=(0, 1, 3, 5), device="cpu", dtype=torch.float32) -> None:
    """Sample one video (classifier-free guidance: batch [conditional, unconditional]) from the
    shipped toy DiT with dense attention, eager, and call ``on_call(step, layer, q, k, v, out)`` for
    each self-attention call at ``at_steps`` x ``layers``: q, k, v (2, heads, 4096, 64) and the dense
    output of that call. Sampling stops after the last measured step."""
    model = load_toy_video_dit(device=device, dtype=dtype)
    shape = tuple(model.meta.get("sample_shape", (3, 16, 64, 64)))
    orig = F.scaled_dot_product_attention
    state = {"step": 0, "layer": 0}

    def hook(q, k, v, *a, **kw):
        ref = orig(q, k, v, *a, **kw)
        layer = state["layer"]
        state["layer"] += 1
        if state["step"] in at_steps and layer in layers and not a and not kw:
            on_call(state["step"], layer, q, k, v, ref)
        return ref

    class Done(Exception):
        pass

    def callback(i, x):
        if i + 1 > max(at_steps):
            raise Done  # the rest of the trajectory is not measured
        state["step"], state["layer"] = i + 1, 0

    noise = seeded_noise(shape, [seed], device=device)
    labels = torch.tensor([label], device=device)
    F.scaled_dot_product_attention = hook
    try:
        with torch.no_grad():
            euler_sample(model, noise, labels, null_labels(labels, NUM_LABELS), sample_steps,
                         model.meta.get("sampler", {}).get("guidance", 4.0), cond_key="labels", callback=callback)
    except Done:
        pass
    finally:
        F.scaled_dot_product_attention = orig


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--label", type=int, default=5)
    p.add_argument("--sample-steps", type=int, default=25, help="the sampler's steps (the trajectory)")
    p.add_argument("--at-steps", type=int, nargs="+", default=[0, 6, 12], help="steps whose calls are measured")
    p.add_argument("--layers", type=int, nargs="+", default=[0, 1, 3, 5])
    p.add_argument("--alphas", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--taus", type=float, nargs="+", default=[0.9, 0.98])
    p.add_argument("--block-m", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    rows = []

    def err(q, k, v, ref, keep):
        o = sparse_attention_reference(q, k, v, keep, args.block_m, 1, q.shape[-1] ** -0.5)
        return [rel_err(o[b], ref[b]) for b in range(q.shape[0])]

    def density(keep):
        return [keep[b].float().mean().item() for b in range(keep.shape[0])]

    def on_call(step, layer, q, k, v, ref):
        for alpha in args.alphas:
            keep = P.profile_slices(q, k, alpha=alpha, block_m=args.block_m)
            rows.append(dict(step=step, layer=layer, predictor="profile", alpha=alpha,
                             density=density(keep), rel_err=err(q, k, v, ref, keep)))
        for tau in args.taus:
            keep = P.pooled_slices(q, k, tau=tau, block_m=args.block_m)
            rows.append(dict(step=step, layer=layer, predictor="pooled", tau=tau,
                             density=density(keep), rel_err=err(q, k, v, ref, keep)))

    trajectory_attention(on_call, seed=args.seed, label=args.label, sample_steps=args.sample_steps,
                         at_steps=args.at_steps, layers=args.layers, device=dev)
    res = {"device": args.device, "torch": torch.__version__, "seed": args.seed, "label": label_name(args.label),
           "sample_steps": args.sample_steps, "block_m": args.block_m, "batch": "CFG: [conditional, unconditional]",
           "rows": rows}
    out = Path(args.out or REPO / "benchmarks" / "results" / f"predictor_trajectory_{dev.type}.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{'step':>4} {'layer':>5} {'predictor':<16} {'density (cond, uncond)':<24} rel err (cond, uncond)")
    for r in rows:
        name = f"{r['predictor']} " + (f"a={r['alpha']:g}" if "alpha" in r else f"tau={r['tau']:g}")
        print(f"{r['step']:>4} {r['layer']:>5} {name:<16} {', '.join(f'{d:.3f}' for d in r['density']):<24} "
              f"{', '.join(f'{e:.4f}' for e in r['rel_err'])}")
    print("wrote", out)
    return res


if __name__ == "__main__":
    main()
