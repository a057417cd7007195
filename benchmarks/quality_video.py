"""What sparsity costs in real generations: the trained toy video DiT, dense vs backend="fgattn".

For a fixed set of (seed, label) pairs, samples every video with dense attention and with
``torch.compile(model, backend=fgcompile.backend(cfg))`` under:

- ``slices``:   the profile predictor, M x 1 slices (block_m=128, block_n=1), several alpha;
- ``slices_pca``: the same with ``query_order="pca"`` (alike queries grouped into query blocks);
- ``pooled``:   the pooled top-CDF predictor, M x 1 slices, several tau;
- ``tiles64``:  the same profile rule on 64 x 64 tiles (block_m=64, block_n=64), several alpha;
- ``tiles128``: the same profile rule on 128 x 128 tiles (block_m=128, block_n=128), several alpha;

and reports per setting the mean kept density (``fgcompile.stats``: mean over sites, heads and
the profiled + sparse calls) and the PSNR / SSIM of every frame against the dense video of the
same seed. The dense reference is the same compiled pipeline with ``predictor="dense"`` (so only
the attention differs); the eager model's PSNR against it is reported as the numerical floor.
Per granularity, the density at which the mean PSNR reaches 30 dB (linear interpolation between
the two settings around it) and the saving of M x 1 slices against 128 x 128 tiles there.

Writes benchmarks/results/quality_video.json, quality_video.png (PSNR and SSIM vs density) and
quality_video_maps.png (block-max attention probabilities of one query block and the masks the
predictors keep for it, a few heads of one layer, at one sampling step).

    python benchmarks/quality_video.py --device cuda                 # the shipped weights
    python benchmarks/quality_video.py --random-weights --tiny       # CPU smoke (minutes), *_tiny files
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import fgcompile  # noqa: E402
from fgcompile.testing.sampler import euler_sample, null_labels, seeded_noise, video_strip, write_png  # noqa: E402
from fgcompile.testing.shapes_data import NUM_LABELS, label_name  # noqa: E402
from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT, _apply_rope  # noqa: E402

GRANULARITIES = {  # name -> (predictor, block_m, block_n, label)
    "slices": ("profile", 128, 1, "profile, 128 x 1 slices"),
    "slices_pca": ("profile", 128, 1, "profile, 128 x 1, pca order"),
    "pooled": ("pooled", 128, 1, "pooled, 128 x 1 slices"),
    "tiles64": ("profile", 64, 64, "profile, 64 x 64 tiles"),
    "tiles128": ("profile", 128, 128, "profile, 128 x 128 tiles"),
}
# alpha 32 and 64: the 128 x 128 tiles still held 32 dB at alpha 16 (density 0.66) on the shipped
# model, so their 30 dB density was only bounded; the larger alphas pin it (slices: cheap rows)
#: FGAttnConfig.query_order of each granularity (above); "none" where not listed
QUERY_ORDER = {"slices_pca": "pca"}
ALPHAS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0, 64.0)
TAUS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.995)
TARGET_PSNR = 30.0


# ------------------------------------------------------------------------------------ metrics
def psnr_frames(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of every frame, videos (B, 3, F, H, W) in [-1, 1] mapped to [0, 1] -> (B, F);
    capped at 100 dB (identical frames)."""
    a, b = (x.float().clamp(-1, 1) + 1) / 2, (ref.float().clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).mean(dim=(1, 3, 4))
    return -10 * torch.log10(mse.clamp_min(1e-10))


