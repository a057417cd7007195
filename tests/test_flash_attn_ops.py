"""flash-attn's forward ops rewritten into SDPA sites (fgcompile.passes.expand_flash).

flash-attn is not installed here (its ops are CUDA-only): stand-ins are registered under its
namespace and op names with its schemas (flash_attn/flash_attn_interface.py, flash-attn 2.7/2.8:
``flashattn::_flash_attn_forward`` and ``flashattn::_flash_attn_varlen_forward``, declared as
mutating q, k, v), computing the same attention on the CPU. The model code calls them as
flash-attn's autograd functions do."""

import os
from typing import Optional

import pytest
import torch
import torch.nn as nn

import fgcompile
from fgcompile import FGAttnConfig, predictors
from fgcompile.testing.metrics import rel_err

os.environ["FGCOMPILE_STRICT"] = "1"


def _attend(q, k, v, scale, causal):
    """(B, S, H, D) attention in float64, as flash-attn computes it (causal: aligned bottom-right)."""
    qt, kt, vt = (t.transpose(1, 2).double() for t in (q, k, v))
    if kt.shape[1] != qt.shape[1]:
        rep = qt.shape[1] // kt.shape[1]
        kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
    s = qt @ kt.transpose(-1, -2) * scale
    if causal:
        s_q, s_k = s.shape[-2:]
        s = s.masked_fill(torch.ones(s_q, s_k, dtype=torch.bool).tril(s_k - s_q).logical_not(), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ vt).transpose(1, 2).to(q.dtype).contiguous()


try:
    @torch.library.custom_op("flashattn::_flash_attn_forward", mutates_args=("q", "k", "v"))
    def _flash_fwd(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float, causal: bool,
        window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
        return_softmax: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if dropout_p or softcap or window_size_left != -1 or window_size_right != -1 or alibi_slopes is not None:
            raise NotImplementedError("the stand-in computes plain or causal attention only")
        out = _attend(q, k, v, softmax_scale, causal)
        return out, q.new_zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32), q.new_empty(0), \
            torch.zeros(2, dtype=torch.int64)

    @_flash_fwd.register_fake
    def _(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
          return_softmax):
        return (torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32),
                q.new_empty(0), q.new_empty(2, dtype=torch.int64))

    @torch.library.custom_op("flashattn::_flash_attn_varlen_forward", mutates_args=("q", "k", "v"))
    def _flash_varlen_fwd(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
        window_size_left: int = -1, window_size_right: int = -1, softcap: float = 0.0,
        alibi_slopes: Optional[torch.Tensor] = None, return_softmax: bool = False,
        block_table: Optional[torch.Tensor] = None, leftpad_k: Optional[torch.Tensor] = None,
        seqused_k: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = torch.zeros_like(q)
        for i in range(cu_seqlens_q.numel() - 1):
            a, b = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
            c, d = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
            out[a:b] = _attend(q[None, a:b], k[None, c:d], v[None, c:d], softmax_scale, causal)[0]
        return out, q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float32), q.new_empty(0), \
            torch.zeros(2, dtype=torch.int64)

    @_flash_varlen_fwd.register_fake
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
          window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False,
          block_table=None, leftpad_k=None, seqused_k=None):
        return (torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32), q.new_empty(0),
                q.new_empty(2, dtype=torch.int64))
except RuntimeError as e:  # flash-attn's own ops are registered in this process
    pytest.skip(f"flash-attn's op names are taken here: {e}", allow_module_level=True)

FWD, VARLEN = torch.ops.flashattn._flash_attn_forward, torch.ops.flashattn._flash_attn_varlen_forward


