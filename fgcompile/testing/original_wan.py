"""The transformer of the original Wan2.1 repository (wan/modules/model.py and attention.py) on
its scaled-dot-product-attention path, as a faithful copy of its attention code at any size: the
tests and benchmarks/original_wan.py run it to check that fgcompile serves the code as the
repository writes it, not only diffusers' port.

Which path: the repository's blocks call ``flash_attention()``, which on CUDA runs flash-attn's
``flash_attn_varlen_func`` (which ``fgcompile.passes.expand_flash`` rewrites into SDPA; see
tests/test_flash_attn_ops.py for that path) and otherwise (on the CPU, and in the many forks that route it to SDPA where
flash-attn is missing) falls through to ``attention()``'s SDPA path, copied here. What matters to
fgcompile is copied as written: ``rope_apply`` reads ``grid_sizes.tolist()`` (a graph break) and
rotates q and k in complex float64; ``attention()`` calls ``warnings.warn`` whenever ``k_lens`` is
passed (another graph break), casts q/k/v to bfloat16 (``cast=True``, as on CUDA; ``cast=False``
keeps q's dtype, as on the CPU) and calls SDPA. These breaks leave every layer's attention in one
graph segment without parameters, which serves the self-attention and the text cross-attention
alike. Left out: the patch embedding, the timestep and text embeddings and the head (the model
takes tokens (B, S, dim), the time modulation (B, 6, dim) and text tokens (B, L, dim)); weights
are random.

Shapes: ``x`` (B, F*H*W, dim) float; ``e`` (B, 6, dim) float32; ``seq_lens`` (B,) int64;
``grid_sizes`` (B, 3) int64 (F, H, W); ``context`` (B, L, dim); ``context_lens`` (B,) int64.
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["WanModel", "WAN_13B", "inputs", "attention", "rope_apply"]

#: Wan2.1-T2V-1.3B's transformer blocks (its config: dim 1536, 12 heads, ffn 8960, 30 layers)
WAN_13B = dict(dim=1536, num_heads=12, ffn_dim=8960, depth=30)


def attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, causal=False, dtype=torch.bfloat16, cast=True):
    """wan/modules/attention.py attention()'s SDPA path (``cast=False``: its CPU branch, which
    keeps q's dtype)."""
    if q_lens is not None or k_lens is not None:
        warnings.warn("Padding mask is disabled when using scaled_dot_product_attention. "
                      "It can have a significant impact on performance.")
    out_dtype = q.dtype
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if cast:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=causal, dropout_p=dropout_p)
    return out.transpose(1, 2).contiguous().to(out_dtype)


def rope_params(max_seq_len, dim, theta=10000):
    freqs = torch.outer(torch.arange(max_seq_len), 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim)))
    return torch.polar(torch.ones_like(freqs), freqs)


def rope_apply(x, grid_sizes, freqs):
    n, c = x.size(2), x.size(3) // 2
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    output = []
    for i, (f, h, w) in enumerate(grid_sizes.tolist()):
        seq_len = f * h * w
        x_i = torch.view_as_complex(x[i, :seq_len].to(torch.float64).reshape(seq_len, n, -1, 2))
        freqs_i = torch.cat([
            freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ], dim=-1).reshape(seq_len, 1, -1)
        x_i = torch.view_as_real(x_i * freqs_i).flatten(2)
        output.append(torch.cat([x_i, x[i, seq_len:]]))
    return torch.stack(output).float()


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, cast):
        super().__init__()
        self.num_heads, self.head_dim, self.cast = num_heads, dim // num_heads, cast
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim), RMSNorm(dim)

    def forward(self, x, seq_lens, grid_sizes, freqs):
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        x = attention(rope_apply(q, grid_sizes, freqs), rope_apply(k, grid_sizes, freqs), v, k_lens=seq_lens,
                      cast=self.cast)
        return self.o(x.flatten(2))


class CrossAttention(SelfAttention):
    def forward(self, x, context, context_lens):
        b, n, d = x.size(0), self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(self.k(context)).view(b, -1, n, d)
        v = self.v(context).view(b, -1, n, d)
        return self.o(attention(q, k, v, k_lens=context_lens, cast=self.cast).flatten(2))


class Block(nn.Module):
    def __init__(self, dim, num_heads, ffn_dim, cast):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfAttention(dim, num_heads, cast)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads, cast)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e, seq_lens, grid_sizes, freqs, context, context_lens):
        e = (self.modulation + e).chunk(6, dim=1)
        x = x + self.self_attn(self.norm1(x).float() * (1 + e[1]) + e[0], seq_lens, grid_sizes, freqs) * e[2]
        x = x + self.cross_attn(self.norm3(x), context, context_lens)
        return x + self.ffn(self.norm2(x).float() * (1 + e[4]) + e[3]) * e[5]


class WanModel(nn.Module):
    """Wan2.1's WanModel without its embeddings and head: ``depth`` blocks of self-attention
    (qk RMS norm, 3D RoPE), text cross-attention and a GELU MLP, modulated by ``e``. ``cast``:
    attention() casts q/k/v to bfloat16 (the repository) or keeps their dtype. Run it in bfloat16
    as the repository's pipeline does, under ``torch.autocast(dtype=torch.bfloat16)`` with
    float32 weights, or with every tensor float32."""

    def __init__(self, dim=128, num_heads=2, ffn_dim=256, depth=3, cast=True):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads, ffn_dim, cast) for _ in range(depth)])
        d = dim // num_heads
        self.freqs = torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)),
                                rope_params(1024, 2 * (d // 6))], dim=1)

    def forward(self, x, e, seq_lens, grid_sizes, context, context_lens):
        if self.freqs.device != x.device:
            self.freqs = self.freqs.to(x.device)
        for block in self.blocks:
            x = block(x, e, seq_lens, grid_sizes, self.freqs, context, context_lens)
        return x




def inputs(grid=(2, 8, 16), text=32, dim=128, batch=1, device="cpu", seed=0):
    """Seeded inputs of ``WanModel(dim=dim)`` for a latent grid of ``grid`` = (F, H, W) patches
    and ``text`` text tokens: (x, e, seq_lens, grid_sizes, context, context_lens), float32."""
    g = torch.Generator().manual_seed(seed)
    s = grid[0] * grid[1] * grid[2]
    out = (torch.randn(batch, s, dim, generator=g), torch.randn(batch, 6, dim, generator=g),
           torch.full((batch,), s), torch.tensor([list(grid)] * batch),
           torch.randn(batch, text, dim, generator=g), torch.full((batch,), text))
    return tuple(t.to(device) for t in out)
