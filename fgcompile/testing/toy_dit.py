"""A small video diffusion transformer in plain PyTorch, for the demo, the tests and the examples.

Architecture (a scaled-down Wan / Latte-style DiT):

- 3D patch embedding: latents (B, C, F, H, W) -> a Conv3d with kernel = stride = patch size ->
  tokens (B, N, width), N = F/pf * H/ph * W/pw, in frame-major order (f, h, w);
- a timestep embedding (sinusoidal + MLP) that drives adaLN modulation (shift, scale, gate) of
  every block;
- ``depth`` blocks of: adaLN -> self-attention over all N tokens with 3D rotary position
  embedding (RoPE over the frame, row and column axes) -> adaLN -> cross-attention to text tokens
  -> adaLN -> GELU MLP;
- a final adaLN + linear unpatchify back to (B, C, F, H, W).

Options (all off by default; the defaults give the model above, with the same seeded weights):

- ``num_labels > 0``: class-label conditioning. An ``nn.Embedding(num_labels + 1, width)`` (the
  last entry, index ``num_labels``, is the null label for classifier-free guidance) is added to
  the timestep embedding; ``forward(..., labels=(B,) int64)``.
- ``text_tokens = 0``: no cross-attention (and no text input).
- ``ada_shared = True``: adaLN-single (PixArt-alpha): one ``Linear(width, 6 * width)`` of the
  conditioning for all blocks plus a learned (6, width) table per block, and a (2, width) table
  for the final layer, instead of a ``Linear(width, 6 * width)`` per block (6 * width^2
  parameters per block saved).

Self-attention calls ``F.scaled_dot_product_attention`` (``attn_impl="sdpa"``, default) or the
hand-written ``softmax(q @ k^T * scale) @ v`` (``attn_impl="manual"``); cross-attention uses
SDPA. Weights are random (seeded): the model has no learned structure, but its attention is peaky
enough to be sparse (the q/k projections are scaled up, as trained DiTs' are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ToyDiTConfig", "ToyVideoDiT", "rope_3d", "toy_inputs"]


@dataclass(frozen=True)
class ToyDiTConfig:
    """Sizes of the toy video DiT. Token grid: (frames / patch[0]) x (height / patch[1]) x
    (width / patch[2])."""

    in_channels: int = 4
    width: int = 256
    depth: int = 4
    heads: int = 4
    text_dim: int = 64
    text_tokens: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    mlp_ratio: float = 2.0
    qk_gain: float = 4.0  # scales the q/k projections: peakier attention, as trained models have
    attn_impl: str = "sdpa"  # "sdpa" or "manual"
    num_labels: int = 0  # > 0: label conditioning (embedding of num_labels + 1; the last is the null label)
    ada_shared: bool = False  # adaLN-single: one modulation MLP shared by all blocks + per-block tables

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def toy_inputs(cfg: ToyDiTConfig = ToyDiTConfig(), batch: int = 1, frames: int = 2, hw: int = 16, seed: int = 0):
    """Seeded random inputs of a ``ToyVideoDiT(cfg)``: latents (batch, in_channels, frames, hw,
    hw), timesteps (batch,) in [0, 1), text (batch, text_tokens, text_dim); float32, CPU."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, cfg.in_channels, frames, hw, hw, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, cfg.text_tokens, cfg.text_dim, generator=g),
    )