class Layer(nn.Module):
    """Projections, then flash-attn's forward op as ``flash_attn_func`` calls it (B, S, H, D)."""

    def __init__(self, heads=2, kv_heads=2, causal=False, shift=0):
        super().__init__()
        self.heads, self.kv_heads, self.causal, self.shift = heads, kv_heads, causal, shift
        self.k = nn.Linear(64, 64 * kv_heads, bias=False)
        with torch.no_grad():
            self.k.weight.copy_(3 * torch.eye(64).repeat(kv_heads, 1))

    def forward(self, x, v):  # x (B, S, 64), v (B, S, H_kv, 64)
        k = self.k(x).unflatten(-1, (self.kv_heads, 64))
        q = k.roll(self.shift, dims=1).repeat_interleave(self.heads // self.kv_heads, dim=2)
        out, lse, p, rng = FWD(q, k, v, 0.0, 0.125, self.causal, -1, -1, 0.0, None, False)
        return out


class VarlenLayer(Layer):
    """The same through the varlen op, one sequence, as Wan2.1's flash_attention() calls it."""

    def forward(self, x, v, k_len):
        k = self.k(x).unflatten(-1, (self.kv_heads, 64))
        q = k.roll(self.shift, dims=1).repeat_interleave(self.heads // self.kv_heads, dim=2)
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        cu_q = torch.tensor([0, lq], dtype=torch.int32)
        cu_k = torch.cat([k_len.new_zeros(1), k_len]).cumsum(0, dtype=torch.int32)
        out = VARLEN(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, lq, lk, 0.0, 0.125, False,
                     window_size_left=-1, window_size_right=-1)[0]
        return out.unflatten(0, (b, lq))


CFG = dict(min_seq_len=64, block_m=64, alpha=0.5, max_density=1.0)


def _inputs(kv_heads=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 256, 64, generator=g), torch.randn(1, 256, kv_heads, 64, generator=g)


def _own_sparse(q, k, v, scale=0.125):
    """(B, S, H, D) -> the sparse output on the call's own profiled mask (as the site computes it)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if kt.shape[1] != qt.shape[1]:
        rep = qt.shape[1] // kt.shape[1]
        kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
    keep = predictors.profile_slices(qt, kt, alpha=0.5, block_m=64, scale=scale)
    return fgcompile.sparse_attention(qt, kt, vt, keep, block_m=64, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_flash_attn_forward_becomes_a_sparse_site(heads, kv_heads):
    """``_flash_attn_forward`` is rewritten into SDPA and served: the profiled call gives the op's
    output, the sparse calls the call's own mask's; explain shows the site."""
    torch._dynamo.reset()
    m = Layer(heads, kv_heads, shift=64).eval()
    x, v = _inputs(kv_heads)
    rep = fgcompile.explain(m, x, v, config=FGAttnConfig(**CFG))
    assert [(s.pattern, s.decision) for s in rep.sites] == [("sdpa", "sparse")], rep
    c = torch.compile(m, backend=fgcompile.backend(**CFG))
    with torch.no_grad():
        ref = m(x, v)
        k = m.k(x).unflatten(-1, (kv_heads, 64))
        q = k.roll(64, dims=1).repeat_interleave(heads // kv_heads, dim=2)
        own = _own_sparse(q, k, v)
        torch.testing.assert_close(c(x, v), ref, atol=1e-5, rtol=1e-4)  # profiled
        for _ in range(2):
            out = c(x, v)
            torch.testing.assert_close(out, own, atol=1e-5, rtol=1e-4)
            assert out.is_contiguous() and out.shape == ref.shape
    assert [(s.profiled_calls, s.sparse_calls) for s in fgcompile.stats(c).values()] == [(1, 2)]


def test_flash_attn_varlen_forward_of_one_sequence_becomes_a_sparse_site():
    """``_flash_attn_varlen_forward`` with one sequence: rewritten with the keys outside
    cu_seqlens_k masked out (here the last 56 keys), exact at the profiled call, sparse after."""
    torch._dynamo.reset()
    m = VarlenLayer(shift=64).eval()
    x, v = _inputs()
    k_len = torch.tensor([200])
    c = torch.compile(m, backend=fgcompile.backend(**CFG))
    with torch.no_grad():
        ref = m(x, v, k_len)
        k = m.k(x).unflatten(-1, (2, 64))
        q = k.roll(64, dims=1)
        # (the padded keys change the reference: a mask that ignored cu_seqlens_k fails this)
        assert rel_err(ref, _attend(q, k, v, 0.125, False)) > 0.05
        torch.testing.assert_close(c(x, v, k_len), ref, atol=1e-5, rtol=1e-4)  # profiled
        for _ in range(2):
            out = c(x, v, k_len)
            assert rel_err(out, ref) < 0.05
            torch.testing.assert_close(out, _own_sparse(q, k[:, :200], v[:, :200]), atol=1e-5, rtol=1e-4)
    st = fgcompile.stats(c)
    assert [(s.profiled_calls, s.sparse_calls) for s in st.values()] == [(1, 2)], st


def test_flash_attn_calls_outside_the_subset_stay_opaque_with_the_reason():
    """A causal call is not rewritten: it runs as it is (the op's own output) and explain lists it
    as an opaque kernel, saying why."""
    torch._dynamo.reset()

    class Causal(Layer):
        def forward(self, x, v):
            k = self.k(x).unflatten(-1, (self.kv_heads, 64))
            return _flash_plain(k, k, v, causal=True)

    m = Causal().eval()
    x, v = _inputs()
    rep = fgcompile.explain(m, x, v, config=FGAttnConfig(**CFG))
    assert rep.sites == []
    assert any(kind == "opaque" and "causal=True" in why for _, kind, why in rep.rejected), rep.rejected
    c = torch.compile(m, backend=fgcompile.backend(**CFG))
    with torch.no_grad():
        torch.testing.assert_close(c(x, v), m(x, v), atol=1e-5, rtol=1e-4)


def _flash_plain(q, k, v, causal):
    return FWD(q, k, v, 0.0, 0.125, causal, -1, -1, 0.0, None, False)[0]


def _wan_flash_attention(q, k, v, k_lens, softmax_scale=None):
    """Wan2.1's flash_attention() (wan/modules/attention.py) on its flash-attn 2 path, with the
    stand-in op: q (B, Lq, H, D) whole, keys cut to k_lens per batch item and packed."""
    b, lq, lk = q.size(0), q.size(1), k.size(1)
    q_lens = torch.tensor([lq] * b, dtype=torch.int32)
    q = q.flatten(0, 1)
    k = torch.cat([u[:n] for u, n in zip(k, k_lens)])
    v = torch.cat([u[:n] for u, n in zip(v, k_lens)])
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = VARLEN(
        q, k, v, torch.cat([q_lens.new_zeros([1]), q_lens]).cumsum(0, dtype=torch.int32),
        torch.cat([k_lens.new_zeros([1]), k_lens]).cumsum(0, dtype=torch.int32), lq, lk, 0.0, scale, False,
        window_size_left=-1, window_size_right=-1,
    )[0]
    return out.unflatten(0, (b, lq))


class WanFlashLayer(nn.Module):
    def __init__(self, shift):
        super().__init__()
        self.shift = shift
        self.k = nn.Linear(64, 128, bias=False)
        with torch.no_grad():
            self.k.weight.copy_(3 * torch.eye(64).repeat(2, 1))

    def forward(self, x, v, seq_lens):
        k = self.k(x).unflatten(-1, (2, 64))
        return _wan_flash_attention(k.roll(self.shift, dims=1), k, v, seq_lens)


def test_wan_flash_attention_path_runs_sparse_per_layer():
    """Wan2.1's flash_attention() path (keys cut by k_lens with data-dependent slicing, a graph
    break, then the varlen op in a graph without parameters): every layer is served on its own
    mask (its state from its anchor), exact at the profiled call."""
    torch._dynamo.reset()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([WanFlashLayer(s) for s in (0, 64, 128)])

        def forward(self, x, v, seq_lens):
            return [layer(x, v, seq_lens) for layer in self.layers]

    m = Net().eval()
    x, v = _inputs()
    seq_lens = torch.tensor([256], dtype=torch.int32)
    c = torch.compile(m, backend=fgcompile.backend(**CFG))
    with torch.no_grad():
        ref = m(x, v, seq_lens)
        for o, r in zip(c(x, v, seq_lens), ref):
            torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-4)
        k = m.layers[0].k(x).unflatten(-1, (2, 64))
        for _ in range(2):
            for o, layer in zip(c(x, v, seq_lens), m.layers):
                torch.testing.assert_close(o, _own_sparse(k.roll(layer.shift, dims=1), k, v), atol=1e-5, rtol=1e-4)
    counts = {n: (s.profiled_calls, s.sparse_calls) for n, s in fgcompile.stats(c).items()}
    assert sorted(counts.values()) == [(1, 2)] * 3, counts


def _get_cu_seqlens(text_mask, img_len):
    """HunyuanVideo's get_cu_seqlens (hyvideo/modules/models.py): per batch item, the video tokens
    with the prompt's real tokens, then its padding, as two sequences: 2B + 1 entries."""
    batch_size = text_mask.shape[0]
    text_len = text_mask.sum(dim=1)
    max_len = text_mask.shape[1] + img_len
    cu_seqlens = torch.zeros([2 * batch_size + 1], dtype=torch.int32, device=text_mask.device)
    for i in range(batch_size):
        s = text_len[i] + img_len
        s1 = i * max_len + s
        s2 = (i + 1) * max_len
        cu_seqlens[2 * i + 1] = s1
        cu_seqlens[2 * i + 2] = s2
    return cu_seqlens


class HunyuanFlashLayer(WanFlashLayer):
    """HunyuanVideo's double-stream attention on its default flash path (hyvideo/modules/attenion.py,
    mode "flash"): video and text tokens joined, flattened to (B * L, H, D), one varlen call with
    the cu_seqlens above, the output viewed back as (B, L, H, D). (WanFlashLayer's projection.)"""

    def forward(self, img, txt, v, text_mask):
        k = self.k(torch.cat([img, txt], dim=1)).unflatten(-1, (2, 64))
        q = k.roll(self.shift, dims=1)
        cu = _get_cu_seqlens(text_mask, img.shape[1])
        b, max_len = q.shape[0], q.shape[1]
        x = VARLEN(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, max_len, max_len, 0.0, 0.125, False)[0]
        return x.view(b, max_len, x.shape[-2], x.shape[-1])


def _hunyuan_inputs(prompt_tokens: list, seed: int) -> tuple:
    """img (B, 200, 64), txt (B, 56, 64), v (B, 256, 2, 64) and a text mask with item b's first
    ``prompt_tokens[b]`` tokens real."""
    b = len(prompt_tokens)
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(b, 200, 64, generator=g), torch.randn(b, 56, 64, generator=g)
    v = torch.randn(b, 256, 2, 64, generator=g)
    text_mask = (torch.arange(56)[None, :] < torch.tensor(prompt_tokens)[:, None]).long()
    return img, txt, v, text_mask


def test_hunyuan_video_two_sequence_varlen_is_served():
    """HunyuanVideo's flash path at batch 1: two sequences (video + the prompt's 20 real tokens, then
    its 36 padding tokens, which attend only to each other). Rewritten into two SDPA sites: the
    first sequence's keys, a key-padded site served sparse, and the second's, which runs dense at
    every call; exact at the profiled call (both row groups), the first sequence's rows sparse
    after on their own mask, the padding rows exact always."""
    torch._dynamo.reset()
    m = HunyuanFlashLayer(shift=64).eval()
    img, txt, v, text_mask = _hunyuan_inputs([20], seed=3)
    rep = fgcompile.explain(m, img, txt, v, text_mask, config=FGAttnConfig(**CFG))
    assert [(s.decision, s.mask) for s in rep.sites] == [("sparse", "key_padding")] * 2, rep
    assert "runs dense at every call" not in rep.sites[0].reason
    assert "runs dense at every call" in rep.sites[1].reason, rep.sites[1].reason
    c = torch.compile(m, backend=fgcompile.backend(**CFG))
    with torch.no_grad():
        ref = m(img, txt, v, text_mask)
        k = m.k(torch.cat([img, txt], dim=1)).unflatten(-1, (2, 64))
        q = k.roll(64, dims=1)
        # both row groups depend on the split: attention over every key differs from each
        whole = _attend(q, k, v, 0.125, False)
        assert rel_err(ref[:, :220], whole[:, :220]) > 0.05 and rel_err(ref[:, 220:], whole[:, 220:]) > 0.05
        torch.testing.assert_close(c(img, txt, v, text_mask), ref, atol=1e-5, rtol=1e-4)  # profiled
        # the first sequence's rows: the site's own mask over the first sequence's keys (profiled on
        # every query, the padding rows' blocks too), restricted to those rows
        own_rows = _own_sparse(q, k[:, :220], v[:, :220])[:, :220]
        for _ in range(2):
            out = c(img, txt, v, text_mask)
            torch.testing.assert_close(out[:, :220], own_rows, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out[:, 220:], ref[:, 220:], atol=1e-5, rtol=1e-4)
            assert out.is_contiguous() and out.shape == ref.shape
    counts = {n: (s.profiled_calls, s.sparse_calls, s.dense_calls) for n, s in fgcompile.stats(c).items()}
    assert sorted(counts.values()) == [(0, 0, 3), (1, 2, 0)], counts


def test_hunyuan_video_batch_of_two_is_served_where_the_graph_proves_the_items():
    """HunyuanVideo's flash path at batch 2 (classifier-free guidance: prompts of 20 and 3 real
    tokens): 5 cu_seqlens entries. Compiled with get_cu_seqlens in the graph, its even entries
    are the constants i * max_len: each item's two sequences lie in its own rows, and the call is
    served like batch 1 (exact at the profiled call). With cu_seqlens made outside the graph (a
    block compiled alone), or an even entry that is not that constant, it stays opaque, saying why;
    so does Wan2.1's flash_attention() at batch 2 (3 entries, one sequence per item: not the
    padded-item layout, max_seqlen is half the rows)."""
    torch._dynamo.reset()
    m = HunyuanFlashLayer(shift=64).eval()
    img, txt, v, text_mask = _hunyuan_inputs([20, 3], seed=5)
    rep = fgcompile.explain(m, img, txt, v, text_mask, config=FGAttnConfig(**CFG))
    assert [(s.decision, s.mask, s.batch) for s in rep.sites] == [("sparse", "key_padding", 2)] * 2, rep
    c = torch.compile(m, backend=fgcompile.backend(**CFG))
    with torch.no_grad():
        ref = m(img, txt, v, text_mask)
        torch.testing.assert_close(c(img, txt, v, text_mask), ref, atol=1e-5, rtol=1e-4)  # profiled
        out = c(img, txt, v, text_mask)  # sparse: the first sequences' rows close, the padding rows exact
        assert rel_err(out, ref) < 0.05
        torch.testing.assert_close(out[0, 220:], ref[0, 220:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[1, 203:], ref[1, 203:], atol=1e-5, rtol=1e-4)

    class Block(HunyuanFlashLayer):  # cu_seqlens from outside the graph
        def forward(self, img, txt, v, cu):
            k = self.k(torch.cat([img, txt], dim=1)).unflatten(-1, (2, 64))
            x = VARLEN(k.roll(self.shift, dims=1).flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 256, 256,
                       0.0, 0.125, False)[0]
            return x.view(2, 256, 2, 64)

    class Misaligned(HunyuanFlashLayer):  # the second item's sequences do not start at its first row
        def forward(self, img, txt, v, text_mask):
            k = self.k(torch.cat([img, txt], dim=1)).unflatten(-1, (2, 64))
            cu = _get_cu_seqlens(text_mask, img.shape[1])
            cu[2] = text_mask.sum() + 250
            x = VARLEN(k.roll(self.shift, dims=1).flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 256, 256,
                       0.0, 0.125, False)[0]
            return x.view(2, 256, 2, 64)

    class ThroughAView(HunyuanFlashLayer):  # the right value, written through a view
        def forward(self, img, txt, v, text_mask):
            k = self.k(torch.cat([img, txt], dim=1)).unflatten(-1, (2, 64))
            cu = _get_cu_seqlens(text_mask, img.shape[1])
            cu.view(-1)[2] = 256
            x = VARLEN(k.roll(self.shift, dims=1).flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 256, 256,
                       0.0, 0.125, False)[0]
            return x.view(2, 256, 2, 64)

    class OnePerItem(HunyuanFlashLayer):  # Wan2.1's flash_attention() at batch 2: one sequence per item
        def forward(self, img, txt, v, text_mask):
            k = self.k(torch.cat([img, txt], dim=1)).unflatten(-1, (2, 64))
            return _wan_flash_attention(k.roll(self.shift, dims=1), k, v, torch.tensor([256, 200], dtype=torch.int32))

    cu = torch.tensor([0, 220, 256, 459, 512], dtype=torch.int32)
    for model, args, why in ((OnePerItem(64), (img, txt, v, text_mask), "max_seqlen_q 256 is not the item's 512 / 1"),
                             (Block(64), (img, txt, v, cu), "not made by torch.zeros in this graph"),
                             (Misaligned(64), (img, txt, v, text_mask), "cu_seqlens[2] is not the constant 256"),
                             (ThroughAView(64), (img, txt, v, text_mask), "in a way the pass does not follow")):
        torch._dynamo.reset()
        rep = fgcompile.explain(model.eval(), *args, config=FGAttnConfig(**CFG))
        assert rep.sites == [], rep
        assert any(kind == "opaque" and why in w for _, kind, w in rep.rejected), rep.rejected


def _bump(cu):  # moves item 1's start from 128 to 135 (a valid layout, no longer the constants)
    cu[2] = cu[2] + 7
    cu[3] = cu[3] + 7
    return cu.sum()


@torch.compiler.allow_in_graph
def _bump_whole(cu):
    cu.add_(torch.tensor([0, 0, 7, 7, 0], dtype=cu.dtype))
    return cu.sum()


@pytest.mark.parametrize("how", ["checkpoint", "cond", "allow_in_graph", "bfloat16"])
def test_batch_of_two_stays_opaque_where_cu_seqlens_is_written_out_of_sight(how):
    """The proof of item-aligned sequences (batch 2, L = 128) sees writes into cu_seqlens made
    inside a higher-order op (checkpoint, cond) or a function kept whole (allow_in_graph), and
    reads the values a non-integer cu_seqlens would store (bfloat16: 257 is stored as 256): each
    call stays opaque, and the compiled output is eager's. (An adversarial probe's finds.)"""
    import torch.utils.checkpoint as ckpt

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(1))

        def forward(self, q, k, v, lens):
            dtype, length = (torch.bfloat16, 257) if how == "bfloat16" else (torch.int32, 128)
            cu = torch.zeros(5, dtype=dtype)
            cu[1] = lens[0]
            cu[2] = length
            cu[3] = length + lens[1]
            cu[4] = 2 * length
            extra = 0
            if how == "checkpoint":
                extra = ckpt.checkpoint(_bump, cu, use_reentrant=False)
            elif how == "cond":
                extra = torch.cond(lens[0] > 0, _bump, _bump, (cu,))
            elif how == "allow_in_graph":
                extra = _bump_whole(cu)
            out = VARLEN(q * self.s, k, v, cu, cu, length, length, 0.0, 0.125, False)[0]
            return out + 0 * extra

    torch._dynamo.reset()
    rows = 514 if how == "bfloat16" else 256
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(rows, 2, 64, generator=g) for _ in range(3))
    lens = torch.tensor([88, 38])
    m = M().eval()
    rep = fgcompile.explain(m, q, k, v, lens, config=FGAttnConfig(**CFG))
    assert rep.sites == [], rep
    why = "dtype torch.bfloat16" if how == "bfloat16" else "in a way the pass does not follow"
    assert any(kind == "opaque" and why in w for _, kind, w in rep.rejected), rep.rejected
    torch._dynamo.reset()
    with torch.no_grad():
        ref = m(q, k, v, lens)
        out = torch.compile(m, backend=fgcompile.backend(**CFG))(q, k, v, lens)
    inside = 512 if how == "bfloat16" else 256  # rows in a sequence (bfloat16: the stored bounds)
    torch.testing.assert_close(out[:inside], ref[:inside], atol=1e-5, rtol=1e-4)


# flash_attn_func's path (flash_attn/flash_attn_interface.py): an autograd.Function whose forward
# calls the op, saves tensors when grad is on, and slices the output's padded head dim
class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_softmax, is_grad_enabled):
        is_grad = is_grad_enabled and any(x.requires_grad for x in [q, k, v])
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** (-0.5)
        head_size_og = q.size(3)
        out_padded, softmax_lse, S_dmask, rng_state = FWD(q, k, v, dropout_p, softmax_scale, causal=causal,
            window_size_left=window_size[0], window_size_right=window_size[1], softcap=softcap,
            alibi_slopes=alibi_slopes, return_softmax=return_softmax and dropout_p > 0)
        if is_grad:
            ctx.save_for_backward(q, k, v, out_padded, softmax_lse, rng_state)
        out = out_padded[..., :head_size_og]
        return out if not return_softmax else (out, softmax_lse, S_dmask)
    @staticmethod
    def backward(ctx, dout, *args):
        raise NotImplementedError
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    return FlashAttnFunc.apply(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, torch.is_grad_enabled())
class FuncLayer(nn.Module):
    def __init__(self):
        super().__init__(); self.k = nn.Linear(64, 128, bias=False)
        with torch.no_grad(): self.k.weight.copy_(3 * torch.eye(64).repeat(2, 1))
    def forward(self, x, v):
        k = self.k(x).unflatten(-1, (2, 64))
        return flash_attn_func(k.roll(64, dims=1), k, v)


def test_flash_attn_func_autograd_function_path_is_served():
    """Through flash_attn_func's autograd.Function (under no_grad Dynamo traces its forward), the op
    is rewritten and served like the direct call."""
    torch._dynamo.reset()
    m = FuncLayer().eval()
    x, v = _inputs()
    rep = fgcompile.explain(m, x, v, config=FGAttnConfig(**CFG))
    assert [(s.pattern, s.decision) for s in rep.sites] == [("sdpa", "sparse")] and not rep.rejected, rep
    c = torch.compile(m, backend=fgcompile.backend(**CFG))
    with torch.no_grad():
        ref = m(x, v)
        k = m.k(x).unflatten(-1, (2, 64))
        torch.testing.assert_close(c(x, v), ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c(x, v), _own_sparse(k.roll(64, dims=1), k, v), atol=1e-5, rtol=1e-4)
