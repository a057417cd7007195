"""A procedural video data set: short clips of moving, bouncing, rotating, occluding coloured shapes.

Every clip has a label ``shape * len(COLORS) + color`` (``NUM_LABELS`` = 3 shapes x 4 colours =
12): the labelled object (that shape in that colour) is always in the clip; 0 to 2 other objects of
random shapes and colours move with it, in a random depth order, so objects occlude each other.
Objects move in straight lines at constant speed and bounce off the borders; squares and triangles
rotate. The background is a flat dark grey of random level.

Generation is vectorised (coordinate grids, signed distances with a one-pixel anti-aliased edge;
loops only over the few objects), seeded, and works on any device: the per-clip random parameters
are drawn on the CPU from ``seed`` and the clips are rasterised on ``device``, so a seed gives the
same clips on a CPU and a GPU (up to float rounding).

    video, labels = make_clips(8, seed=0)              # (8, 3, 16, 64, 64) in [-1, 1], (8,) int64
    for video, labels in ShapesStream(batch_size=64, seed=0, device="cuda"):  # endless, seeded
        ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

__all__ = [
    "SHAPES",
    "COLORS",
    "NUM_LABELS",
    "ShapesConfig",
    "label_name",
    "make_clips",
    "ShapesStream",
]

SHAPES = ("circle", "square", "triangle")
COLORS = {  # RGB in [0, 1]
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.25),
    "blue": (0.2, 0.4, 1.0),
    "yellow": (1.0, 0.85, 0.1),
}
NUM_LABELS = len(SHAPES) * len(COLORS)


def label_name(label: int) -> str:
    """``label_name(5) == "green square"``."""
    if not 0 <= int(label) < NUM_LABELS:
        raise ValueError(f"label: expected an int in [0, {NUM_LABELS}), got {label!r}")
    shape, color = divmod(int(label), len(COLORS))
    return f"{list(COLORS)[color]} {SHAPES[shape]}"


@dataclass(frozen=True)
class ShapesConfig:
    """Clip size and object statistics. Sizes are in pixels, speeds in pixels per frame."""

    frames: int = 16
    size: int = 64
    max_objects: int = 3  # the labelled object + up to max_objects - 1 others
    radius: tuple[float, float] = (0.1, 0.2)  # object radius, as a fraction of ``size``
    speed: tuple[float, float] = (0.01, 0.05)  # per frame, as a fraction of ``size``
    spin: float = 0.15  # max |rotation| per frame (radians), squares and triangles
    background: tuple[float, float] = (0.0, 0.3)  # grey level range, in [0, 1]

    def __post_init__(self) -> None:
        if self.frames < 1 or self.size < 4 or self.max_objects < 1:
            raise ValueError(f"ShapesConfig: expected frames >= 1, size >= 4, max_objects >= 1, got {self}")
        if not (0 < self.radius[0] <= self.radius[1] < 0.5):
            raise ValueError(f"ShapesConfig.radius: expected 0 < lo <= hi < 0.5, got {self.radius}")


def _bounce(p0: torch.Tensor, v: torch.Tensor, t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Position at times t of a point starting at p0 with velocity v, reflected at lo and hi
    (a triangle wave); p0, v, lo, hi (..., 1), t (F,) -> (..., F)."""
    span = (hi - lo).clamp_min(1e-6)
    y = torch.remainder(p0 - lo + v * t, 2 * span)
    return lo + span - (y - span).abs()