def _rope_freqs(dim: int, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """(N,) positions -> (N, dim // 2) angles."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    return positions.float()[:, None] * inv[None, :]


def rope_3d(grid: tuple[int, int, int], head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (N, head_dim // 2) for a (F, H, W) token grid; the head dim is split into
    three parts for the frame, row and column axes (each even)."""
    f, h, w = grid
    d_f = 2 * (head_dim // 6)
    d_h = 2 * (head_dim // 6)
    d_w = head_dim - d_f - d_h
    ff, hh, ww = torch.meshgrid(
        torch.arange(f, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    ang = torch.cat(
        [_rope_freqs(d_f, ff.reshape(-1)), _rope_freqs(d_h, hh.reshape(-1)), _rope_freqs(d_w, ww.reshape(-1))], dim=-1
    )
    return ang.cos(), ang.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) with interleaved pairs; cos/sin (N, D // 2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    def __init__(self, cfg: ToyDiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.impl = cfg.attn_impl
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.norm_q = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.qk_gain = cfg.qk_gain

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q = _apply_rope(self.norm_q(q) * self.qk_gain, cos, sin)
        k = _apply_rope(self.norm_k(k) * self.qk_gain, cos, sin)
        if self.impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            o = torch.matmul(s.float().softmax(dim=-1).to(v.dtype), v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    def __init__(self, cfg: ToyDiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.text_dim, 2 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(text).view(b, text.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, cfg: ToyDiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg)
        if cfg.text_tokens > 0:
            self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
            self.cross = CrossAttention(cfg)
        else:
            self.norm2 = self.cross = None
        self.norm3 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.width))
        if cfg.ada_shared:
            # t is then the shared modulation (B, 6 * width); this table is added to it
            self.ada = None
            self.ada_table = nn.Parameter(torch.randn(6, cfg.width) / cfg.width**0.5)
        else:
            self.ada = nn.Linear(cfg.width, 6 * cfg.width)

    def forward(self, x, t, text, cos, sin):
        if self.ada is None:
            mod = t.view(t.shape[0], 6, -1) + self.ada_table.to(t.dtype)
            s1, c1, g1, s2, c2, g2 = mod.unbind(1)
        else:
            s1, c1, g1, s2, c2, g2 = self.ada(F.silu(t)).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), s1, c1), cos, sin)
        if self.cross is not None:
            x = x + self.cross(self.norm2(x), text)
        x = x + g2[:, None] * self.mlp(_modulate(self.norm3(x), s2, c2))
        return x


class ToyVideoDiT(nn.Module):
    """forward(latents (B, C, F, H, W), timestep (B,), text (B, T, text_dim), labels (B,)) ->
    (B, C, F, H, W): the predicted velocity (flow matching). ``text`` is required when
    ``cfg.text_tokens > 0`` and ignored otherwise; ``labels`` (int, ``cfg.num_labels`` = the null
    label) is required when ``cfg.num_labels > 0`` and ignored otherwise."""

    def __init__(self, cfg: ToyDiTConfig = ToyDiTConfig(), seed: int = 0):
        super().__init__()
        if cfg.attn_impl not in ("sdpa", "manual"):
            raise ValueError(f"attn_impl: expected 'sdpa' or 'manual', got {cfg.attn_impl!r}")
        if cfg.width % cfg.heads:
            raise ValueError(f"width: expected a multiple of heads ({cfg.heads}), got {cfg.width}")
        if cfg.num_labels < 0 or cfg.text_tokens < 0:
            raise ValueError(f"num_labels, text_tokens: expected >= 0, got {cfg.num_labels}, {cfg.text_tokens}")
        self.cfg = cfg
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            self.patch = nn.Conv3d(cfg.in_channels, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)
            self.t_mlp = nn.Sequential(nn.Linear(256, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
            self.norm_out = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
            if cfg.ada_shared:
                self.ada_out = None
                self.ada_out_table = nn.Parameter(torch.randn(2, cfg.width) / cfg.width**0.5)
            else:
                self.ada_out = nn.Linear(cfg.width, 2 * cfg.width)
            self.out = nn.Linear(cfg.width, cfg.in_channels * math.prod(cfg.patch))
            # options: created last, so that the default model's seeded weights are unchanged
            self.ada_shared = nn.Linear(cfg.width, 6 * cfg.width) if cfg.ada_shared else None
            self.label_emb = nn.Embedding(cfg.num_labels + 1, cfg.width) if cfg.num_labels > 0 else None

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        ang = t.float()[:, None] * 1000.0 * freqs[None]
        return torch.cat([ang.cos(), ang.sin()], dim=-1)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        if cfg.text_tokens > 0 and text is None:
            raise ValueError("text: this model has cross-attention (text_tokens > 0): pass text (B, T, text_dim)")
        if cfg.num_labels > 0 and labels is None:
            raise ValueError(f"labels: this model is label-conditioned: pass labels (B,) in [0, {cfg.num_labels}] "
                             f"({cfg.num_labels} = the null label)")
        b, c, f, h, w = latents.shape
        pf, ph, pw = cfg.patch
        grid = (f // pf, h // ph, w // pw)
        x = self.patch(latents).flatten(2).transpose(1, 2)  # (B, N, width), (f, h, w) order
        cos, sin = rope_3d(grid, cfg.head_dim, device=latents.device)
        t = self.t_mlp(self.timestep_embedding(timestep).to(x.dtype))
        if self.label_emb is not None:
            t = t + self.label_emb(labels)
        mod = self.ada_shared(F.silu(t)) if self.ada_shared is not None else t
        for blk in self.blocks:
            x = blk(x, mod, text, cos, sin)
        if self.ada_out is None:
            shift, scale = (t[:, None] + self.ada_out_table.to(t.dtype)).unbind(1)
        else:
            shift, scale = self.ada_out(F.silu(t)).chunk(2, dim=-1)
        x = self.out(_modulate(self.norm_out(x), shift, scale))
        x = x.view(b, *grid, c, pf, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, c, f, h, w)
