"""Demo: compile a toy video DiT with backend="fgattn" and sample a few denoising steps.

Prints the attention sites fgcompile found (and what it decided for each), the per-layer kept
density, the error of the sampled latents against the same model with dense attention, and the
wall time of both.

    python examples/toy_video_dit.py                      # CPU-sized: 4 x 16 x 16 = 1,024 tokens
    python examples/toy_video_dit.py --device cuda --frames 8 --height 64 --width 64   # 8,192 tokens
    python examples/toy_video_dit.py --weights examples/weights/toy_video_dit.safetensors --png strip.png

Everything is random (seeded) unless ``--weights`` names a trained toy video DiT (written by
examples/train_toy_video_dit.py): then it generates label-conditioned videos and, with ``--png``,
saves a strip of frames, dense attention above fgattn. No download; runs offline.
"""

from __future__ import annotations

import argparse
import time

import torch

import fgcompile
from fgcompile.testing.metrics import rel_err
from fgcompile.testing.sampler import euler_sample, null_labels, video_strip, write_png
from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--height", type=int, default=32, help="latent height (patch 2: tokens = frames * h/2 * w/2)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--predictor", default="profile", choices=["profile", "pooled", "dense"])
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--profile-every", type=int, default=5)
    p.add_argument("--block-m", type=int, default=None, help="default: 128 on CUDA, 64 on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="a trained toy video DiT (safetensors): label-conditioned generation")
    p.add_argument("--label", type=int, default=0, help="with --weights: the class label to generate")
    p.add_argument("--png", default=None, help="with --weights: save the frames, dense above fgattn, to this PNG")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    block_m = args.block_m or (128 if device.type == "cuda" else 64)
    if args.weights:
        from fgcompile.testing.pretrained import load_toy_video_dit

        model = load_toy_video_dit(args.weights, device=device, dtype=dtype)
        cfg = model.cfg
        c, frames, height, width = model.meta["sample_shape"]
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        noise = torch.randn(1, c, frames, height, width, generator=gen).to(device, dtype)
        if not 0 <= args.label < cfg.num_labels:
            raise ValueError(f"--label: expected 0 .. {cfg.num_labels - 1}, got {args.label}")
        cond = torch.tensor([args.label], device=device)
        null = null_labels(cond, cfg.num_labels)
        cond_key, what = "labels", f"label {args.label}"
    else:
        cfg = ToyDiTConfig(depth=args.depth)
        model = ToyVideoDiT(cfg, seed=args.seed).to(device=device, dtype=dtype).eval()
        frames, height, width = args.frames, args.height, args.width
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        noise = torch.randn(1, cfg.in_channels, frames, height, width, generator=gen).to(device, dtype)
        cond = torch.randn(1, cfg.text_tokens, cfg.text_dim, generator=gen).to(device, dtype)
        null = torch.zeros_like(cond)
        cond_key, what = None, f"{cfg.text_tokens} text tokens"
    grid = (frames // cfg.patch[0], height // cfg.patch[1], width // cfg.patch[2])
    tokens = grid[0] * grid[1] * grid[2]

    fg_config = fgcompile.FGAttnConfig(
        predictor=args.predictor,
        alpha=args.alpha,
        tau=args.tau,
        profile_every=args.profile_every,
        block_m=block_m,
        min_seq_len=min(4096, tokens),  # the toy's self-attention counts as long
    )

    print(f"toy video DiT{' (trained)' if args.weights else ''}: {cfg.depth} blocks, {cfg.heads} heads of {cfg.head_dim}, "
          f"{tokens} video tokens ({grid[0]}x{grid[1]}x{grid[2]}), {what}, "
          f"{device.type} {str(dtype).replace('torch.', '')}, {args.steps} steps, CFG batch 2")

    def sample(compiled, steps):
        return euler_sample(compiled, noise, cond, null, steps, args.guidance, cond_key=cond_key)

    with torch.no_grad():
        both = torch.cat([cond, null])
        cond_kwargs = {cond_key: both} if cond_key else {}
        report = fgcompile.explain(model, torch.cat([noise, noise]), torch.zeros(2, device=device),
                                   *([] if cond_key else [both]), config=fg_config, **cond_kwargs)
        print("\n== attention sites ==")
        print(report.table())

        def run(compiled, label):
            sample(compiled, 1)  # compile + warm up
            if isinstance(compiled, torch.nn.Module) and hasattr(compiled, "_orig_mod") and label == "fgattn":
                fgcompile.reset(compiled)  # the warm-up call must not count as the first step
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = sample(compiled, args.steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out, time.perf_counter() - t0

        dense_model = torch.compile(model, backend="inductor")
        ref, t_dense = run(dense_model, "dense")
        fg_model = torch.compile(model, backend=fgcompile.backend(fg_config))
        out, t_fg = run(fg_model, "fgattn")

        print("\n== per-layer kept density (fraction of M x 1 slices computed; mean over calls and heads) ==")
        for name, s in fgcompile.stats(fg_model).items():
            heads = " ".join(f"{d:.2f}" for d in (s.density_mean or []))
            print(f"{name:<24} calls={s.calls:<3} dense={s.dense_calls:<2} profiled={s.profiled_calls:<2} "
                  f"sparse={s.sparse_calls:<3} density={s.mean_density if s.mean_density is not None else float('nan'):.3f}  per head: {heads}"
                  + (f"  (fell back to dense: {s.fallback})" if s.fallback else ""))

        err = rel_err(out, ref)
        print("\n== result ==")
        print(f"relative error of the sampled latents vs dense attention: {err:.4f}")
        print(f"wall time, {args.steps} steps: dense (inductor) {t_dense:.2f} s, fgattn {t_fg:.2f} s")
        if args.png:
            if not args.weights:
                print("--png needs --weights (random weights make noise, not videos); not written")
            else:
                write_png(args.png, video_strip([ref.float(), out.float()]))
                print(f"frames, dense (top) and fgattn (bottom): {args.png}")


if __name__ == "__main__":
    main()