def ssim_frames(x: torch.Tensor, ref: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1) of
    every frame, mean over pixels and channels -> (B, F)."""
    a, b = (x.float().clamp(-1, 1) + 1) / 2, (ref.float().clamp(-1, 1) + 1) / 2
    B, C, Fr, H, W = a.shape
    a = a.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    b = b.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    g = torch.exp(-((torch.arange(window, dtype=torch.float32) - window // 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).to(a.device)
    k = (g[:, None] * g[None, :]).expand(C, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, k, groups=C)  # 'valid' window, as the reference implementation

    mu_a, mu_b = blur(a), blur(b)
    s_aa = blur(a * a) - mu_a**2
    s_bb = blur(b * b) - mu_b**2
    s_ab = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    return m.mean(dim=(1, 2, 3)).view(B, Fr)


def density_at_psnr(points: list[tuple[float, float]], target: float = TARGET_PSNR) -> dict[str, Any]:
    """The lowest density at which the (density, PSNR) curve reaches ``target``: scanning from
    the sparsest point, the first point at or above target, linearly interpolated with the point
    before it. ``bound``: "interpolated", "at_or_below" (the sparsest point already reaches it) or
    "not_reached"."""
    pts = sorted((d, p) for d, p in points if d is not None and p is not None and math.isfinite(d))
    for i, (d, p) in enumerate(pts):
        if p >= target:
            if i == 0:
                return {"density": d, "bound": "at_or_below"}
            d0, p0 = pts[i - 1]
            frac = (target - p0) / (p - p0) if p != p0 else 1.0
            return {"density": d0 + frac * (d - d0), "bound": "interpolated"}
    return {"density": None, "bound": "not_reached"}


# ------------------------------------------------------------------------------------ models
def tiny_config() -> ToyDiTConfig:
    # head dim 64 (what fgattn makes sparse); qk_gain 4: peaky random attention
    return ToyDiTConfig(in_channels=3, width=64, depth=2, heads=1, text_tokens=0, patch=(1, 4, 4), mlp_ratio=1.5,
                        qk_gain=4.0, num_labels=NUM_LABELS, ada_shared=True)


def load_model(args, device, dtype) -> tuple[ToyVideoDiT, dict]:
    if args.random_weights:
        if args.tiny:
            cfg, shape = tiny_config(), (3, 4, 32, 32)
        else:
            sys.path.insert(0, str(REPO / "examples"))
            import train_toy_video_dit as tr

            cfg, shape = tr.MODEL, (3, tr.DATA.frames, tr.DATA.size, tr.DATA.size)
        model = ToyVideoDiT(cfg, seed=args.model_seed).to(device=device, dtype=dtype).eval().requires_grad_(False)
        meta = {"weights": "random", "sample_shape": shape, "sampler": {"steps": 25, "guidance": 4.0, "shift": 1.0}}
        return model, meta
    from fgcompile.testing.pretrained import load_toy_video_dit

    model = load_toy_video_dit(args.weights, device=device, dtype=dtype)
    meta = {k: v for k, v in model.meta.items() if k in ("sampler", "training", "sample_shape", "data")}
    meta["weights"] = str(args.weights or "examples/weights/toy_video_dit.safetensors")
    if args.tiny:  # fewer frames, smaller clips (the model takes any multiple of the patch)
        meta["sample_shape"] = (3, 4, 32, 32)
    return model, meta


# ------------------------------------------------------------------------------------ runs
def make_sampler(args, meta, noise, labels):
    nulls = null_labels(labels, NUM_LABELS)

    def run(m):
        return euler_sample(m, noise, labels, nulls, args.steps, args.guidance, cond_key="labels", shift=args.shift)

    return run


def fg_config(predictor: str, block_m: int, block_n: int, value: Optional[float], tokens: int, args,
              query_order: str = "none") -> "fgcompile.FGAttnConfig":
    kw = dict(predictor=predictor, block_m=block_m, block_n=block_n, min_seq_len=min(4096, tokens), query_order=query_order,
              profile_every=args.profile_every, dense_calls=args.dense_calls, impl=args.impl,
              max_density=1.0)  # measure each mask as predicted, never the dense switch
    if predictor == "profile" and value is not None:
        kw["alpha"] = value
    if predictor == "pooled" and value is not None:
        kw["tau"] = value
    return fgcompile.FGAttnConfig(**kw)


def run_setting(model, cfg, run, device, compiled=None) -> tuple[torch.Tensor, dict, float, Any]:
    """Sample with fgattn under ``cfg``; return (video, stats summary, seconds, compiled model).

    ``compiled``: a model compiled before for the same granularity (predictor, block_m, block_n):
    its run-time settings (alpha, tau) change by ``fgcompile.configure`` and its schedule restarts
    by ``fgcompile.reset``, without recompiling. Else a fresh compile of ``model``."""
    fresh = compiled is None
    if fresh:
        torch._dynamo.reset()  # a fresh compile per granularity (and no recompile limit across them)
        compiled = torch.compile(model, backend=fgcompile.backend(cfg))
    else:
        fgcompile.configure(compiled, alpha=cfg.alpha, tau=cfg.tau)
    try:
        fgcompile.reset(compiled)  # a model compiled before keeps its per-site state: start afresh
    except ValueError:
        pass  # never ran under fgattn yet
    t0 = time.perf_counter()
    video = run(compiled)
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    st = fgcompile.stats(compiled)
    sites = {}
    for name, s in st.items():
        sites[name] = {"calls": s.calls, "dense_calls": s.dense_calls, "profiled_calls": s.profiled_calls,
                       "sparse_calls": s.sparse_calls, "density": s.mean_density,
                       "density_per_head": s.density_mean}
    dens = [v["density"] for v in sites.values() if v["density"] is not None]
    summary = {
        "sites": sites,
        "n_sites": len(sites),
        "density": (sum(dens) / len(dens)) if dens else None,
        "sparse_calls": sum(v["sparse_calls"] for v in sites.values()),
        "profiled_calls": sum(v["profiled_calls"] for v in sites.values()),
        "calls": sum(v["calls"] for v in sites.values()),
        "seconds_include_compile": fresh,
    }
    return video, summary, secs, compiled


def quality(video: torch.Tensor, ref: torch.Tensor) -> dict:
    p, s = psnr_frames(video, ref), ssim_frames(video, ref)
    return {"psnr_mean": p.mean().item(), "psnr_min": p.min().item(), "ssim_mean": s.mean().item(),
            "ssim_min": s.min().item(), "psnr_per_video": p.mean(1).tolist(), "psnr_per_frame": p.tolist(),
            "ssim_per_frame": s.tolist()}


# ------------------------------------------------------------------------------------ attention maps
@torch.no_grad()
def attention_maps(model: ToyVideoDiT, args, noise, labels, path: Path, grid: tuple[int, int, int]) -> dict:
    """Block-max probabilities of one query block (the middle one) of a few heads of one layer at
    one sampling step (eager, dense), beside the keys each predictor keeps for that block."""
    from fgcompile import predictors

    layer = min(args.map_layer, len(model.blocks) - 1)
    captured: dict[str, torch.Tensor] = {}
    step = min(args.map_step, args.steps - 1)
    state = {"call": 0}

    def hook(mod, inputs):
        if state["call"] == step and "x" not in captured:
            captured["x"], captured["cos"], captured["sin"] = (t.detach() for t in inputs)

    def counted(x, t, **kw):
        out = model(x, t, **kw)
        state["call"] += 1
        return out

    h = model.blocks[layer].attn.register_forward_pre_hook(hook)
    try:
        euler_sample(counted, noise[:1], labels[:1], null_labels(labels[:1], NUM_LABELS), step + 1, args.guidance,
                     cond_key="labels", shift=args.shift)
    finally:
        h.remove()
    attn = model.blocks[layer].attn
    x, cos, sin = captured["x"][:1], captured["cos"], captured["sin"]  # the conditional half
    b, n, c = x.shape
    q, k, _ = attn.qkv(x).view(b, n, 3, attn.heads, c // attn.heads).permute(2, 0, 3, 1, 4)
    q = _apply_rope(attn.norm_q(q) * attn.qk_gain, cos, sin).float()
    k = _apply_rope(attn.norm_k(k) * attn.qk_gain, cos, sin).float()
    heads = list(range(min(args.map_heads, attn.heads)))
    qb = (n // 128) // 2  # the middle query block of 128
    block_max = predictors.profile_scores(q, k, block_m=128)[0, :, qb]  # (H, S)
    rows = {
        "max prob of the query block": None,
        "profile 128x1, alpha 0.5": predictors.profile_slices(q, k, alpha=0.5, block_m=128, block_n=1)[0, :, qb],
        "pooled 128x1, tau 0.9": predictors.pooled_slices(q, k, tau=0.9, block_m=128, block_n=1)[0, :, qb],
        "profile 128x128 tiles, alpha 0.5": predictors.profile_slices(q, k, alpha=0.5, block_m=128, block_n=128)[0, :, qb]
        .repeat_interleave(128, dim=-1)[:, :n],
    }
    f_, h_, w_ = grid
    panels, names = [], []
    for hd in heads:
        for name, keep in rows.items():
            if name.startswith("max prob"):
                val = block_max[hd]
                val = (val / val.max()).clamp_min(1e-4).log10() / 4 + 1  # log scale, 1e-4 .. 1
            elif keep is None:
                continue
            else:
                val = keep[hd].float()
            img = val.view(f_, h_, w_).permute(1, 0, 2).reshape(h_, f_ * w_)  # frames side by side
            panels.append(img)
            names.append(f"head {hd}: {name} (density {keep[hd].float().mean().item():.2f})" if keep is not None
                         and not name.startswith("max prob") else f"head {hd}: {name} (log scale)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(panels), 1, figsize=(12, 0.9 * len(panels) + 0.6))
        for ax, img, name in zip(axes if len(panels) > 1 else [axes], panels, names):
            ax.imshow(img.cpu().numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
            ax.set_title(name, fontsize=7, loc="left")
            ax.axis("off")
        fig.suptitle(f"layer {layer}, step {step}, query block {qb} (of 128 queries): keys shown as "
                     f"{f_} frames of {h_}x{w_} tokens", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=130)
        plt.close(fig)
    except ImportError:
        rgb = torch.cat([torch.cat([p, torch.ones(1, p.shape[1], device=p.device)]) for p in panels])
        write_png(str(path), (rgb.clamp(0, 1) * 255).to(torch.uint8)[..., None].expand(-1, -1, 3).cpu())
    return {"layer": layer, "step": step, "query_block": qb, "heads": heads, "panels": names}


# ------------------------------------------------------------------------------------ plot
def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (the JSON has every number)")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for gname, (_, bm, bn, label) in GRANULARITIES.items():
        pts = sorted((r["density"], r["psnr_mean"], r["ssim_mean"]) for r in results["settings"]
                     if r["granularity"] == gname and r["density"] is not None)
        if not pts:
            continue
        d, p, s = zip(*pts)
        a1.plot(d, p, "o-", label=label, ms=4)
        a2.plot(d, s, "o-", label=label, ms=4)
        x = results["density_at_30db"].get(gname, {}).get("density")
        if x is not None:
            a1.axvline(x, ls=":", lw=0.8, color=a1.lines[-1].get_color())
    a1.axhline(TARGET_PSNR, color="gray", ls="--", lw=0.8)
    ps = [r["psnr_mean"] for r in results["settings"]]
    if ps:  # identical videos give 100 dB: keep the interesting range in view
        a1.set_ylim(max(0.0, min(ps) - 2), min(60.0, max(max(ps), TARGET_PSNR) + 2))
    a1.set_xlabel("mean kept density")
    a1.set_ylabel("PSNR vs dense (dB), mean over frames")
    a2.set_xlabel("mean kept density")
    a2.set_ylabel("SSIM vs dense, mean over frames")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.set_xlim(0, 1.02)
    a1.legend(fontsize=7)
    r = results
    fig.suptitle(f"toy video DiT ({r['weights']}), {r['tokens']} tokens, {r['steps']} steps, CFG {r['guidance']}, "
                 f"{len(r['seeds'])} videos, {r['device']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--weights", default=None, help="safetensors file (default: examples/weights/toy_video_dit.safetensors)")
    p.add_argument("--random-weights", action="store_true", help="random weights (no trained file needed): a smoke test only")
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: tiny clips (4 x 32 x 32), a tiny model with --random-weights, short sweeps")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 3 (tiny: 0 1)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="one per seed; default 0 5 10 3 (tiny: 0 5)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the weights' sampler, 25; tiny: 4)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--profile-every", type=int, default=None, help="default 10 (tiny: 2)")
    p.add_argument("--dense-calls", type=int, default=0)
    p.add_argument("--impl", default="auto", choices=["auto", "triton", "reference"])
    p.add_argument("--granularities", nargs="+", default=list(GRANULARITIES), choices=list(GRANULARITIES))
    p.add_argument("--alphas", type=float, nargs="+", default=None)
    p.add_argument("--taus", type=float, nargs="+", default=None)
    p.add_argument("--no-maps", action="store_true", help="skip the attention-map PNG")
    p.add_argument("--map-layer", type=int, default=3)
    p.add_argument("--map-step", type=int, default=12)
    p.add_argument("--map-heads", type=int, default=3)
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/quality_video[_tiny])")
    p.add_argument("--resume", action="store_true",
                   help="keep the settings already in the output JSON (same run parameters) and run only the others; "
                        "the JSON is rewritten after every setting, so a run cut short can be resumed")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, meta = load_model(args, device, dtype)
    smp = meta.get("sampler", {})
    args.steps = args.steps or (4 if args.tiny else smp.get("steps", 25))
    args.guidance = args.guidance if args.guidance is not None else smp.get("guidance", 4.0)
    args.shift = args.shift if args.shift is not None else smp.get("shift", 1.0)
    args.profile_every = args.profile_every or (2 if args.tiny else 10)
    seeds = args.seeds or ([0, 1] if args.tiny else [0, 1, 2, 3])
    labels_l = args.labels or ([0, 5, 10, 3] * len(seeds))[: len(seeds)]
    if len(labels_l) != len(seeds):
        p.error(f"--labels: expected one per seed ({len(seeds)}), got {len(labels_l)}")
    alphas = args.alphas or ((0.5, 4.0) if args.tiny else ALPHAS)
    taus = args.taus or ((0.9,) if args.tiny else TAUS)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / ("quality_video_tiny" if args.tiny else "quality_video")
    out.parent.mkdir(parents=True, exist_ok=True)

    shape = tuple(meta["sample_shape"])
    pf, ph, pw = model.cfg.patch
    grid = (shape[1] // pf, shape[2] // ph, shape[3] // pw)
    tokens = math.prod(grid)
    noise = seeded_noise(shape, seeds, device=device, dtype=dtype)
    labels = torch.tensor(labels_l, device=device)
    run = make_sampler(args, meta, noise, labels)
    print(f"toy video DiT ({meta['weights']}): {model.cfg.depth} blocks, {model.cfg.heads} heads of {model.cfg.head_dim}, "
          f"{tokens} tokens {grid}, {len(seeds)} videos (CFG batch {2 * len(seeds)}), {args.steps} steps, "
          f"guidance {args.guidance}, {device.type} {str(dtype).replace('torch.', '')}", flush=True)

    results: dict[str, Any] = {
        "weights": meta["weights"], "training": meta.get("training"), "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "tokens": tokens, "grid": list(grid), "steps": args.steps, "guidance": args.guidance, "shift": args.shift,
        "profile_every": args.profile_every, "dense_calls": args.dense_calls, "seeds": seeds,
        "labels": [label_name(l) for l in labels_l], "settings": [],
    }

    # dense references: eager, and the same compiled pipeline with the dense predictor
    with torch.no_grad():
        t0 = time.perf_counter()
        eager = run(model)
        t_eager = time.perf_counter() - t0
    ref, ref_stats, t_ref, _ = run_setting(model, fg_config("dense", 128, 1, None, tokens, args), run, device)
    floor = quality(eager, ref)
    results["dense"] = {"seconds_with_compile": t_ref, "eager_seconds": t_eager, "n_sites": ref_stats["n_sites"],
                        "eager_vs_compiled_dense": {k: floor[k] for k in ("psnr_mean", "psnr_min", "ssim_mean")}}
    print(f"dense (fgattn, predictor='dense'): {ref_stats['n_sites']} sites, {t_ref:.1f} s; eager vs compiled dense: "
          f"PSNR {floor['psnr_mean']:.1f} dB (floor)", flush=True)
    if ref_stats["n_sites"] == 0:
        print("WARNING: fgattn found no attention site in the model: every setting below is dense", flush=True)
    strip = [ref.float().cpu()]
    json_path = out.with_suffix(".json")
    same = ("weights", "tokens", "steps", "guidance", "shift", "profile_every", "dense_calls", "seeds", "labels", "dtype")
    if args.resume and json_path.is_file():
        old = json.loads(json_path.read_text())
        if all(old.get(k) == results.get(k) for k in same):
            results["settings"] = list(old.get("settings", []))
            print(f"resuming: {len(results['settings'])} settings kept from {json_path}", flush=True)
        else:
            print(f"not resuming: {json_path} was made with other run parameters", flush=True)
    done = {(r["granularity"], r.get("tau", r.get("alpha"))) for r in results["settings"]}

    for gname in args.granularities:
        pred, bm, bn, label = GRANULARITIES[gname]
        compiled = None  # one compile per granularity; alpha / tau change at run time
        for val in (taus if pred == "pooled" else alphas):
            if (gname, val) in done:
                continue
            cfg = fg_config(pred, bm, bn, val, tokens, args, QUERY_ORDER.get(gname, "none"))
            video, st, secs, compiled = run_setting(model, cfg, run, device, compiled)
            q = quality(video, ref)
            row = {"granularity": gname, "label": label, "predictor": pred, "block_m": bm, "block_n": bn,
                   ("tau" if pred == "pooled" else "alpha"): val, "density": st["density"], "seconds": secs, "seconds_include_compile": st["seconds_include_compile"],
                   **{k: q[k] for k in ("psnr_mean", "psnr_min", "ssim_mean", "ssim_min", "psnr_per_video")},
                   "psnr_per_frame": q["psnr_per_frame"], "ssim_per_frame": q["ssim_per_frame"],
                   "calls": st["calls"], "profiled_calls": st["profiled_calls"], "sparse_calls": st["sparse_calls"],
                   "sites": st["sites"]}
            results["settings"].append(row)
            d = f"{st['density']:.3f}" if st["density"] is not None else "n/a"
            print(f"{label:<28} {'tau' if pred == 'pooled' else 'alpha'}={val:<6g} density {d}  PSNR {q['psnr_mean']:6.2f} dB "
                  f"(min {q['psnr_min']:6.2f})  SSIM {q['ssim_mean']:.4f}  sparse calls {st['sparse_calls']}, "
                  f"profiled {st['profiled_calls']}  {secs:.1f} s", flush=True)
            if gname == "slices" and val == 0.5:
                strip.append(video.float().cpu())
            json_path.write_text(json.dumps(results, indent=1) + "\n")  # partial results, for --resume

    results["density_at_30db"] = {
        g: density_at_psnr([(r["density"], r["psnr_mean"]) for r in results["settings"] if r["granularity"] == g])
        for g in args.granularities
    }
    d_s = results["density_at_30db"].get("slices", {}).get("density")
    d_t = results["density_at_30db"].get("tiles128", {}).get("density")
    if d_s is not None and d_t is not None and d_t > 0:
        saving = 1 - d_s / d_t
        results["slices_vs_tiles128"] = {"density_saving": saving, "target": 0.25, "met": saving >= 0.25}
    else:
        results["slices_vs_tiles128"] = {"density_saving": None, "target": 0.25, "met": None,
                                         "why": "a granularity did not reach 30 dB, or was not run"}
    d_p = results["density_at_30db"].get("slices_pca", {}).get("density")
    if d_p is not None and d_t:
        results["slices_pca_vs_tiles128"] = {"density_saving": 1 - d_p / d_t, "target": 0.25, "met": 1 - d_p / d_t >= 0.25}
    print("\ndensity at PSNR 30 dB:")
    for g, v in results["density_at_30db"].items():
        print(f"  {GRANULARITIES[g][3]:<28} {v['density'] if v['density'] is None else round(v['density'], 4)} ({v['bound']})")
    print(f"M x 1 slices vs 128 x 128 tiles: {results['slices_vs_tiles128']}")
    if "slices_pca_vs_tiles128" in results:
        print(f"M x 1 slices in the pca query order vs 128 x 128 tiles: {results['slices_pca_vs_tiles128']}")

    if not args.no_maps:
        try:
            results["maps"] = attention_maps(model, args, noise, labels, out.with_name(out.name + "_maps.png"), grid)
        except Exception as e:  # the maps are an extra: report, do not lose the measurements
            results["maps"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"attention maps failed: {type(e).__name__}: {e}")
    # dense (top) beside fgattn slices alpha 0.5 (bottom), every other frame
    write_png(str(out.with_name(out.name + "_strip.png")),
              video_strip(strip, frames=range(0, shape[1], 2 if shape[1] > 8 else 1)))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.png')}, {out.name}_maps.png, {out.name}_strip.png")
    return results


if __name__ == "__main__":
    main()
