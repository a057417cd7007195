"""Train the label-conditioned toy video DiT on procedural shape clips (flow matching, bf16).

The model: fgcompile.testing.toy_dit.ToyVideoDiT with 8 blocks of width 384 (6 heads of 64), 3D
RoPE, adaLN-single, label conditioning (12 labels + the null label), no cross-attention, MLP ratio
1.5, patch (1, 4, 4) on 16 x 64 x 64 RGB clips -> 16 x 16 x 16 = 4,096 tokens; 9,473,584
parameters, an 18.9 MB bf16 safetensors file. The data: fgcompile.testing.shapes_data, generated on
the training device, a new batch every step.

Training: x_t = (1 - t) x + t noise, target noise - x, t logit-normal; AdamW, warm-up then cosine
decay over the wall-clock budget, gradient clipping, 10% label dropout (classifier-free guidance),
EMA of the weights (saved); torch.compile on CUDA. Stops at --minutes of wall time (everything
included: compile, saving, the sample strip), or after --steps.

    python examples/train_toy_video_dit.py --device cuda             # H100: 14 minutes
    python examples/train_toy_video_dit.py --smoke --out-dir /tmp/t  # a few CPU steps, tiny model
    python examples/train_toy_video_dit.py --plot-only examples/weights/toy_video_dit.log

Writes, in --out-dir (default examples/weights): toy_video_dit.safetensors (EMA weights, bf16,
the model config in its metadata), toy_video_dit.json (config, training summary), .log (the loss
every --log-every steps), _loss.png (the loss curve; needs matplotlib, else re-plot later with
--plot-only) and _samples.png (one row per label, every other frame, EMA weights, CFG).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a checkout without `pip install -e .` (e.g. the GPU machine)
    sys.path.insert(0, str(REPO))

from fgcompile.testing.sampler import null_labels, sample, video_strip, write_png
from fgcompile.testing.shapes_data import NUM_LABELS, ShapesConfig, ShapesStream, label_name
from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT

NAME = "toy_video_dit"

# the shipped model (see the module docstring)
MODEL = ToyDiTConfig(in_channels=3, width=384, depth=8, heads=6, text_tokens=0, patch=(1, 4, 4), mlp_ratio=1.5,
                     qk_gain=1.0, num_labels=NUM_LABELS, ada_shared=True)
DATA = ShapesConfig(frames=16, size=64)
# --smoke: 4 x 4 x 4 = 64 tokens
SMOKE_MODEL = dataclasses.replace(MODEL, width=64, depth=2, heads=1)
SMOKE_DATA = ShapesConfig(frames=4, size=16)
SAMPLER = {"steps": 25, "guidance": 4.0, "shift": 1.0}


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_for_training(model: ToyVideoDiT) -> None:
    """DiT / PixArt-style initialisation: xavier linears, zero biases, small embeddings, a zero
    output layer and zero per-block adaLN (each block starts as the identity)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.patch.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.patch.bias)
    for lin in (model.t_mlp[0], model.t_mlp[2]):
        nn.init.normal_(lin.weight, std=0.02)
    if model.label_emb is not None:
        nn.init.normal_(model.label_emb.weight, std=0.02)
    if model.ada_shared is not None:
        nn.init.normal_(model.ada_shared.weight, std=0.02)
    for blk in model.blocks:
        if blk.ada is not None:
            nn.init.zeros_(blk.ada.weight)
            nn.init.zeros_(blk.ada.bias)
    if model.ada_out is not None:
        nn.init.zeros_(model.ada_out.weight)
        nn.init.zeros_(model.ada_out.bias)
    nn.init.zeros_(model.out.weight)
    nn.init.zeros_(model.out.bias)


