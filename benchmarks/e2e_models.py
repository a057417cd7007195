"""End to end on HunyuanVideo's and CogVideoX's architectures (diffusers, random weights, bf16):
one transformer forward, default torch.compile against backend="fgattn".

Models (``--models``, full widths; depth from ``--depth``, a fraction of the released model's
blocks, the same for every kind of block):

- ``hunyuan``: ``HunyuanVideoTransformer3DModel`` with the released configuration (24 heads of
  128, 20 dual-stream and 40 single-stream blocks, 2 refiner blocks, guidance embedding), latents
  (B, 16, 16, 60, 106): 480p (848 x 480), 61 frames = 16 x 30 x 53 = 25,440 video tokens, and 256
  text tokens of which ``--text-valid`` are the prompt and the rest padding (the model masks them
  with a (B, 1, 1, N) key mask: fgattn's key-padding path).
- ``cogvideox``: ``CogVideoXTransformer3DModel`` with CogVideoX-5B's configuration (48 heads of 64,
  42 blocks, 3D RoPE), latents (B, 13, 16, 60, 90): 720 x 480, 49 frames = 13 x 30 x 45 = 17,550
  video tokens joined with 226 text tokens, no mask.

Both sides compile block by block (each transformer block compiled in place with
``module.compile``: diffusers' regional compilation; the embedders and the rest run eager on both
sides). One model serves both sides: the default compile (backend="inductor": SDPA picks cuDNN
on an H100, or flash where cuDNN does not take the mask) is measured first, then the blocks are
recompiled with fgattn for each row.

Rows (``--settings``): ``d0.6`` / ``d0.3``: the density budget over a near-zero alpha, each query
block keeps its strongest 60% / 30% of keys (speed at a known density); ``profile``: the FG-Attn
rule at alpha 0.5 (the density it reaches on random weights is reported, not a quality figure),
with ``max_density=1.0`` (the sparse kernel runs whatever the density); ``profile-md0.8``: the same
with ``max_density`` 0.8 (the default until session 25; now 0.9; a denser site runs dense attention: SDPA, or on a key-padded
site the sparse kernel over every real key).
Reported per row: the median forward time (CUDA events, after the profiled call), the speedup,
the profiled call's error against the default output (exact attention: float noise only), the
sparse call's error, how many sites ran sparse (``fgcompile.stats``), and the attention kernels'
time from the profiler.

    python benchmarks/e2e_models.py                      # H100: benchmarks/results/e2e_models_<device>.json
    python benchmarks/e2e_models.py --tiny --device cpu  # a smoke run on tiny configs
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import fgcompile
from fgcompile.testing.metrics import rel_err

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_wan import first_call, kernel_breakdown, sparse_kernel_name, timed  # noqa: E402
from results_io import device_tag, write_result  # noqa: E402

HUNYUAN = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56),
)
HUNYUAN_TINY = dict(HUNYUAN, in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64,
                    num_layers=1, num_single_layers=2, num_refiner_layers=1, text_embed_dim=32,
                    pooled_projection_dim=16, rope_axes_dim=(16, 24, 24))
COGVIDEOX_5B = dict(
    num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
    text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
    use_rotary_positional_embeddings=True, max_text_seq_length=226,
)
COGVIDEOX_TINY = dict(COGVIDEOX_5B, num_attention_heads=2, time_embed_dim=32, text_embed_dim=32, num_layers=2,
                      sample_width=16, sample_height=16, sample_frames=5, max_text_seq_length=8)


def _scaled(n: int, depth: float) -> int:
    return max(1, round(n * depth))


def hunyuan(device, dtype, tiny: bool, depth: float, batch: int, text_valid: list):
    """(model, args, kwargs, blocks, description) of HunyuanVideo at ``depth`` of its blocks."""
    from diffusers import HunyuanVideoTransformer3DModel

    cfg = dict(HUNYUAN_TINY if tiny else HUNYUAN)
    cfg["num_layers"], cfg["num_single_layers"] = _scaled(cfg["num_layers"], depth), _scaled(cfg["num_single_layers"], depth)
    with torch.device(device):
        model = HunyuanVideoTransformer3DModel(**cfg).to(dtype).eval()
    f, h, w = (2, 16, 16) if tiny else (16, 60, 106)
    text = 8 if tiny else 256
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(batch, text, dtype=torch.long)
    valid = [min(text_valid[min(b, len(text_valid) - 1)], text) for b in range(batch)]  # per batch item
    for b, n in enumerate(valid):
        mask[b, :n] = 1
    args = (
        torch.randn(batch, cfg["in_channels"], f, h, w, generator=g).to(device, dtype),
        torch.full((batch,), 500, device=device, dtype=torch.long),
        torch.randn(batch, text, cfg["text_embed_dim"], generator=g).to(device, dtype),
        mask.to(device),
        torch.randn(batch, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
    )
    kwargs = dict(guidance=torch.full((batch,), 6016.0, device=device, dtype=dtype), return_dict=False)
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    tokens = f * (h // 2) * (w // 2)
    return model, args, kwargs, blocks, dict(config=cfg, video_tokens=tokens, text_tokens=text,
                                              text_valid=valid, latent=[f, h, w])


def cogvideox(device, dtype, tiny: bool, depth: float, batch: int, text_valid: list):
    """(model, args, kwargs, blocks, description) of CogVideoX-5B at ``depth`` of its blocks, with
    the pipeline's 3D RoPE tables (``CogVideoXPipeline._prepare_rotary_positional_embeddings``)."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg = dict(COGVIDEOX_TINY if tiny else COGVIDEOX_5B)
    cfg["num_layers"] = _scaled(cfg["num_layers"], depth)
    with torch.device(device):
        model = CogVideoXTransformer3DModel(**cfg).to(dtype).eval()
    f, h, w = (2, 16, 16) if tiny else (13, 60, 90)
    gh, gw = h // cfg["patch_size"], w // cfg["patch_size"]
    # CogVideoX 1.0: the grid's crop region in the base grid (the full base grid at the native size)
    base_h, base_w = cfg["sample_height"] // cfg["patch_size"], cfg["sample_width"] // cfg["patch_size"]
    crops = ((0, 0), (min(gh, base_h), min(gw, base_w)))
    cos, sin = get_3d_rotary_pos_embed(embed_dim=cfg["attention_head_dim"], crops_coords=crops, grid_size=(gh, gw),
                                       temporal_size=f, device=device)
    text = cfg["max_text_seq_length"]
    g = torch.Generator().manual_seed(1)
    args = (
        torch.randn(batch, f, cfg["in_channels"], h, w, generator=g).to(device, dtype),
        torch.randn(batch, text, cfg["text_embed_dim"], generator=g).to(device, dtype),
        torch.full((batch,), 500, device=device, dtype=torch.long),
    )
    kwargs = dict(image_rotary_emb=(cos.to(dtype), sin.to(dtype)), return_dict=False)
    return model, args, kwargs, list(model.transformer_blocks), dict(
        config=cfg, video_tokens=f * gh * gw, text_tokens=text, text_valid=[text] * batch, latent=[f, h, w])


