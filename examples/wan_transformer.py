"""fgcompile in a diffusers Wan pipeline.

With a real pipeline (weights from your own disk or the Hub) the whole change is one line:

    import torch, fgcompile
    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16).to("cuda")
    pipe.transformer = torch.compile(pipe.transformer, backend="fgattn")
    # or, compiling the 30 identical blocks once (much faster to compile):
    # pipe.transformer.compile_repeated_blocks(backend="fgattn")
    video = pipe(prompt, height=480, width=832, num_frames=81, num_inference_steps=50).frames[0]
    print(fgcompile.stats(pipe.transformer))          # kept density per layer and head

A density budget trades accuracy for a known speed; with one, keeping the masks' key lists in
pinned host memory skips a packing kernel per layer and call (benchmarks/e2e_wan.py, H100,
session 16: 1.35x over the default compile at density 0.6, 480p, for 7.2 GB of host memory):

    pipe.transformer.compile_repeated_blocks(
        backend=fgcompile.backend(density=0.6, mask_storage="host_lists"))

This script runs offline, on the transformer alone with random weights: a small Wan on the CPU,
the real Wan2.1-1.3B configuration at 480p on CUDA. It runs a few "denoising" calls (the same
latents at decreasing timesteps, as a sampler would), then prints what fgcompile did and the
error against dense attention.

    python examples/wan_transformer.py                # CPU: a 2-layer Wan, 3 x 16 x 16 latents
    python examples/wan_transformer.py --device cuda  # Wan2.1-1.3B, 480p, 81 frames, bf16
    python examples/wan_transformer.py --density 0.5  # at most half of each query block's keys

Random weights have no attention structure: at alpha 0.5 the profiled masks keep nearly every
key, and such sites run dense until the next profiled call (``max_density``); a density budget
makes them sparse at a known density. Each call's line says what its sites did.
"""

from __future__ import annotations

import argparse

import torch

import fgcompile
from fgcompile.testing.metrics import rel_err


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=4, help="transformer calls (sampler steps)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--density", type=float, default=None, help="density budget (FGAttnConfig.density)")
    args = p.parse_args(argv)

    from diffusers import WanTransformer3DModel

    device = torch.device(args.device)
    if device.type == "cuda":  # Wan2.1-1.3B at 480p, 81 frames: 21 x 30 x 52 = 32,760 tokens
        cfg = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096)
        latents_shape, text_shape, dtype, block_m, min_seq = (1, 16, 21, 60, 104), (1, 512, 4096), torch.bfloat16, 128, 4096
    else:  # a small Wan: 3 x 8 x 8 = 192 tokens
        cfg = dict(num_attention_heads=2, attention_head_dim=64, ffn_dim=256, num_layers=2, text_dim=64)
        latents_shape, text_shape, dtype, block_m, min_seq = (1, 16, 3, 16, 16), (1, 16, 64), torch.float32, 64, 128

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**cfg).to(device, dtype).eval()
    latents = torch.randn(latents_shape, device=device, dtype=dtype)
    text = torch.randn(text_shape, device=device, dtype=dtype)

    config = fgcompile.FGAttnConfig(alpha=args.alpha, block_m=block_m, min_seq_len=min_seq, profile_every=10,
                                    density=args.density)
    print(fgcompile.explain(transformer, latents, torch.tensor([999], device=device), text, config=config).table())

    compiled = torch.compile(transformer, backend=fgcompile.backend(config))

    def counts() -> tuple:  # (profiled, sparse, dense) calls over every site so far
        st = fgcompile.stats(compiled).values()
        return tuple(sum(getattr(s, f) for s in st) for f in ("profiled_calls", "sparse_calls", "dense_calls"))

    with torch.no_grad():
        for i, t in enumerate(torch.linspace(999, 0, args.calls).long()):
            timestep = t.reshape(1).to(device)
            before = counts() if i else (0, 0, 0)
            out = compiled(latents, timestep, text, return_dict=False)[0]
            ref = transformer(latents, timestep, text, return_dict=False)[0]
            err = rel_err(out, ref)
            profiled, sparse, dense = (a - b for a, b in zip(counts(), before))
            kind = ", ".join(f"{n} {what}" for n, what in ((profiled, "profiled"), (sparse, "sparse"), (dense, "dense")) if n)
            print(f"call {i}: sites {kind:<24} relative error vs dense attention {err:.4f}")

    print()
    for name, s in fgcompile.stats(compiled).items():
        print(f"{name:<16} mean kept density {s.mean_density:.3f}  (profiled {s.profiled_calls}, sparse {s.sparse_calls})")


if __name__ == "__main__":
    main()