def _params(n: int, labels: torch.Tensor, cfg: ShapesConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """All random parameters of n clips, drawn on the CPU (float64 for reproducibility)."""
    K, S = cfg.max_objects, float(cfg.size)

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    n_obj = torch.randint(1, K + 1, (n,), generator=gen)
    shape = torch.randint(0, len(SHAPES), (n, K), generator=gen)
    color = torch.randint(0, len(COLORS), (n, K), generator=gen)
    shape[:, 0], color[:, 0] = labels // len(COLORS), labels % len(COLORS)  # object 0 is the labelled one
    present = torch.arange(K)[None, :] < n_obj[:, None]
    depth = torch.rand(n, K, generator=gen).argsort(dim=1)  # random painting order
    radius = u(cfg.radius[0], cfg.radius[1], n, K) * S
    pos = u(0.0, 1.0, n, K, 2) * (S - 2 * radius[..., None]) + radius[..., None]
    speed = u(cfg.speed[0], cfg.speed[1], n, K) * S
    heading = u(0.0, 2 * math.pi, n, K)
    vel = torch.stack([heading.cos(), heading.sin()], dim=-1) * speed[..., None]
    angle0 = u(0.0, 2 * math.pi, n, K)
    spin = u(-cfg.spin, cfg.spin, n, K)
    bg = u(cfg.background[0], cfg.background[1], n)
    return dict(shape=shape, color=color, present=present, depth=depth, radius=radius, pos=pos, vel=vel,
                angle0=angle0, spin=spin, bg=bg)


def _to_device(p: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move the parameters in two copies (floats as float32, the rest as int64), pinned and
    asynchronous on CUDA, so that generating a batch never waits for the GPU."""
    names = list(p)
    flt = [k for k in names if p[k].is_floating_point()]
    oth = [k for k in names if not p[k].is_floating_point()]
    bufs = {}
    for keys, dt in ((flt, torch.float32), (oth, torch.int64)):
        flat = torch.cat([p[k].to(dt).reshape(-1) for k in keys])
        if device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
        off = 0
        for k in keys:
            m = p[k].numel()
            bufs[k] = flat[off : off + m].view(p[k].shape)
            off += m
    bufs["present"] = bufs["present"].bool()
    return bufs


def make_clips(
    n: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    labels: Optional[Sequence[int] | torch.Tensor] = None,
    config: ShapesConfig = ShapesConfig(),
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` clips -> (video (n, 3, frames, size, size) in [-1, 1], labels (n,) int64), both on
    ``device``. ``labels`` (optional) fixes each clip's label; otherwise they are drawn from
    ``seed`` too. The same (n, seed, labels, config) gives the same clips."""
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    device = torch.device(device)
    cfg = config
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    drawn = torch.randint(0, NUM_LABELS, (n,), generator=gen)
    if labels is None:
        labels = drawn
    else:
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu().reshape(-1)
        if labels.numel() != n or bool(((labels < 0) | (labels >= NUM_LABELS)).any()):
            raise ValueError(f"labels: expected {n} ints in [0, {NUM_LABELS}), got {labels.tolist()}")
    p = _to_device({**_params(n, labels, cfg, gen), "labels": labels}, device)

    F_, S, K = cfg.frames, cfg.size, cfg.max_objects
    t = torch.arange(F_, device=device, dtype=torch.float32)
    r = p["radius"][..., None]  # (n, K, 1)
    cx = _bounce(p["pos"][..., 0:1], p["vel"][..., 0:1], t, r, S - r)  # (n, K, F)
    cy = _bounce(p["pos"][..., 1:2], p["vel"][..., 1:2], t, r, S - r)
    ang = p["angle0"][..., None] + p["spin"][..., None] * t  # (n, K, F)
    coord = torch.arange(S, device=device, dtype=torch.float32) + 0.5
    ys, xs = coord.view(1, 1, S, 1), coord.view(1, 1, 1, S)
    palette = torch.tensor(list(COLORS.values()), device=device, dtype=torch.float32)  # (C, 3)

    img = p["bg"].view(n, 1, 1, 1, 1).expand(n, 3, F_, S, S).clone()
    order = p["depth"]
    for j in range(K):  # back to front
        k = order[:, j]  # (n,) which object is painted j-th
        pick = lambda x: x.gather(1, k.view(n, *([1] * (x.dim() - 1))).expand(n, 1, *x.shape[2:])).squeeze(1)
        dx = xs - pick(cx)[:, :, None, None]  # (n, F, S, S) via broadcasting
        dy = ys - pick(cy)[:, :, None, None]
        rad = pick(p["radius"])[:, None, None, None]
        a = pick(ang)[:, :, None, None]
        ca, sa = a.cos(), a.sin()
        u_ = ca * dx + sa * dy  # rotated coordinates
        v_ = -sa * dx + ca * dy
        d_circle = (dx * dx + dy * dy).sqrt() - rad
        half = rad * 0.8  # square: half side
        d_square = torch.maximum(u_.abs(), v_.abs()) - half
        # equilateral triangle, circumradius rad: inside iff every edge's outward-normal
        # projection <= rad / 2 (normals at angles a - pi/2 + 2 pi i / 3 in the rotated frame)
        d_tri = None
        for i in range(3):
            phi = -math.pi / 2 + 2 * math.pi * i / 3
            proj = u_ * math.cos(phi) + v_ * math.sin(phi)
            d_tri = proj if d_tri is None else torch.maximum(d_tri, proj)
        d_tri = d_tri - rad / 2
        kind = pick(p["shape"]).view(n, 1, 1, 1)
        sdf = torch.where(kind == 0, d_circle, torch.where(kind == 1, d_square, d_tri))
        alpha = (0.5 - sdf).clamp(0.0, 1.0) * pick(p["present"]).view(n, 1, 1, 1).float()  # (n, F, S, S)
        col = palette[pick(p["color"])].view(n, 3, 1, 1, 1)
        img = torch.lerp(img, col.expand_as(img), alpha[:, None])
    video = (img * 2.0 - 1.0).clamp(-1.0, 1.0).to(dtype)
    return video, p["labels"]


class ShapesStream:
    """An endless, seeded stream of batches ``(video, labels)``: batch i is
    ``make_clips(batch_size, seed=hash(seed, i), device=device)``. ``start`` skips to batch
    ``start`` (resuming)."""

    def __init__(
        self,
        batch_size: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        config: ShapesConfig = ShapesConfig(),
        dtype: torch.dtype = torch.float32,
        start: int = 0,
    ):
        self.batch_size, self.seed, self.device, self.config, self.dtype = batch_size, seed, device, config, dtype
        self.index = start

    def batch_seed(self, i: int) -> int:
        return (int(self.seed) * 1_000_003 + 7919 * int(i) + 12345) % (2**62)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = make_clips(self.batch_size, self.batch_seed(self.index), self.device, config=self.config, dtype=self.dtype)
        self.index += 1
        return out
