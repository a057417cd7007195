"""Euler flow-matching sampler with classifier-free guidance, for any model callable.

Flow matching convention (the one ``examples/train_toy_video_dit.py`` trains with):
``x_t = (1 - t) * x_0 + t * noise``, the model predicts the velocity ``v = noise - x_0``, and
sampling integrates ``dx/dt = v`` from t = 1 (noise) to t = 0 (data) with Euler steps.

The model is called as ``model(x, t, cond)`` (``cond_key=None``: the conditioning is the third
positional argument, e.g. the demo's text embeddings) or ``model(x, t, **{cond_key: cond})``
(e.g. ``cond_key="labels"`` for the label-conditioned toy DiT). With guidance, the conditional and
unconditional halves run in one batch of 2B (conditional first):
``v = v_uncond + guidance * (v_cond - v_uncond)``. Without ``null_cond`` the sampler runs the
conditional batch only. It works the same with an eager or a compiled model.

    x = euler_sample(model, noise, text, null_text, steps=25, guidance=5.0)          # the demo
    x = sample(model, labels, null_labels(labels, 12), shape=(3, 16, 64, 64), seed=0,
               cond_key="labels", steps=25, guidance=4.0)                           # label DiT
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["timesteps", "euler_sample", "sample", "seeded_noise", "null_labels", "video_strip", "write_png"]


def timesteps(steps: int, shift: float = 1.0, device: Any = None) -> torch.Tensor:
    """The ``steps + 1`` times from 1 to 0, optionally shifted toward high noise
    (``t' = shift * t / (1 + (shift - 1) * t)``, as in SD3; ``shift = 1``: uniform)."""
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift: expected > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return t.float()


def seeded_noise(
    shape: Sequence[int], seeds: int | Sequence[int], device: Any = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gaussian noise (len(seeds), *shape), item i drawn on the CPU from ``seeds[i]`` (an int
    ``seeds`` gives one item), so a seed gives the same noise on every device and in every batch."""
    if isinstance(seeds, int):
        seeds = [seeds]
    out = [torch.randn(*shape, generator=torch.Generator(device="cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device=device, dtype=dtype)


def null_labels(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """The null (unconditional) label, ``num_labels``, for each of ``labels``."""
    return torch.full_like(labels, num_labels)


def _call(model: Callable, x: torch.Tensor, t: torch.Tensor, cond: Any, cond_key: Optional[str], kwargs: dict):
    if cond_key is None:
        return model(x, t, cond, **kwargs)
    return model(x, t, **{cond_key: cond}, **kwargs)


@torch.no_grad()
def euler_sample(
    model: Callable,
    noise: torch.Tensor,
    cond: Any,
    null_cond: Any = None,
    steps: int = 25,
    guidance: float = 5.0,
    *,
    cond_key: Optional[str] = None,
    shift: float = 1.0,
    model_kwargs: Optional[dict] = None,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Integrate from ``noise`` (B, ...) at t = 1 to t = 0 in ``steps`` Euler steps.

    ``cond`` / ``null_cond``: tensors with batch dimension B (text (B, T, D), labels (B,), ...).
    ``null_cond=None``: no guidance (conditional batch of B only). Otherwise every step runs one
    batch of 2B, ``cat([cond, null_cond])``, and combines the halves with ``guidance``.
    ``callback(i, x)`` is called after step i. The state is kept in float32 between steps. Returns x at t = 0, in the noise's dtype."""
    dt = noise.dtype
    x = noise.float()  # the state is integrated in float32; the model sees the noise's dtype
    ts = timesteps(steps, shift, device=noise.device)
    kwargs = model_kwargs or {}
    b = x.shape[0]
    both = None if null_cond is None else torch.cat([cond, null_cond])
    for i in range(steps):
        xm = x.to(dt)
        if both is None:
            v = _call(model, xm, ts[i].expand(b), cond, cond_key, kwargs).float()
        else:
            v = _call(model, torch.cat([xm, xm]), ts[i].expand(2 * b), both, cond_key, kwargs).float()
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
        x = x + (ts[i + 1] - ts[i]) * v
        if callback is not None:
            callback(i, x)
    return x.to(dt)


@torch.no_grad()
def sample(
    model: Callable,
    cond: Any,
    null_cond: Any = None,
    *,
    shape: Sequence[int],
    seed: int | Sequence[int] = 0,
    steps: int = 25,
    guidance: float = 4.0,
    cond_key: Optional[str] = None,
    shift: float = 1.0,
    device: Any = None,
    dtype: Optional[torch.dtype] = None,
    model_kwargs: Optional[dict] = None,
) -> torch.Tensor:
    """Deterministic sampling from seeds: ``seed`` an int (item i uses ``seed + i``) or one seed
    per item of ``cond``; ``shape`` is one item's shape (C, F, H, W). ``device``/``dtype``
    default to the model's parameters (float32 if it has none)."""
    b = cond.shape[0]
    seeds = [int(seed) + i for i in range(b)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != b:
        raise ValueError(f"seed: expected an int or {b} seeds, got {len(seeds)}")
    if device is None or dtype is None:
        p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = device if device is not None else (p.device if p is not None else cond.device)
        dtype = dtype if dtype is not None else (p.dtype if p is not None else torch.float32)
    noise = seeded_noise(shape, seeds, device=device, dtype=dtype)
    return euler_sample(model, noise, cond, null_cond, steps, guidance, cond_key=cond_key, shift=shift,
                        model_kwargs=model_kwargs)


def video_strip(videos: torch.Tensor | Sequence[torch.Tensor], frames: Optional[Sequence[int]] = None, gap: int = 2) -> torch.Tensor:
    """Videos (B, 3, F, H, W) in [-1, 1] (or a list of such batches, stacked as more rows) ->
    one uint8 image (rows * (H + gap), len(frames) * (W + gap), 3): one row per video, one column
    per frame (default: every frame), white gaps."""
    if isinstance(videos, torch.Tensor):
        videos = [videos]
    v = torch.cat([x.detach().float().cpu() for x in videos])
    b, c, f, h, w = v.shape
    if c != 3:
        raise ValueError(f"videos: expected 3 channels, got {c}")
    idx = list(range(f)) if frames is None else list(frames)
    img = torch.full((b, h + gap, len(idx), w + gap, 3), 255, dtype=torch.uint8)
    sel = ((v[:, :, idx].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, n, H, W)
    img[:, :h, :, :w] = sel.permute(0, 3, 2, 4, 1)
    return img.reshape(b * (h + gap), len(idx) * (w + gap), 3)


def write_png(path: str, image: torch.Tensor) -> None:
    """Write a uint8 (H, W, 3) image as PNG with zlib alone (no imaging library needed)."""
    img = image.detach().cpu().to(torch.uint8).contiguous()
    if img.dim() != 3 or img.shape[2] != 3:
        raise ValueError(f"image: expected (H, W, 3) uint8, got {tuple(img.shape)}")
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[i].numpy().tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with open(path, "wb") as fh:
        fh.write(png)