MODELS = {"hunyuan": hunyuan, "cogvideox": cogvideox}
SETTINGS = {
    "d0.6": dict(alpha=1e-6, density=0.6),
    "d0.3": dict(alpha=1e-6, density=0.3),
    "profile": dict(alpha=0.5, density=None),
    # the FG-Attn rule with max_density 0.8 (the default until session 25): a site denser than that runs dense
    # attention (SDPA; on a key-padded site the sparse kernel over every real key)
    "profile-md0.8": dict(alpha=0.5, density=None, max_density=0.8),
}


def compile_blocks(blocks, backend) -> None:
    """Regional compilation: each block compiled in place (``nn.Module.compile``), as diffusers'
    ``compile_repeated_blocks`` does; a second call replaces the first's compiled forward."""
    for b in blocks:
        b.compile(backend=backend)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configs and grids (a smoke run)")
    p.add_argument("--models", default="hunyuan,cogvideox", help=f"of {', '.join(MODELS)}")
    p.add_argument("--depth", type=float, default=1.0, help="fraction of each model's blocks built (0 < depth <= 1)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-valid", default="96",
                   help="HunyuanVideo's prompt tokens of 256 (the rest padding), one number or one per batch item "
                        "(e.g. 96,4 at --batch 2: a prompt and classifier-free guidance's empty one)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--settings", default="d0.6,d0.3,profile", help=f"rows, of {', '.join(SETTINGS)}")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not 0 < args.depth <= 1:
        p.error(f"--depth must be in (0, 1], got {args.depth}")
    names = [m for m in args.models.split(",") if m]
    try:
        text_valid = [int(x) for x in args.text_valid.split(",")]
    except ValueError:
        p.error(f"--text-valid: expected integers separated by commas, got {args.text_valid!r}")
    if any(n < 0 for n in text_valid):
        p.error(f"--text-valid: expected counts >= 0, got {args.text_valid!r}")
    settings = [s for s in args.settings.split(",") if s]
    for n in names:
        if n not in MODELS:
            p.error(f"--models: unknown model {n!r}, expected some of {', '.join(MODELS)}")
    for s in settings:
        if s not in SETTINGS:
            p.error(f"--settings: unknown row {s!r}, expected some of {', '.join(SETTINGS)}")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    block_m = 128 if device.type == "cuda" else 64
    min_seq = 64 if args.tiny else 4096

    results = {}
    for name in names:
        torch._dynamo.reset()
        model, margs, mkw, blocks, desc = MODELS[name](device, dtype, args.tiny, args.depth, args.batch, text_valid)

        def fwd():
            return model(*margs, **mkw)[0]

        rows = []
        with torch.no_grad():
            compile_blocks(blocks, "inductor")
            ref, default_first_s = first_call(fwd, device)
            default_ms = timed(fwd, args.reps, device)
            default_attn_ms, _, _, default_top = kernel_breakdown(fwd, device)
            print(f"[{name}] default: first call {default_first_s:.1f} s, forward {default_ms:.1f} ms, "
                  f"attention {default_attn_ms} ms", flush=True)
            for setting in settings:
                torch._dynamo.reset()
                compile_blocks(blocks, fgcompile.backend(**{
                    **dict(profile_every=10 ** 6, dense_calls=0, block_m=block_m, min_seq_len=min_seq, max_density=1.0),
                    **SETTINGS[setting]}))
                # (a site compiled again with another config starts its schedule over)
                out, fg_first_s = first_call(fwd, device)  # the profiled call: dense attention
                profiled_err = rel_err(out.float(), ref.float())
                sparse_err = rel_err(fwd().float(), ref.float())
                fg_ms = timed(fwd, args.reps, device)
                attn_ms, other_ms, dense_attn_ms, top = kernel_breakdown(fwd, device)
                st = fgcompile.stats(model)
                sparse = sorted(n for n, s in st.items() if s.sparse_calls > 0)
                dense_reasons = sorted({s.fallback for s in st.values() if s.fallback})
                row = {
                    "setting": setting, **SETTINGS[setting], "first_call_s": round(fg_first_s, 2),
                    "fgattn_ms": round(fg_ms, 2), "default_ms": round(default_ms, 2),
                    "speedup": round(default_ms / fg_ms, 3), "profiled_call_rel_err": profiled_err,
                    "sparse_call_rel_err": sparse_err, "sites": len(st), "sparse_sites": len(sparse),
                    "sparse_site_names": sparse[:4] + (["..."] if len(sparse) > 4 else []),
                    # over the sites with a profiled mask (a site over max_density runs dense with it)
                    "mean_density": round(sum(d) / max(len(d), 1), 4) if (d := [
                        s.mean_density for s in st.values() if s.mean_density is not None]) else None,
                    "calls": {"sparse": sum(s.sparse_calls for s in st.values()),
                              "dense": sum(s.dense_calls for s in st.values()),
                              "profiled": sum(s.profiled_calls for s in st.values())},
                    "fallbacks": dense_reasons,
                    "attention_ms": attn_ms, "other_ms": other_ms, "dense_attention_ms": dense_attn_ms,
                    "top_kernels": top,
                }
                rows.append(row)
                print(f"[{name}] {setting}: first call {fg_first_s:.1f} s, forward {fg_ms:.1f} ms, speedup "
                      f"{row['speedup']:.2f}, {len(sparse)}/{len(st)} sites sparse, density {row['mean_density']}, calls {row['calls']}, "
                      f"profiled err {profiled_err:.2e}, sparse err {sparse_err:.2e}", flush=True)
        results[name] = {**desc, "blocks": len(blocks), "default_first_call_s": round(default_first_s, 2),
                         "default_ms": round(default_ms, 2), "default_attention_ms": default_attn_ms,
                         "default_top_kernels": default_top, "rows": rows}
        del model, margs, mkw, blocks, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()

    import triton

    result = {
        "what": "diffusers HunyuanVideo / CogVideoX-5B transformers (random weights), one forward, blocks compiled "
                "in place: default (inductor) vs fgattn",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype), "batch": args.batch,
        "depth": args.depth, "reps": args.reps, "sparse_kernel": sparse_kernel_name(device), "models": results,
        "command": "python benchmarks/e2e_models.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
    }
    out = args.out or (None if not args.tiny else os.path.join("/tmp", f"e2e_models_tiny_{device_tag()}.json"))
    write_result(result, "e2e_models", out)
    print(f"{'model':10} {'row':8} {'default ms':>11} {'fgattn ms':>10} {'speedup':>8} {'sparse sites':>13} {'density':>8}")
    for name, r in results.items():
        for row in r["rows"]:
            print(f"{name:10} {row['setting']:8} {row['default_ms']:11.1f} {row['fgattn_ms']:10.1f} {row['speedup']:8.2f} "
                  f"{row['sparse_sites']:>6}/{row['sites']:<6} {row['mean_density'] or 0:8.3f}")


if __name__ == "__main__":
    main()
