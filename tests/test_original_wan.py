"""The attention code of the original Wan2.1 repository (wan/modules/model.py and attention.py,
the path taken without flash-attn), in a tiny faithful copy: ``rope_apply`` reads
``grid_sizes.tolist()`` and ``attention()`` calls ``warnings.warn`` whenever ``k_lens`` is passed,
two graph breaks that leave the attention of every layer in one graph segment without parameters,
which serves the self-attention and the cross-attention alike (Dynamo makes its key length
dynamic when the short cross-attention call comes). The profile predictor must still serve each
layer's self-attention with its own mask."""

import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fgcompile
from fgcompile.testing.metrics import rel_err

os.environ["FGCOMPILE_STRICT"] = "1"

DIM, HEADS, GRID, TEXT = 128, 2, (2, 8, 16), 32


def attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, causal=False, dtype=torch.bfloat16, cast=True):
    """wan/modules/attention.py attention() without flash-attn (cast=False: the CPU forks' variant
    that keeps q's dtype)."""
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
    def __init__(self, dim, num_heads, cast):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfAttention(dim, num_heads, cast)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads, cast)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e, seq_lens, grid_sizes, freqs, context, context_lens):
        e = (self.modulation + e).chunk(6, dim=1)
        x = x + self.self_attn(self.norm1(x).float() * (1 + e[1]) + e[0], seq_lens, grid_sizes, freqs) * e[2]
        x = x + self.cross_attn(self.norm3(x), context, context_lens)
        return x + self.ffn(self.norm2(x).float() * (1 + e[4]) + e[3]) * e[5]


class WanModel(nn.Module):
    def __init__(self, depth=3, cast=True):
        super().__init__()
        self.blocks = nn.ModuleList([Block(DIM, HEADS, cast) for _ in range(depth)])
        d = DIM // HEADS
        self.freqs = torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)),
                                rope_params(1024, 2 * (d // 6))], dim=1)

    def forward(self, x, e, seq_lens, grid_sizes, context, context_lens):
        if self.freqs.device != x.device:
            self.freqs = self.freqs.to(x.device)
        for block in self.blocks:
            x = block(x, e, seq_lens, grid_sizes, self.freqs, context, context_lens)
        return x


def _model_and_inputs(cast):
    torch.manual_seed(0)
    model = WanModel(cast=cast).eval()
    with torch.no_grad():  # sharper attention than random weights give (a trained model's)
        for block in model.blocks:
            for norm in (block.self_attn.norm_q, block.self_attn.norm_k):  # (q and k are RMS-normed)
                norm.weight.mul_(3.0)
    g = torch.Generator().manual_seed(0)
    s = GRID[0] * GRID[1] * GRID[2]
    return model, (torch.randn(1, s, DIM, generator=g), torch.randn(1, 6, DIM, generator=g), torch.tensor([s]),
                   torch.tensor([list(GRID)]), torch.randn(1, TEXT, DIM, generator=g), torch.tensor([TEXT]))


@pytest.mark.filterwarnings("ignore:Padding mask is disabled")
@pytest.mark.parametrize(
    "cast,device",
    [(False, "cpu"), (True, "cpu"), pytest.param(True, "cuda", marks=pytest.mark.gpu)],
    ids=["float32", "bfloat16", "cuda-bfloat16"],
)
def test_original_wan_code_runs_sparse_under_the_profile_predictor(cast, device):
    """Every layer's self-attention profiles at its first call (the output is exact) and then
    runs sparse on its own mask; the cross-attention (32 text keys) runs dense. On CUDA the
    sparse calls run the lowered Triton kernel."""
    torch._dynamo.reset()
    model, x = _model_and_inputs(cast)
    model, x = model.to(device), tuple(t.to(device) for t in x)
    c = torch.compile(model, backend=fgcompile.backend(min_seq_len=64, block_m=64, alpha=0.5, dense_calls=0,
                                                      max_density=1.0))
    with torch.no_grad():
        ref = model(*x)
        errs = [rel_err(c(*x), ref) for _ in range(3)]
    tol = 1e-5 if not cast else 2e-2
    assert errs[0] < tol, errs  # profiled: dense attention
    assert errs[1] < 1e-2 and errs[2] == errs[1], errs
    st = fgcompile.stats(c)
    counts = {n: (s.calls, s.dense_calls, s.profiled_calls, s.sparse_calls) for n, s in st.items()}
    assert counts == {
        **{f"blocks.{i}.self_attn": (3, 0, 1, 2) for i in range(3)},
        **{f"blocks.{i}.cross_attn": (3, 3, 0, 0) for i in range(3)},
    }, counts
    densities = [st[f"blocks.{i}.self_attn"].mean_density for i in range(3)]
    assert max(densities) < 0.9, densities
    # each layer ran on its own mask: the three masks differ
    masks = [fgcompile.runtime.state_of(c).sites[f"blocks.{i}.self_attn"].mask.cpu() for i in range(3)]
    assert all(not torch.equal(a, b) for a, b in ((masks[0], masks[1]), (masks[1], masks[2])))
    fgcompile.reset(c)
    with torch.no_grad():
        assert rel_err(c(*x), ref) < tol  # profiled again


@pytest.mark.filterwarnings("ignore:Padding mask is disabled")
def test_original_wan_code_state_saves_and_loads(tmp_path):
    """The per-layer masks of the parameter-free attention segment save and load by the layers'
    paths: a second copy of the model, loaded, runs sparse on the first copy's masks."""
    torch._dynamo.reset()
    backend = fgcompile.backend(min_seq_len=64, block_m=64, alpha=0.5, dense_calls=0, max_density=1.0,
                                profile_every=100)
    model, x = _model_and_inputs(False)
    c = torch.compile(model, backend=backend)
    with torch.no_grad():
        c(*x)
        sparse_out = c(*x)
    fgcompile.save_state(c, tmp_path / "wan.pt")
    other, _ = _model_and_inputs(False)
    c2 = torch.compile(other, backend=backend)
    with torch.no_grad():
        x2 = (x[0] + 0.5 * torch.randn_like(x[0]),) + x[1:]  # another input: its own profile would differ
        c2(*x2)
        fgcompile.load_state(c2, tmp_path / "wan.pt")
        torch.testing.assert_close(c2(*x), sparse_out, atol=1e-6, rtol=1e-5)
    counts = {n: (s.profiled_calls, s.sparse_calls) for n, s in fgcompile.stats(c2).items() if "self_attn" in n}
    # (the schedule position is saved too: 1 profiled and 1 sparse call, then this sparse one)
    assert counts == {f"blocks.{i}.self_attn": (1, 2) for i in range(3)}, counts