def config_to_dict(cfg: ToyDiTConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["patch"] = list(d["patch"])
    return d


def save_weights(model: nn.Module, path: Path, cfg: ToyDiTConfig, dtype: torch.dtype, extra: dict) -> int:
    """Save the weights (``dtype``) with the model config in the safetensors metadata; returns the
    file size in bytes."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "model": "fgcompile.testing.toy_dit.ToyVideoDiT",
            "config": json.dumps(config_to_dict(cfg)), **{k: json.dumps(v) for k, v in extra.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path.stat().st_size


def read_log(path: Path) -> tuple[list[int], list[float], list[float]]:
    steps, secs, losses = [], [], []
    for line in Path(path).read_text().splitlines():
        if line.startswith("step "):
            f = dict(zip(line.split()[0::2], line.split()[1::2]))
            steps.append(int(f["step"]))
            secs.append(float(f["time_s"]))
            losses.append(float(f["loss"]))
    return steps, secs, losses


def plot_loss(log_path: Path, png_path: Path, title: str = "") -> bool:
    """The loss curve of a training log as PNG; False (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no loss curve; later: python {Path(__file__).name} --plot-only {log_path}")
        return False
    steps, secs, losses = read_log(log_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=1.0, label="flow-matching loss (mean over the logging interval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE of the velocity)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    if secs:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * secs[-1] / max(steps[-1], 1),
                                                   lambda m: m * max(steps[-1], 1) / max(secs[-1], 1e-9)))
        top.set_xlabel("wall time (s)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True


class EMA:
    """Exponential moving average of the parameters (float32), with the usual warm-up
    ``decay_t = min(decay, (1 + t) / (10 + t))``."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = decay
        self.src = [p for p in model.parameters()]
        self.dst = [p for p in self.model.parameters()]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.dst, [p.detach() for p in self.src], 1.0 - d)
        self.updates += 1


def lr_at(step: int, progress: float, args) -> float:
    warm = min(1.0, (step + 1) / max(args.warmup, 1))
    if args.schedule == "constant":
        return args.lr * warm
    p = min(max(progress, 0.0), 1.0)
    return args.lr * warm * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, default=14.0, help="wall-clock budget of the whole run")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: the budget only)")
    p.add_argument("--batch", type=int, default=32, help="clips per step (halved automatically on CUDA OOM)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="after the warm-up; cosine over the wall-clock budget")
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on CUDA)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--reserve", type=float, default=None, help="seconds of the budget kept for saving and sampling (default 30; smoke 0)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="dtype of the saved weights")
    p.add_argument("--out-dir", default=str(REPO / "examples" / "weights"))
    p.add_argument("--name", default=NAME)
    p.add_argument("--smoke", action="store_true", help="tiny model and clips, a few CPU steps (tests)")
    p.add_argument("--plot-only", metavar="LOG", default=None, help="only (re)draw the loss curve of LOG")
    args = p.parse_args(argv)

    if args.plot_only:
        log = Path(args.plot_only)
        plot_loss(log, log.with_name(log.stem + "_loss.png"), title=log.stem)
        return {}

    t_start = time.time()
    if args.smoke:
        model_cfg, data_cfg = SMOKE_MODEL, SMOKE_DATA
        args.steps = 3 if args.steps is None else args.steps
        args.batch = min(args.batch, 2)
        args.warmup = min(args.warmup, 2)
        args.log_every = 1
        sampler = {"steps": 2, "guidance": SAMPLER["guidance"], "shift": SAMPLER["shift"]}
    else:
        model_cfg, data_cfg, sampler = MODEL, DATA, dict(SAMPLER)
    reserve = args.reserve if args.reserve is not None else (0.0 if args.smoke else 30.0)
    budget = args.minutes * 60.0
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    use_compile = cuda if args.compile is None else args.compile
    save_dtype = getattr(torch, args.dtype)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"{args.name}{suffix}" for k, suffix in
             (("weights", ".safetensors"), ("json", ".json"), ("log", ".log"), ("loss_png", "_loss.png"),
              ("samples_png", "_samples.png"))}

    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = ToyVideoDiT(model_cfg, seed=args.seed)
    init_for_training(model)
    model = model.to(device)
    n_params = param_count(model)
    ema = EMA(model, args.ema)
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (no_decay if prm.dim() < 2 or "table" in name or "label_emb" in name else decay).append(prm)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99), eps=1e-8, **({"fused": True} if cuda else {}))
    fwd = torch.compile(model) if use_compile else model
    batch = args.batch
    stream = ShapesStream(batch, seed=args.seed, device=device, config=data_cfg)
    tokens = (data_cfg.frames // model_cfg.patch[0]) * (data_cfg.size // model_cfg.patch[1]) * (data_cfg.size // model_cfg.patch[2])

    logf = open(paths["log"], "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    dev_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    log(f"# {args.name}: {n_params:,} parameters, {model_cfg.depth} blocks, width {model_cfg.width}, "
        f"{model_cfg.heads} heads of {model_cfg.head_dim}, {tokens} tokens ({data_cfg.frames}x{data_cfg.size}x{data_cfg.size} "
        f"RGB, patch {model_cfg.patch}), {NUM_LABELS} labels")
    log(f"# device {dev_name}, torch {torch.__version__}, compile {use_compile}, batch {batch}, lr {args.lr} "
        f"({args.schedule}, warm-up {args.warmup}), EMA {args.ema}, label dropout {args.label_dropout}, "
        f"budget {args.minutes} min (reserve {reserve:.0f} s), seed {args.seed}")
    log(f"# args: {json.dumps(vars(args))}")

    def train_step(step: int, progress: float) -> torch.Tensor:
        video, labels = next(stream)
        b = video.shape[0]
        drop = torch.rand(b, device=device) < args.label_dropout
        labels = torch.where(drop, null_labels(labels, NUM_LABELS), labels)
        t = torch.sigmoid(torch.randn(b, device=device))  # logit-normal(0, 1)
        noise = torch.randn_like(video)
        tt = t.view(b, 1, 1, 1, 1)
        x_t = (1 - tt) * video + tt * noise
        target = noise - video
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = fwd(x_t, t, labels=labels)
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        lr = lr_at(step, progress, args)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        ema.update()
        return loss.detach()

    step, seen = 0, 0
    loss_sum = torch.zeros((), device=device)
    n_sum = 0
    t_train0 = time.time()
    first_step_s = None
    last_log_t, last_log_step = time.time(), 0
    train_budget = max(budget - reserve - (t_train0 - t_start), 1.0)
    while True:
        now = time.time()
        if args.steps is not None and step >= args.steps:
            break
        if now - t_train0 >= train_budget:
            break
        try:
            progress = (now - t_train0) / train_budget
            if args.steps is not None:
                progress = max(progress, step / args.steps)
            loss = train_step(step, progress)
        except torch.cuda.OutOfMemoryError:
            if step > 0 or batch <= 1:
                raise
            batch //= 2
            log(f"# CUDA out of memory at batch {batch * 2}: retrying with batch {batch}")
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            stream = ShapesStream(batch, seed=args.seed, device=device, config=data_cfg)
            continue
        step += 1
        seen += stream.batch_size
        loss_sum += loss
        n_sum += 1
        if first_step_s is None:
            if cuda:
                torch.cuda.synchronize()
            first_step_s = time.time() - t_train0
            log(f"# first step (compile included): {first_step_s:.1f} s")
        if step % args.log_every == 0:
            lv = (loss_sum / n_sum).item()
            t_now = time.time()
            rate = (step - last_log_step) * stream.batch_size / max(t_now - last_log_t, 1e-9)
            last_log_t, last_log_step = t_now, step
            lr = opt.param_groups[0]["lr"]
            log(f"step {step} time_s {t_now - t_start:.1f} loss {lv:.5f} lr {lr:.3e} clips_per_s {rate:.1f}")
            if not math.isfinite(lv):
                raise RuntimeError(f"loss is {lv} at step {step}")
            loss_sum.zero_()
            n_sum = 0
    if n_sum:
        log(f"step {step} time_s {time.time() - t_start:.1f} loss {(loss_sum / n_sum).item():.5f} "
            f"lr {opt.param_groups[0]['lr']:.3e} clips_per_s 0")
    train_s = time.time() - t_train0
    log(f"# trained {step} steps, {seen:,} clips in {train_s:.1f} s")

    # ----------------------------------------------------------------- save
    _, _, losses = read_log(paths["log"])
    tail = losses[-max(1, len(losses) // 10):]
    final_loss = sum(tail) / len(tail) if tail else float("nan")
    summary = {
        "steps": step, "clips": seen, "batch": stream.batch_size, "train_seconds": round(train_s, 1),
        "first_step_seconds": round(first_step_s or 0.0, 1), "final_loss": final_loss,
        "device": dev_name, "torch": torch.__version__,
    }
    size = save_weights(ema.model, paths["weights"], model_cfg, save_dtype,
                        {"data": dataclasses.asdict(data_cfg), "sampler": sampler, "training": summary})
    log(f"# saved EMA weights ({args.dtype}): {paths['weights']} ({size / 1e6:.2f} MB, {n_params:,} parameters)")
    meta = {
        "model": config_to_dict(model_cfg),
        "parameters": n_params,
        "weights": paths["weights"].name,
        "weights_dtype": args.dtype,
        "weights_bytes": size,
        "data": {**dataclasses.asdict(data_cfg), "labels": [label_name(i) for i in range(NUM_LABELS)],
                 "null_label": NUM_LABELS, "module": "fgcompile.testing.shapes_data"},
        "sampler": sampler,
        "flow_matching": "x_t = (1 - t) x + t noise, v = noise - x, t ~ logit-normal(0, 1); sample t: 1 -> 0",
        "training": {**summary, "args": vars(args)},
    }
    paths["json"].write_text(json.dumps(meta, indent=2) + "\n")

    # one row per label, every other frame, from the EMA weights
    eval_model = ema.model.to(torch.bfloat16 if cuda else torch.float32)
    labels = torch.arange(NUM_LABELS, device=device)
    vid = sample(eval_model, labels, null_labels(labels, NUM_LABELS), shape=(3, data_cfg.frames, data_cfg.size, data_cfg.size),
                 seed=1000, cond_key="labels", steps=sampler["steps"], guidance=sampler["guidance"], shift=sampler["shift"])
    write_png(str(paths["samples_png"]), video_strip(vid, frames=range(0, data_cfg.frames, 2 if data_cfg.frames > 8 else 1)))
    log(f"# samples (rows: {', '.join(label_name(i) for i in range(NUM_LABELS))}): {paths['samples_png']}")
    logf.close()
    plot_loss(paths["log"], paths["loss_png"],
              title=f"{args.name}: {n_params / 1e6:.2f}M params, {step} steps x {stream.batch_size} clips, "
                    f"{train_s / 60:.1f} min on {dev_name}")
    total = time.time() - t_start
    print(f"done in {total:.1f} s: {', '.join(str(v) for v in paths.values())}")
    return {"steps": step, "params": n_params, "bytes": size, "seconds": total, "paths": {k: str(v) for k, v in paths.items()}}


if __name__ == "__main__":
    main()
