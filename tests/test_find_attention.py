"""The attention detection pass, the rewrite, ``fgcompile.explain`` and the fgcompile log, on
hand-written toy modules covering every pattern and every negative case.

Most tests capture a module with Dynamo through a backend that runs fgcompile's passes
(``fgcompile.dynamo_backend.transform``) and returns the REWRITTEN graph uncompiled: the rewritten graph
then runs fgcompile's op on its dense path (``predictor="dense"``), which must match eager, with no
Inductor compile. ``fullgraph=True`` everywhere: no graph breaks.
"""

import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fgcompile
from fgcompile import FGAttnConfig
from fgcompile.dynamo_backend import backend as fgattn_backend
from fgcompile.dynamo_backend import transform
from fgcompile.passes.find_attention import SiteInfo, find_attention_sites, site_name
from fgcompile.passes.rewrite import rewrite_site, rewrite_sites  # registers the op

os.environ["FGCOMPILE_STRICT"] = "1"

CFG = FGAttnConfig(predictor="dense", min_seq_len=64)
OP = torch.ops.fgcompile.site_attention.default
B, H, S, D = 2, 2, 64, 64


def capture(fn, *args, config=CFG, dynamic=False, run_twice=None):
    """Capture ``fn`` with Dynamo, run the passes, run the rewritten (uncompiled) graph."""
    sites, graphs = [], []

    def be(gm, example_inputs):
        r = transform(gm, example_inputs, config)
        sites.extend(r.sites)
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        c = torch.compile(fn, backend=be, fullgraph=True, dynamic=dynamic)
        out = c(*args)
        out2 = c(*run_twice) if run_twice is not None else None
    return SimpleNamespace(sites=sites, graphs=graphs, out=out, out2=out2)


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def qkv(shape=(B, H, S, D), dtype=torch.float32):
    return rand(*shape, dtype=dtype, seed=1), rand(*shape, dtype=dtype, seed=2), rand(*shape, dtype=dtype, seed=3)


def key_keep(b=B, s=S, seed=4):
    keep = torch.rand(b, s, generator=torch.Generator().manual_seed(seed)) > 0.3
    keep[:, 0] = True
    return keep


def ops(graph):
    return [n for n in graph.graph.nodes if n.target is OP]


def left(graph):
    """Attention nodes left in a rewritten graph (dense sites)."""
    return [
        n
        for n in graph.graph.nodes
        if n.op in ("call_function", "call_method")
        and ("softmax" in str(n.target) or "scaled_dot_product" in str(n.target))
    ]


class Fn(nn.Module):
    """A module whose forward is a plain function (module path: the test module itself)."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, *a):
        return self.f(*a)


def check(fn, args, expect, config=CFG, atol=1e-5, dtype_tol=None):
    """Capture, compare with eager, check the sites: ``expect`` is a list of
    (pattern, decision, mask, reason fragment)."""
    ref = fn(*args) if not isinstance(fn, nn.Module) else fn(*args)
    r = capture(fn, *args, config=config)
    got = [(s.pattern, s.decision, s.mask) for s in r.sites]
    assert got == [e[:3] for e in expect], [(s.pattern, s.decision, s.mask, s.reason) for s in r.sites]
    for s, e in zip(r.sites, expect):
        assert e[3] in s.reason, s.reason
        assert s.reason
    n_sparse = sum(e[1] == "sparse" for e in expect)
    g = r.graphs[0]
    assert len(ops(g)) == n_sparse
    assert len(left(g)) == len(expect) - n_sparse
    tol = dtype_tol or {}
    torch.testing.assert_close(r.out, ref, atol=tol.get("atol", atol), rtol=tol.get("rtol", 1e-4))
    return r


SPARSE = ("sparse", "none", "self-attention")


# ============================================================================ SDPA
def sdpa_pos(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_kw(q, k, v):
    return F.scaled_dot_product_attention(
        query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=0.1, enable_gqa=False
    )


def sdpa_c(q, k, v):
    return torch._C._nn.scaled_dot_product_attention(q, k, v, None, 0.0, False, scale=0.2)


def sdpa_layout(x, w):
    # (B, S, 3 * H * D) -> q, k, v by view + permute, the output back to (B, S, H * D)
    b, s, _ = x.shape
    q, k, v = (x @ w).view(b, s, 3, H, D).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).reshape(b, s, H * D)


@pytest.mark.parametrize(
    "fn,args,expect",
    [
        (sdpa_pos, qkv(), [("sdpa",) + SPARSE]),
        (sdpa_kw, qkv(), [("sdpa",) + SPARSE]),
        (sdpa_c, qkv(), [("sdpa",) + SPARSE]),
        (sdpa_pos, qkv((B * H, S, D)), [("sdpa",) + SPARSE]),  # 3-D (N, S, D)
        (sdpa_layout, (rand(B, S, 128), rand(128, 3 * H * D) / 8), [("sdpa",) + SPARSE]),
        (sdpa_pos, qkv((B, H, S, 96)), [("sdpa",) + SPARSE]),
        (sdpa_pos, qkv((B, H, S, 128)), [("sdpa",) + SPARSE]),
    ],
    ids=["positional", "keywords", "torch_C", "3d", "view_permute", "d96", "d128"],
)
def test_sdpa_sparse(fn, args, expect):
    r = check(fn, args, expect)
    s = r.sites[0]
    if fn is sdpa_kw:
        assert s.scale == 0.1
    if fn is sdpa_c:
        assert s.scale == 0.2
    if fn is sdpa_layout:
        assert (s.batch, s.num_heads, s.seq_len_q, s.head_dim) == (B, H, S, D)
    elif args[0].dim() == 3:
        assert (s.batch, s.num_heads, s.num_kv_heads) == (1, B * H, B * H)
    else:
        assert (s.batch, s.num_heads, s.num_kv_heads, s.seq_len_q, s.seq_len_kv) == (B, H, H, S, S)


def test_sdpa_gqa():
    q = rand(B, 4, S, D, seed=1)
    k, v = rand(B, 2, S, D, seed=2), rand(B, 2, S, D, seed=3)
    r = check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), (q, k, v),
              [("sdpa", "sparse", "none", "GQA 4/2")])
    assert (r.sites[0].num_heads, r.sites[0].num_kv_heads) == (4, 2)


def test_sdpa_site_info_fields():
    r = check(sdpa_pos, qkv(dtype=torch.bfloat16), [("sdpa",) + SPARSE], atol=2e-2, dtype_tol={"atol": 2e-2, "rtol": 2e-2})
    s = r.sites[0]
    assert isinstance(s, SiteInfo)
    assert (s.name, s.dtype, s.device, s.head_dim, s.is_causal, s.mask) == ("attention", "bfloat16", "cpu", 64, False, "none")
    assert s.scale == pytest.approx(1 / 8)


def test_sdpa_fp16():
    check(sdpa_pos, qkv(dtype=torch.float16), [("sdpa",) + SPARSE], dtype_tol={"atol": 2e-3, "rtol": 2e-3})


def test_sdpa_key_padding_mask():
    q, k, v = qkv()
    keep = key_keep()

    def f(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])

    r = check(f, (q, k, v, keep), [("sdpa", "sparse", "key_padding", "key-padding mask folded")])
    # the mask matters: the result differs from unmasked attention
    assert not torch.allclose(r.out, F.scaled_dot_product_attention(q, k, v), atol=1e-3)


def test_sdpa_key_padding_3d_per_sequence():
    # (N, S, D) with a mask varying over N: served as (N, 1, S, D)
    q, k, v = qkv((B * H, S, D))
    keep = key_keep(B * H)
    r = check(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, :]), (q, k, v, keep),
              [("sdpa", "sparse", "key_padding", "key-padding")])
    assert (r.sites[0].batch, r.sites[0].num_heads) == (B * H, 1)


def _pad_and_pad_hunyuan15(q, k, v, pad):  # transformer_hunyuan_video15.py: m1 & m1.transpose(2, 3)
    b, s = pad.shape
    m1 = pad.view(b, 1, 1, s).repeat(1, 1, s, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(m1 & m1.transpose(2, 3)).bool())


def _pad_and_pad_broadcast(q, k, v, pad):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, :, None] & pad[:, None, None, :])


def _key_pad_repeated(q, k, v, pad):  # a key-padding mask materialised over the queries
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :].expand(-1, 1, pad.shape[1], -1))


@pytest.mark.parametrize("fn", [_pad_and_pad_hunyuan15, _pad_and_pad_broadcast, _key_pad_repeated],
                         ids=["hunyuan15", "broadcast", "key_pad_repeated"])
def test_sdpa_padding_of_keys_and_queries_is_key_padding(fn):
    """A mask that pads the same tokens as keys and as queries (HunyuanVideo-1.5's joint
    attention) is a key-padding mask whose padded query rows are 0, as eager SDPA gives for a row
    that keeps no key: ``check`` compares the rewritten graph with eager, padded rows included."""
    q, k, v = qkv()
    pad = key_keep()
    r = check(fn, (q, k, v, pad), [("sdpa", "sparse", "key_padding", "key-padding mask folded")])
    if fn is not _key_pad_repeated:
        assert torch.all(r.out[~pad[:, None, :, None].expand_as(r.out)] == 0)


def test_hand_written_padding_of_keys_and_queries_stays_dense():
    """Hand-written attention gives NaN (or the mean of v) for a query row whose mask keeps no
    key, not SDPA's 0: a mask padding queries too stays dense there."""
    q, k, v = qkv()
    pad = key_keep()

    def f(q, k, v, pad):
        s = (q @ k.transpose(-2, -1) * 0.125).masked_fill(~(pad[:, None, :, None] & pad[:, None, None, :]), -1e4)
        return s.softmax(-1) @ v

    check(f, (q, k, v, pad), [("matmul_softmax", "dense", "other", "is not a key-padding mask")])


def test_sdpa_padding_and_another_mask_stays_dense():
    """Key padding ANDed with a mask that varies over both queries and keys (causal) is not
    padding: dense, with the reason."""
    q, k, v = qkv()
    pad = key_keep()
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    f = lambda q, k, v, pad, c: F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :] & c)  # noqa: E731
    check(f, (q, k, v, pad, causal), [("sdpa", "dense", "other", "is not a key-padding mask")])


def test_sdpa_key_padding_broadcast_batch():
    q, k, v = qkv()
    keep = key_keep(1)
    check(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), (q, k, v, keep),
          [("sdpa", "sparse", "key_padding", "key-padding")])  # (1, S): broadcast over batch and heads


# a key mask written as a bias the graph builds from a boolean mask: values provably 0 or very negative
def sdpa_bias_filled_zeros(q, k, v, keep):
    bias = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])


def sdpa_bias_where(q, k, v, keep):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(keep, 0.0, float("-inf"))[:, None, None, :])


def sdpa_bias_one_minus(q, k, v, keep):  # Hugging Face / diffusers: (1 - mask) * -10000
    return F.scaled_dot_product_attention(q, k, v, attn_mask=((1 - keep.to(q.dtype)) * -10000.0)[:, None, None, :])


def sdpa_bias_of_two_masks(q, k, v, keep):  # an & in the graph is no write into its operands
    gate = (keep & keep.roll(1, -1)).any(-1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=((1.0 - keep.float()) * -1e9)[:, None, None, :])
    return out * gate[:, None, None, None]


def mm_bias_added(q, k, v, keep):
    bias = ((1.0 - keep.float()) * -1e9)[:, None, None, :]
    return ((q @ k.transpose(-2, -1)) * 0.125 + bias).softmax(-1) @ v


def mm_bias_baddbmm(q, k, v, keep):  # diffusers' AttnProcessor: prepare_attention_mask, then baddbmm
    b, h, s, d = q.shape
    bias = ((1 - keep.to(q.dtype)) * -10000.0)[:, None, :].repeat_interleave(h, dim=0)  # (B * H, 1, S)
    q3, k3, v3 = (t.reshape(b * h, s, d) for t in (q, k, v))
    p = torch.baddbmm(bias, q3, k3.transpose(-1, -2), beta=1, alpha=0.125).softmax(-1)
    return torch.bmm(p, v3).view(b, h, s, d)


@pytest.mark.parametrize("fn,pattern", [
    (sdpa_bias_filled_zeros, "sdpa"), (sdpa_bias_where, "sdpa"), (sdpa_bias_one_minus, "sdpa"),
    (mm_bias_added, "matmul_softmax"), (mm_bias_baddbmm, "matmul_softmax"), (sdpa_bias_of_two_masks, "sdpa"),
], ids=["zeros_masked_fill", "where", "one_minus_times", "hand_written_add", "baddbmm_input", "two_masks_and"])
def test_key_mask_written_as_a_bias_is_key_padding(fn, pattern):
    """A float mask the graph builds from a boolean one, provably 0 or very negative, is the key
    mask (read as bias > c / 2), not a "float additive mask"."""
    q, k, v = qkv()
    keep = key_keep()
    r = check(fn, (q, k, v, keep), [(pattern, "sparse", "key_padding", "key-padding mask folded")])
    assert not torch.allclose(r.out, sdpa_pos(q, k, v), atol=1e-3)  # the mask is applied


def mm_bias_added_1e4(q, k, v, keep):
    bias = ((1.0 - keep.float()) * -1e4)[:, None, None, :]
    return ((q @ k.transpose(-2, -1)) * 0.125 + bias).softmax(-1) @ v


@pytest.mark.parametrize("fn", [sdpa_bias_one_minus, mm_bias_added_1e4, mm_bias_baddbmm],
                         ids=["sdpa_bias", "hand_written_bias", "baddbmm_bias"])
def test_every_key_masked_by_a_finite_bias_is_softmax_over_all_keys(fn):
    """A batch item whose every key gets the same finite bias (-1e4): softmax over all keys (one
    shift for all; eager to float32 rounding of s - 1e4); the site keeps every key of that item
    instead of giving 0."""
    q, k, v = qkv()
    keep = key_keep()
    keep[1] = False
    r = check(fn, (q, k, v, keep), [(("sdpa" if fn is sdpa_bias_one_minus else "matmul_softmax"), "sparse",
                                     "key_padding", "key-padding mask folded")], atol=1e-3)
    torch.testing.assert_close(r.out[1], sdpa_pos(q, k, v)[1], atol=1e-3, rtol=1e-3)


def mm_fill_finite(q, k, v, keep):
    return (q @ k.transpose(-2, -1) * 0.125).masked_fill(~keep[:, None, None, :], -1e4).softmax(-1) @ v


def mm_where_finite(q, k, v, keep):
    return torch.where(keep[:, None, None, :], q @ k.transpose(-2, -1) * 0.125, -30000.0).softmax(-1) @ v


def mm_fill_finite_mqa(q, k, v, keep):  # one key/value head for every query head
    s = torch.einsum("bhid,bjd->bhij", q, k[:, 0]) * 0.125
    s = s.masked_fill(~keep[:, None, None, :], -1e4)
    return torch.einsum("bhij,bjd->bhid", s.softmax(-1), v[:, 0])


def mm_vanilla_bias_finite(q, k, v, keep):  # torch's SDPA reference with a finite (fp16-safe) fill
    bias = torch.zeros(q.shape[0], 1, q.shape[2], k.shape[2], dtype=q.dtype)
    bias.masked_fill_(keep[:, None, None, :].logical_not(), -1e4)
    a = (q @ k.transpose(-2, -1)) * 0.125
    a += bias
    return a.softmax(-1) @ v


@pytest.mark.parametrize("fn,empty", [
    (mm_fill_finite, "uniform"), (mm_where_finite, "uniform"), (mm_fill_finite_mqa, "uniform"),
    (mm_vanilla_bias_finite, "all"),
], ids=["masked_fill", "where", "masked_fill_mqa", "zero_bias_masked_fill_"])
def test_every_key_masked_by_a_finite_fill(fn, empty):
    """A batch item whose mask drops every key: a finite fill replaces every score by one number,
    so eager's weights are uniform (the mean of v); a finite number written into a zero bias
    shifts every score alike (softmax over all keys). The site gives what eager gives, not 0."""
    q, k, v = qkv()
    keep = key_keep()
    keep[1] = False
    r = check(fn, (q, k, v, keep), [("matmul_softmax", "sparse", "key_padding", "key-padding mask folded")],
              atol=1e-3)
    if empty == "uniform":
        vv = v[:, :1] if fn is mm_fill_finite_mqa else v
        torch.testing.assert_close(r.out[1], vv[1].mean(-2, keepdim=True).expand_as(r.out[1]))
    else:
        torch.testing.assert_close(r.out[1], sdpa_pos(q, k, v)[1], atol=1e-3, rtol=1e-3)
    assert r.out[0].abs().sum() > 0


FMIN = torch.finfo(torch.float32).min


def mm_bias_finfo_min(q, k, v, keep):  # Hugging Face's extended attention mask
    return ((q @ k.transpose(-2, -1)) * 0.125 + (1.0 - keep.float())[:, None, None, :] * FMIN).softmax(-1) @ v


def mm_bias_1e9(q, k, v, keep):
    return ((q @ k.transpose(-2, -1)) * 0.125 + ((1.0 - keep.float()) * -1e9)[:, None, None, :]).softmax(-1) @ v


def sdpa_bias_finfo_min(q, k, v, keep):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(keep, 0.0, FMIN)[:, None, None, :])


def mm_vanilla_bias_finfo_min(q, k, v, keep):
    bias = torch.zeros(q.shape[0], 1, q.shape[2], k.shape[2], dtype=q.dtype)
    bias.masked_fill_(keep[:, None, None, :].logical_not(), FMIN)
    a = (q @ k.transpose(-2, -1)) * 0.125
    a += bias
    return a.softmax(-1) @ v


def mm_bias_full_square(q, k, v, keep):  # a (B, 1, S, S) zero bias filled out of place
    bias = torch.zeros(q.shape[0], 1, q.shape[2], k.shape[2]).masked_fill(~keep[:, None, None, :], float("-inf"))
    return ((q @ k.transpose(-2, -1)) * 0.125 + bias).softmax(-1) @ v


def bmm_mask_expanded_3d(q, k, v, keep):  # heads folded into the batch, the mask expanded over the queries
    b, h, s, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, s, d) for t in (q, k, v))
    m = keep.repeat_interleave(h, 0)[:, None, :].expand(-1, s, -1)  # (B * H, S, S)
    p = torch.bmm(q3, k3.transpose(1, 2)).mul(0.125).masked_fill(~m, float("-inf")).softmax(-1)
    return torch.bmm(p, v3).view(b, h, s, d)


def baddbmm_bias_square(q, k, v, keep):  # diffusers' baddbmm with the bias materialised (B * H, S, S)
    b, h, s, d = q.shape
    bias = ((1 - keep.to(q.dtype)) * -10000.0)[:, None, :].expand(-1, s, -1).repeat_interleave(h, dim=0)
    q3, k3, v3 = (t.reshape(b * h, s, d) for t in (q, k, v))
    p = torch.baddbmm(bias, q3, k3.transpose(-1, -2), beta=1, alpha=0.125).softmax(-1)
    return torch.bmm(p, v3).view(b, h, s, d)


def sdpa_full_true_and_keep(q, k, v, keep):  # a bool constant of the scores' shape, & the key mask
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.full((q.shape[0], 1, q.shape[2], k.shape[2]), True) & keep[:, None, None, :])


def sdpa_hf_extended_mask(q, k, v, keep):  # transformers' _prepare_4d_attention_mask, from a bool mask
    b, _, s, _ = q.shape
    expanded = keep[:, None, None, :].expand(b, 1, s, keep.shape[-1]).to(q.dtype)
    inverted = 1.0 - expanded
    bias = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@pytest.mark.parametrize("fn,pattern", [
    (mm_bias_full_square, "matmul_softmax"), (bmm_mask_expanded_3d, "matmul_softmax"),
    (baddbmm_bias_square, "matmul_softmax"), (sdpa_hf_extended_mask, "sdpa"), (sdpa_full_true_and_keep, "sdpa"),
], ids=["zero_bias_square", "bmm_mask_3d", "baddbmm_bias_square", "sdpa_hf_extended", "full_true_and_keep"])
def test_key_mask_materialised_over_the_queries(fn, pattern):
    """A key mask (or a bias built from one) expanded, repeated or filled into a full (S_q, S_kv)
    tensor holds the same row for every query: a key-padding site, whatever elementwise steps
    follow the expansion."""
    q, k, v = qkv()
    keep = key_keep()
    r = check(fn, (q, k, v, keep), [(pattern, "sparse", "key_padding", "key-padding mask folded")], atol=1e-4)
    assert not torch.allclose(r.out, sdpa_pos(q, k, v), atol=1e-3)  # the mask is applied


def test_mask_written_after_its_repeat_is_not_trusted():
    """A key mask repeated over the queries (or heads), then written into, no longer holds one
    row for every query: the site is not key padding, and its output is eager's."""
    q, k, v = qkv()
    keep = key_keep()

    def over_queries(q, k, v, keep):
        m = keep[:, None, None, :].repeat(1, 1, S, 1)
        m[:, :, :8, 3] = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    def over_heads(q, k, v, keep):
        m = keep[:, None, None, :].repeat(1, H, 1, 1)
        m[:, 1, :, 5] = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    for fn in (over_queries, over_heads):
        r = capture(fn, q, k, v, keep, config=CFG)
        assert [s.decision for s in r.sites] in ([], ["dense"]), [(s.decision, s.reason) for s in r.sites]
        torch.testing.assert_close(r.out, fn(q, k, v, keep))


def _dunder_and_causal(q, k, v, keep):  # m &= causal, called as the method Dynamo records
    m = keep[:, None, None, :].expand(q.shape[0], 1, S, S).clone()
    m.__iand__(torch.ones(S, S, dtype=torch.bool).tril())
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def _dunder_scaled_bias(q, k, v, keep):  # a {0, -1e4} bias scaled to {0, -10} in place
    b = (1.0 - keep[:, None, None, :].float()) * -10000.0
    b.__imul__(0.001)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=b)


def _dunder_write_into_k(q, k, v, keep):  # k written between the scores and the output
    k2 = k.clone()
    s = (q @ k2.transpose(-1, -2)) * 0.125
    k2.__imul__(3.0)
    return torch.softmax(s.masked_fill(~keep[:, None, None, :], float("-inf")), -1) @ (v + k2)


def _nonzero_mask_written(q, k, v, keep):  # x.masked_fill(x.bool(), c) with the mask written first
    x = (~keep[:, None, None, :]).float() * 0.5
    nz = x.bool()
    nz[..., :8] = False  # some 0.5 entries survive the fill
    return F.scaled_dot_product_attention(q, k, v, attn_mask=x.masked_fill(nz, -1e9))


def _rounded_to_minus_one(q, k, v, keep):  # (0.5 + 2**24) - 2**24 is 0 in float32: g is -1, not 0
    g = ((torch.ones(q.shape[0], 1, 1, S) * 0.5 + 2.0 ** 24) - 2.0 ** 24) * 2.0 - 1.0
    b = torch.where(keep[:, None, None, :], torch.where(keep.roll(7, 1)[:, None, None, :], g, 0.0), -1e9)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=b)


@pytest.mark.parametrize("fn", [_dunder_and_causal, _dunder_scaled_bias, _dunder_write_into_k, _nonzero_mask_written,
                                _rounded_to_minus_one],
                         ids=["iand_method", "imul_method_bias", "imul_method_k", "nonzero_mask_written", "rounding"])
def test_mask_proofs_see_writes_and_rounding(fn):
    """In-place ops called as methods (``m.__iand__(x)``), a write into the mask that
    ``x.masked_fill(x.bool(), c)`` reads, and float rounding of a bias's values all change what
    the mask holds: no key-padding site is taken on the unwritten, unrounded values, and the
    output is eager's."""
    q, k, v = qkv()
    keep = key_keep()
    r = capture(fn, q, k, v, keep, config=CFG)
    assert all(s.decision == "dense" for s in r.sites), [(s.decision, s.reason) for s in r.sites]
    torch.testing.assert_close(r.out, fn(q, k, v, keep))


def test_mask_that_varies_over_the_queries_stays_dense():
    """An elementwise step between a key mask and one that varies over the queries (causal) keeps
    the site dense."""
    q, k, v = qkv()
    keep = key_keep()
    causal = torch.ones(S, S, dtype=torch.bool).tril()

    def f(q, k, v, keep, causal):
        bias = torch.zeros(q.shape[0], 1, S, S).masked_fill(~keep[:, None, None, :], float("-inf"))
        bias = bias.masked_fill(~causal, float("-inf"))
        return ((q @ k.transpose(-2, -1)) * 0.125 + bias).softmax(-1) @ v

    check(f, (q, k, v, keep, causal), [("matmul_softmax", "dense", "other", "is not a key-padding mask")])


@pytest.mark.parametrize("fn", [mm_bias_finfo_min, mm_bias_1e9, sdpa_bias_finfo_min, mm_vanilla_bias_finfo_min,
                                sdpa_hf_extended_mask],
                         ids=["finfo_min", "minus_1e9", "sdpa_finfo_min", "zero_bias_finfo_min", "sdpa_hf_extended"])
def test_every_key_masked_by_a_bias_the_scores_round_onto_is_uniform(fn):
    """A bias so large that ``scores + c`` rounds every score onto ``c`` (float32 numbers near
    finfo.min or -1e9 are at least 64 apart) ties the scores of a batch item whose every key it
    masks: eager's weights are uniform (the mean of v), and so are the site's."""
    q, k, v = qkv()
    keep = key_keep()
    keep[1] = False
    pattern = "sdpa" if fn in (sdpa_bias_finfo_min, sdpa_hf_extended_mask) else "matmul_softmax"
    r = check(fn, (q, k, v, keep), [(pattern, "sparse", "key_padding", "key-padding mask folded")], atol=1e-4)
    torch.testing.assert_close(r.out[1], v[1].mean(-2, keepdim=True).expand_as(r.out[1]))


def test_minus_10000_bias_in_bfloat16_is_a_key_mask():
    """diffusers' ``(1 - mask) * -10000.0`` holds -9984 in bfloat16: still a key mask."""
    q, k, v = qkv(dtype=torch.bfloat16)
    keep = key_keep()
    check(sdpa_bias_one_minus, (q, k, v, keep), [("sdpa", "sparse", "key_padding", "key-padding mask folded")],
          dtype_tol={"atol": 2e-2, "rtol": 2e-2})


@torch.compiler.allow_in_graph
def _raise_first_keys(bias):
    bias[:, :3] = 2.0


def test_bias_of_unknown_or_moderate_values_stays_dense():
    q, k, v = qkv()
    keep = key_keep()
    moderate = lambda q, k, v, keep: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=((1 - keep.to(q.dtype)) * -100.0)[:, None, None, :])
    check(moderate, (q, k, v, keep), [("sdpa", "dense", "other", "float additive mask of 0 / -100")])
    three = lambda q, k, v, keep: F.scaled_dot_product_attention(  # noqa: E731  (values 0, -1e4, +1e4)
        q, k, v, attn_mask=((1 - 2 * keep.to(q.dtype)) * 10000.0 + keep.to(q.dtype) * 0)[:, None, None, :])
    check(three, (q, k, v, keep), [("sdpa", "dense", "other", "float additive mask")])
    def written(q, k, v, keep):  # built from a bool mask, then written into: its values are not the proof's
        bias = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))
        bias[:, :3] = 2.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])

    check(written, (q, k, v, keep), [("sdpa", "dense", "other", "float additive mask")])

    def written_out_of_sight(q, k, v, keep):  # written inside a function kept whole in the graph
        bias = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))
        _raise_first_keys(bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])

    check(written_out_of_sight, (q, k, v, keep), [("sdpa", "dense", "other", "float additive mask")])
    overflow = lambda q, k, v, keep: F.scaled_dot_product_attention(  # noqa: E731  (-1e9 is -inf in fp16)
        q, k, v, attn_mask=((1 - keep.half()) * -1e9)[:, None, None, :].float())
    check(overflow, (q, k, v, keep), [("sdpa", "dense", "other", "float additive mask")])
    wrap = lambda q, k, v, keep: F.scaled_dot_product_attention(  # noqa: E731  (int64 wraps around)
        q, k, v, attn_mask=(keep.long() * (2**62 - 5) * 4).float()[:, None, None, :] * -1e4)
    check(wrap, (q, k, v, keep), [("sdpa", "dense", "other", "float additive mask")])
    reinterpreted = lambda q, k, v, keep: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=((1 - keep.float()) * -1e4).view(torch.int32).view(torch.float32)[:, None, None, :])
    check(reinterpreted, (q, k, v, keep), [("sdpa", "dense", "other", "float additive mask")])
    given = lambda q, k, v, bias: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # noqa: E731
    bias = ((1 - keep.float()) * -10000.0)[:, None, None, :]  # built outside the graph: values unknown
    check(given, (q, k, v, bias), [("sdpa", "dense", "other", "float additive mask")])


@pytest.mark.parametrize(
    "make_mask,mask_kind,reason",
    [
        (lambda: (torch.rand(S, S) > 0.5) | torch.eye(S, dtype=torch.bool), "other",
         "attn_mask of shape (64, 64) is not a key-padding mask"),
        (lambda: (torch.rand(B, H, 1, S) > 0.5).index_fill(-1, torch.tensor([0]), True), "other",
         "attn_mask of shape (2, 2, 1, 64) is not a key-padding mask"),
        (lambda: torch.ones(B, 1, S, S, dtype=torch.bool).tril(), "other",
         "attn_mask of shape (2, 1, 64, 64) is not a key-padding mask"),
        (lambda: torch.zeros(B, 1, 1, S), "other", "float additive mask"),
    ],
    ids=["full_bool", "per_head", "causal_bool", "float"],
)
def test_sdpa_other_masks_stay_dense(make_mask, mask_kind, reason):
    q, k, v = qkv()
    m = make_mask()
    check(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), (q, k, v, m),
          [("sdpa", "dense", mask_kind, reason)])


@pytest.mark.parametrize(
    "fn,args,reason",
    [
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), qkv(),
         "is_causal=True: the kernels serve non-causal attention"),
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.0 + 0.25) * 0 + 1, qkv(), "dropout_p=0.25"),
        (sdpa_pos, qkv((B, H, S, 32)), "head_dim 32 not in (64, 96, 128)"),
        (sdpa_pos, qkv(dtype=torch.float64), "dtype float64 not in"),
        (sdpa_pos, (rand(B, H, S, D), rand(B, H, 16, D), rand(B, H, 16, D)),
         "seq_len_kv 16 < min_seq_len 64 (cross or short attention)"),
        (sdpa_pos, (rand(B, H, 32, D), rand(B, H, S, D), rand(B, H, S, D)), "seq_len_q 32 < min_seq_len 64"),
        (sdpa_pos, (rand(B, H, S, D), rand(B, H, S, D), rand(B, H, S, 32)), "value head dim 32 != head_dim 64"),
    ],
    ids=["causal", "dropout", "d32", "float64", "cross", "short_q", "dv"],
)
def test_sdpa_dense_decisions(fn, args, reason):
    check(fn, args, [("sdpa", "dense", "none", reason)])


def test_dense_sites_and_block_n():
    q, k, v = qkv()
    keep = key_keep()
    cfg = CFG.replace(dense_sites=("attention*",))
    check(sdpa_pos, (q, k, v), [("sdpa", "dense", "none", "matches config.dense_sites")], config=cfg)
    cfg = CFG.replace(block_n=2)
    f = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, None, :])  # noqa: E731
    check(f, (q, k, v, keep), [("sdpa", "dense", "key_padding", "block_n=2")], config=cfg)
    check(sdpa_pos, (q, k, v), [("sdpa",) + SPARSE], config=cfg)  # no mask: block_n > 1 is fine


def test_predictor_dense_reason_and_profile_config():
    r = capture(sdpa_pos, *qkv(), config=CFG.replace(predictor="pooled"))
    assert r.sites[0].decision == "sparse" and "predictor" not in r.sites[0].reason
    # a function has no parameter to own a cached profile mask: dense, with the reason
    r = capture(sdpa_pos, *qkv(), config=CFG.replace(predictor="profile"))
    assert r.sites[0].decision == "dense" and "no parameter input owns this graph" in r.sites[0].reason
    r = capture(sdpa_pos, *qkv(), config=CFG)
    assert 'predictor="dense": the runtime runs it dense' in r.sites[0].reason


def test_default_min_seq_len_keeps_small_attention_dense():
    r = capture(sdpa_pos, *qkv(), config=FGAttnConfig(predictor="dense"))
    assert r.sites[0].decision == "dense"
    assert r.sites[0].reason == "seq_len_q 64 < min_seq_len 4096 (cross or short attention); seq_len_kv 64 < min_seq_len 4096 (cross or short attention)"
    assert ops(r.graphs[0]) == []


# ============================================================================ hand-written
def mm_basic(q, k, v):
    s = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)
    return s.softmax(dim=-1) @ v


def mm_torch_matmul_mT_div(q, k, v):
    s = torch.matmul(q, k.mT) / math.sqrt(q.shape[-1])
    return torch.matmul(F.softmax(s, dim=-1), v)


def mm_method_permute_dim3(q, k, v):
    s = q.matmul(k.permute(0, 1, 3, 2)) * 0.125
    return torch.softmax(s, dim=3).matmul(v)


def mm_bmm(q, k, v):
    s = torch.bmm(q, k.transpose(1, 2)) * 0.125
    return torch.bmm(s.softmax(-1), v)


def mm_baddbmm(q, k, v):
    empty = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype)
    s = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=0.125)
    return torch.bmm(s.softmax(dim=-1), v)


def mm_einsum(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.125
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def mm_einsum_bshd(q, k, v):  # (B, S, H, D) layout, scale on q
    s = torch.einsum("bqhd,bkhd->bhqk", q * 0.125, k)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def mm_einsum_ellipsis(q, k, v):
    s = torch.einsum("...id,...jd->...ij", q, k) / 8.0
    return torch.einsum("...ij,...jd->...id", s.softmax(-1), v)


def mm_scale_on_q_and_k(q, k, v):
    s = (q * 0.5) @ (k * 0.25).transpose(-1, -2)
    return s.softmax(-1) @ v


def mm_scale_on_kT(q, k, v):
    s = q @ (k.transpose(-1, -2) / 8)
    return s.softmax(-1) @ v


def mm_float_softmax_type_as(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.125
    return s.float().softmax(-1).type_as(v) @ v


def mm_softmax_dtype_to(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1)) * 0.125
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def mm_to_float32(q, k, v):
    s = (q @ k.transpose(-2, -1)).to(torch.float32) * 0.125
    return s.softmax(-1).to(v.dtype) @ v


def mm_mask_masked_fill(q, k, v, keep):
    s = q @ k.transpose(-2, -1) * 0.125
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v


def mm_mask_where(q, k, v, keep):
    s = q @ k.transpose(-2, -1) * 0.125
    s = torch.where(keep[:, None, None, :], s, torch.finfo(s.dtype).min)
    return s.softmax(-1) @ v


def mm_mask_additive(q, k, v, keep):  # an ALiBi-like bias: many values (a bool-derived 0 / -1e9 is a key mask)
    pos = torch.arange(q.shape[-2])
    bias = -(pos[None, :] - pos[:, None]).abs().float() * 0.1
    s = q @ k.transpose(-2, -1) * 0.125 + bias
    return s.softmax(-1) @ v


def mm_mask_full_bool(q, k, v, keep):
    causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    s = (q @ k.transpose(-2, -1) * 0.125).masked_fill(~causal, float("-inf"))
    return s.softmax(-1) @ v


def mm_gqa_broadcast(q, k, v):  # one shared key/value head, broadcast by matmul
    s = q @ k.transpose(-2, -1) * 0.125
    return s.softmax(-1) @ v


class MMDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * 0.125
        return F.dropout(s.softmax(-1), p=0.1, training=self.training) @ v + self.drop(v) * 0


def mm_tensor_sqrt_div(q, k, v):  # a scale the graph builds from a literal: folded
    s = torch.matmul(q, k.transpose(-2, -1)) / torch.sqrt(torch.tensor(q.shape[-1], dtype=torch.float32))
    return torch.softmax(s, -1) @ v


def mm_tensor_rsqrt_mul(q, k, v):
    s = (q @ k.transpose(-2, -1)) * torch.tensor(q.shape[-1]).to(q.device).rsqrt()
    return s.float().softmax(-1).to(q.dtype) @ v


def mm_einsum_mqa_headless_kv(q, k, v):  # MQA: k and v without a head dim, broadcast over q's heads
    s = torch.einsum("bhid,bjd->bhij", q, k) * 0.125
    return torch.einsum("bhij,bjd->bhid", s.softmax(-1), v)


def mm_einsum_mqa_k_first_bihd(q, k, v):  # k written first, the output in (b, i, h, d)
    s = torch.einsum("bjd,bhid->bhij", k, q) / 8
    return torch.einsum("bhij,bjd->bihd", s.softmax(-1), v)


def mm_tensor_scale_dense(q, k, v, t):  # a non-constant (tensor) scale: not served
    s = (q @ k.transpose(-2, -1)) * t
    return s.softmax(-1) @ v


@pytest.mark.parametrize(
    "fn,args,expect",
    [
        (mm_basic, qkv(), [("matmul_softmax",) + SPARSE]),
        (mm_torch_matmul_mT_div, qkv(), [("matmul_softmax",) + SPARSE]),
        (mm_method_permute_dim3, qkv(), [("matmul_softmax",) + SPARSE]),
        (mm_bmm, qkv((B * H, S, D)), [("matmul_softmax",) + SPARSE]),
        (mm_baddbmm, qkv((B * H, S, D)), [("matmul_softmax",) + SPARSE]),
        (mm_einsum, qkv(), [("matmul_softmax",) + SPARSE]),
        (mm_einsum_bshd, qkv((B, S, H, D)), [("matmul_softmax",) + SPARSE]),
        (mm_einsum_ellipsis, qkv(), [("matmul_softmax",) + SPARSE]),
        (mm_scale_on_q_and_k, qkv(), [("matmul_softmax",) + SPARSE]),
        (mm_scale_on_kT, qkv(), [("matmul_softmax",) + SPARSE]),
        (mm_float_softmax_type_as, qkv(dtype=torch.bfloat16), [("matmul_softmax",) + SPARSE]),
        (mm_softmax_dtype_to, qkv(dtype=torch.bfloat16), [("matmul_softmax",) + SPARSE]),
        (mm_to_float32, qkv(dtype=torch.bfloat16), [("matmul_softmax",) + SPARSE]),
        (mm_gqa_broadcast, (rand(B, H, S, D), rand(B, 1, S, D), rand(B, 1, S, D)),
         [("matmul_softmax", "sparse", "none", "GQA 2/1")]),
        (mm_basic, qkv((S, D)), [("matmul_softmax",) + SPARSE]),  # 2-D
        (mm_tensor_sqrt_div, qkv(), [("matmul_softmax",) + SPARSE]),
        (mm_tensor_rsqrt_mul, qkv(dtype=torch.bfloat16), [("matmul_softmax",) + SPARSE]),
        (mm_einsum_mqa_headless_kv, (rand(B, H, S, D), rand(B, S, D, seed=5), rand(B, S, D, seed=6)),
         [("matmul_softmax", "sparse", "none", "GQA 2/1")]),
        (mm_einsum_mqa_k_first_bihd, (rand(B, H, S, D), rand(B, S, D, seed=5), rand(B, S, D, seed=6)),
         [("matmul_softmax", "sparse", "none", "GQA 2/1")]),
    ],
    ids=["matmul_op", "torch_matmul_mT_div", "method_permute_dim3", "bmm", "baddbmm", "einsum", "einsum_bshd",
         "einsum_ellipsis", "scale_q_k", "scale_kT", "float_type_as", "softmax_dtype", "to_float32", "gqa", "2d",
         "tensor_sqrt_div", "tensor_rsqrt_mul_bf16", "einsum_mqa_headless_kv", "einsum_mqa_k_first_bihd"],
)
def test_matmul_softmax_sparse(fn, args, expect):
    bf16 = args[0].dtype == torch.bfloat16
    r = check(fn, args, expect, dtype_tol={"atol": 2e-2, "rtol": 2e-2} if bf16 else None)
    s = r.sites[0]
    expected_scale = {mm_scale_on_q_and_k: 0.125}.get(fn, 0.125)
    assert s.scale == pytest.approx(expected_scale)
    assert s.seq_len_q == S and s.seq_len_kv == S and s.head_dim == D


@pytest.mark.parametrize("fn", [mm_mask_masked_fill, mm_mask_where], ids=["masked_fill", "where"])
def test_matmul_softmax_key_padding(fn):
    q, k, v = qkv()
    keep = key_keep()
    r = check(fn, (q, k, v, keep), [("matmul_softmax", "sparse", "key_padding", "key-padding mask folded")])
    assert not torch.allclose(r.out, mm_basic(q, k, v), atol=1e-3)


@pytest.mark.parametrize(
    "fn,reason",
    [(mm_mask_additive, "float additive mask"), (mm_mask_full_bool, "is not a key-padding mask")],
    ids=["additive", "full_bool"],
)
def test_matmul_softmax_other_masks_dense(fn, reason):
    q, k, v = qkv()
    check(fn, (q, k, v, key_keep()), [("matmul_softmax", "dense", "other", reason)])


def test_matmul_softmax_dropout():
    m = MMDropout().eval()
    check(m, qkv(), [("matmul_softmax",) + SPARSE])
    m.train()
    check(m, qkv(), [("matmul_softmax", "dense", "none", "dropout p=0.1 in training mode")], atol=1e9)


def test_matmul_softmax_value_head_dim_differs():
    q, k = rand(B, H, S, D), rand(B, H, S, D)
    check(mm_basic, (q, k, rand(B, H, S, 32)), [("matmul_softmax", "dense", "none", "value head dim 32 != head_dim 64")])


# ============================================================================ negative cases
def neg_softmax_other_dim(q, k, v):
    return (q @ k.transpose(-2, -1) * 0.125).softmax(dim=-2) @ v


def neg_linear_attention(q, k, v):
    q, k = F.elu(q) + 1, F.elu(k) + 1
    return q @ (k.transpose(-2, -1) @ v) / S


def neg_probs_returned(q, k, v):
    p = (q @ k.transpose(-2, -1) * 0.125).softmax(-1)
    return p @ v, p


def neg_probs_fed_elsewhere(q, k, v):
    p = (q @ k.transpose(-2, -1) * 0.125).softmax(-1)
    return (p @ v) + p.mean()


def neg_scores_fed_elsewhere(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.125
    return s.softmax(-1) @ v + s.amax()


class NegProbsStored(nn.Module):
    def forward(self, q, k, v):
        p = (q @ k.transpose(-2, -1) * 0.125).softmax(-1)
        self.last_probs = p
        return p @ v


def neg_weights_not_attention(x, w1, w2):  # softmax(x W1) W2: a 2-D weight, not a per-batch k
    return torch.matmul(torch.softmax(x @ w1, dim=-1), w2)


def neg_probs_transposed(q, k, v):  # contracts over the queries, not the keys
    p = (q @ k.transpose(-2, -1) * 0.125).softmax(-1)
    return p.transpose(-2, -1) @ v


def neg_einsum_wrong_contraction(q, k, v):
    p = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1)
    return torch.einsum("bhqk,bhqd->bhkd", p, v)


def neg_tensor_scale(q, k, v, t):
    return mm_tensor_scale_dense(q, k, v, t)


def neg_log_softmax(q, k, v):
    return (q @ k.transpose(-2, -1)).log_softmax(-1) @ v


@pytest.mark.parametrize(
    "fn,args",
    [
        (neg_softmax_other_dim, qkv()),
        (neg_linear_attention, qkv()),
        (neg_probs_returned, qkv()),
        (neg_probs_fed_elsewhere, qkv()),
        (neg_scores_fed_elsewhere, qkv()),
        (NegProbsStored(), qkv()),
        (neg_weights_not_attention, (rand(B, S, D), rand(D, S), rand(S, D))),
        (neg_probs_transposed, qkv()),
        (neg_einsum_wrong_contraction, qkv()),
        (neg_tensor_scale, qkv() + (rand(B, H, 1, 1),)),
        (neg_log_softmax, qkv()),
    ],
    ids=["softmax_dim", "linear_attention", "probs_returned", "probs_fed_elsewhere", "scores_fed_elsewhere",
         "probs_stored", "weights_not_qkv", "probs_transposed", "einsum_contraction", "tensor_scale", "log_softmax"],
)
def test_not_attention_left_alone(fn, args):
    ref = fn(*args)
    r = capture(fn, *args)
    assert r.sites == []
    assert all(ops(g) == [] for g in r.graphs)
    torch.testing.assert_close(r.out, ref)


# ---------------------------------------------------------------- in-place steps, written-out softmax
def mm_fill_statement(q, k, v, keep):  # the mask written in place as a statement
    s = q @ k.transpose(-2, -1) * 0.125
    s.masked_fill_(~keep[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v


def mm_vanilla_bias(q, k, v, keep):  # HunyuanVideo's "vanilla" mode; torch's documented SDPA reference
    bias = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=q.dtype, device=q.device)
    bias.masked_fill_(keep[:, None, None, :].logical_not(), float("-inf"))
    a = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(q.size(-1)))
    a += bias
    a = a.softmax(dim=-1)
    return torch.dropout(a, p=0.0, train=True) @ v


def mm_inverted_expanded_fill(q, k, v, keep):  # the key mask expanded over the queries, then negated
    b, _, s, _ = q.shape
    a = (q @ k.transpose(-2, -1)) * 0.125
    return a.masked_fill(~keep[:, None, None, :].expand(b, 1, s, s), float("-inf")).softmax(-1) @ v


def mm_where_full_like(q, k, v, keep):
    a = (q @ k.transpose(-2, -1)) * 0.125
    return torch.where(keep[:, None, None, :], a, torch.full_like(a, float("-inf"))).softmax(-1) @ v


@pytest.mark.parametrize("fn", [mm_fill_statement, mm_vanilla_bias, mm_inverted_expanded_fill, mm_where_full_like],
                         ids=["fill_statement", "vanilla_zero_bias_filled", "inverted_expanded", "where_full_like"])
def test_matmul_softmax_key_padding_spellings(fn):
    q, k, v = qkv()
    keep = key_keep()
    r = check(fn, (q, k, v, keep), [("matmul_softmax", "sparse", "key_padding", "key-padding mask folded")])
    assert not torch.allclose(r.out, mm_basic(q, k, v), atol=1e-3)  # the mask is applied


def mm_reference_zero_bias(q, k, v):  # torch's documented SDPA reference, no mask
    bias = torch.zeros(q.size(-2), k.size(-2), dtype=q.dtype)
    a = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.size(-1)))
    a += bias
    return torch.dropout(torch.softmax(a, dim=-1), 0.0, train=True) @ v


def mm_inplace_scale(q, k, v):
    a = q @ k.transpose(-2, -1)
    a.mul_(0.125)  # a statement
    return a.softmax(-1) @ v


def mm_imul_scale(q, k, v):
    a = q @ k.transpose(-2, -1)
    a *= 0.125
    return a.softmax(-1) @ v


def mm_stabilised_amax(q, k, v):  # x-transformers
    a = q @ k.transpose(-2, -1) * 0.125
    a = a - a.amax(dim=-1, keepdim=True).detach()
    return a.softmax(dim=-1) @ v


def mm_stabilised_max_isub(q, k, v):
    a = q @ k.transpose(-2, -1) * 0.125
    a -= a.max(dim=-1, keepdim=True).values
    return F.softmax(a, dim=-1) @ v


def mm_softmax_written_out(q, k, v):
    a = torch.mul(q @ k.transpose(-2, -1), other=0.125)
    e = torch.exp(a - a.max(-1, keepdim=True)[0])
    return (e / e.sum(dim=-1, keepdim=True)) @ v


@pytest.mark.parametrize("fn", [mm_reference_zero_bias, mm_inplace_scale, mm_imul_scale, mm_stabilised_amax,
                                mm_stabilised_max_isub, mm_softmax_written_out],
                         ids=["zero_bias", "mul_statement", "imul", "amax_detach", "max_values_isub", "written_out"])
def test_matmul_softmax_in_place_and_stabilised_spellings(fn):
    r = check(fn, qkv(), [("matmul_softmax",) + SPARSE])
    assert r.sites[0].scale == pytest.approx(0.125)


def mm_upcast_qk(q, k, v):  # diffusers' Attention with upcast_attention=True (q, k: (B*H, S, D))
    q, k = q.float(), k.float()
    a = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype), q, k.transpose(-1, -2),
                      beta=0, alpha=0.125)
    return torch.bmm(a.softmax(dim=-1).to(v.dtype), v)


def test_matmul_softmax_upcast_q_and_k():
    """q and k upcast to float32 from v's bfloat16 are read before the cast: the kernels multiply
    bf16 q and k with float32 accumulation. q in float32 for real (no cast) stays dense."""
    q, k, v = (t.reshape(B * H, S, D) for t in qkv(dtype=torch.bfloat16))
    r = check(mm_upcast_qk, (q, k, v), [("matmul_softmax",) + SPARSE], dtype_tol={"atol": 2e-2, "rtol": 2e-2})
    assert r.sites[0].dtype == "bfloat16" and r.sites[0].scale == pytest.approx(0.125)

    def real_float32_q(q32, k, v):
        a = torch.baddbmm(torch.empty(q32.shape[0], q32.shape[1], k.shape[1]), q32, k.float().transpose(-1, -2),
                          beta=0, alpha=0.125)
        return torch.bmm(a.softmax(dim=-1).to(v.dtype), v)

    check(real_float32_q, (q.float() + 0, k, v), [("matmul_softmax", "dense", "none", "q/k/v dtypes differ")],
          dtype_tol={"atol": 2e-2, "rtol": 2e-2})


def neg_mask_statement_read_before(q, k, v, keep):
    # the scores are read (returned) before the in-place mask: not a private step of the attention
    s = q @ k.transpose(-2, -1) * 0.125
    before = s.sum()
    s.masked_fill_(~keep[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v, before


def neg_row_max_used_elsewhere(q, k, v, keep):
    a = q @ k.transpose(-2, -1) * 0.125
    mx = a.amax(-1, keepdim=True)
    return (a - mx).softmax(-1) @ v, mx


def neg_causal_bias(q, k, v, keep):
    bias = torch.zeros(q.size(-2), k.size(-2), dtype=q.dtype)
    bias.masked_fill_(torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).triu(1), float("-inf"))  # causal
    a = q @ k.transpose(-2, -1) * 0.125
    a += bias
    return a.softmax(-1) @ v


def neg_zero_bias_mask_written_after_the_fill(q, k, v, keep):
    drop = ~keep  # a fresh tensor, written below
    bias = torch.zeros(q.shape[0], 1, q.shape[2], k.shape[2])
    bias.masked_fill_(drop[:, None, None, :], float("-inf"))
    drop.zero_()  # eager's bias already holds the -inf
    a = q @ k.transpose(-2, -1) * 0.125
    a += bias
    return a.softmax(-1) @ v


def neg_upcast_copy_rotated_in_place(q, k, v, keep):
    qf, kf = q.bfloat16().float(), k.bfloat16().float()
    kf[..., :32] = -kf[..., :32]  # a rotary-like step on the float copy
    return ((qf @ kf.transpose(-2, -1)) * 0.125).softmax(-1).to(torch.bfloat16) @ v.bfloat16()


def neg_upcast_source_written_after_the_cast(q, k, v, keep):
    q = q.bfloat16()
    qf, kf = q.float(), k.bfloat16().float()
    q.mul_(0.0)  # eager's qf is a copy
    return ((qf @ kf.transpose(-2, -1)) * 0.125).softmax(-1).to(torch.bfloat16) @ v.bfloat16()


def neg_manual_softmax_other_dim(q, k, v, keep):
    e = (q @ k.transpose(-2, -1) * 0.125).exp()
    return (e / e.sum(dim=-2, keepdim=True)) @ v


@pytest.mark.parametrize("fn,expect", [
    (neg_mask_statement_read_before, []),
    (neg_row_max_used_elsewhere, []),
    (neg_causal_bias, [("matmul_softmax", "dense", "other", "not a key-padding mask")]),
    (neg_manual_softmax_other_dim, []),
    (neg_zero_bias_mask_written_after_the_fill, []),
    (neg_upcast_copy_rotated_in_place, [("matmul_softmax", "dense", "none", "q/k/v dtypes differ")]),
    (neg_upcast_source_written_after_the_cast, []),
], ids=["read_before_the_write", "row_max_returned", "causal_bias", "sum_over_queries", "bias_mask_written",
        "upcast_copy_written", "upcast_source_written"])
def test_in_place_and_written_out_negatives(fn, expect):
    """Spellings near the ones above that are not plain attention, or not only: no site (or a dense
    one), and the output as eager's."""
    q, k, v = qkv()
    r = capture(fn, q, k, v, key_keep())
    assert [(s.pattern, s.decision, s.mask) for s in r.sites] == [e[:3] for e in expect], r.sites
    for s, e in zip(r.sites, expect):
        assert e[3] in s.reason, s.reason
    assert ops(r.graphs[0]) == []
    torch.testing.assert_close(r.out, fn(q, k, v, key_keep()))


# ============================================================================ names, several sites
class Attn(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class TwoCalls(nn.Module):
    def forward(self, q, k, v):
        a = F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(a, k, v)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Attn(), Attn()])
        self.pair = TwoCalls()
        self.mm = Fn(mm_basic)

    def forward(self, q, k, v):
        for b in self.blocks:
            q = b(q, k, v)
        q = self.pair(q, k, v)
        return self.mm(q, k, v) + sdpa_pos(q, k, v)


def test_site_names():
    r = check(Net(), qkv(), [("sdpa",) + SPARSE] * 4 + [("matmul_softmax",) + SPARSE, ("sdpa",) + SPARSE])
    assert [s.name for s in r.sites] == ["blocks.0", "blocks.1", "pair", "pair#1", "mm", "attention"]


@pytest.mark.parametrize(
    "path,name",
    [
        ("L['self'].blocks[3].attn1", "blocks.3.attn1"),
        ("L['self'].blocks.3.attn1", "blocks.3.attn1"),
        ("L['self']._modules['blocks']._modules['3'].attn1", "blocks.3.attn1"),
        ("L['self'].__dict__['_modules']['blocks'].3.attn1", "blocks.3.attn1"),
        ("L['model'].transformer_blocks[0].attn", "transformer_blocks.0.attn"),
        ("L['self']", ""),
        ("L['args'][0].layers.0.self_attn", "layers.0.self_attn"),  # self passed through a decorator's *args
    ],
)
def test_site_name_normalisation(path, name):
    assert site_name(path) == name


# ============================================================================ dynamic shapes
def test_dynamic_shapes():
    """A recompile for new batch and sequence sizes makes them symbolic (automatic dynamic): the
    sizes are reported as expressions, the decision uses the example sizes, and the rewrite takes
    its sizes from the graph."""

    def f(q, k, v, keep):
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return mm_mask_masked_fill(a, k, v, keep)

    sites, graphs = [], []

    def be(gm, example_inputs):
        r = transform(gm, example_inputs, CFG)
        sites.append(r.sites)
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    c = torch.compile(f, backend=be, fullgraph=True)
    inputs = [qkv((b, H, s, D)) + (key_keep(b, s),) for b, s in ((2, 64), (3, 80), (4, 96))]
    with torch.no_grad():
        outs = [c(*x) for x in inputs]
    assert len(graphs) == 2  # static, then one dynamic graph for the other two calls
    assert [(s.pattern, s.decision, s.mask) for s in sites[1]] == [
        ("sdpa", "sparse", "key_padding"),
        ("matmul_softmax", "sparse", "key_padding"),
    ]
    s = sites[1][0]
    assert all(isinstance(x, str) for x in (s.batch, s.seq_len_q, s.seq_len_kv))
    assert (s.num_heads, s.head_dim) == (H, D)
    assert "dynamic sequence length (example 80): calls shorter than min_seq_len 64 run dense" in s.reason
    g = graphs[1]
    assert len(ops(g)) == 2 and left(g) == []
    assert any(n.target is torch.ops.aten.sym_size.int for n in g.graph.nodes)
    for x, out in zip(inputs, outs):
        torch.testing.assert_close(out, f(*x))
    # below min_seq_len at the example size: dense, the reason says so
    sites.clear()
    graphs.clear()
    torch._dynamo.reset()
    c = torch.compile(f, backend=be, fullgraph=True)
    with torch.no_grad():
        c(*(qkv((2, H, 16, D)) + (key_keep(2, 16),)))
        c(*(qkv((2, H, 24, D)) + (key_keep(2, 24),)))
    # a self-attention of dynamic length below min_seq_len at the example size: still a site (the
    # runtime runs its short calls dense; tests/test_runtime.py), the reason says so
    assert [s.decision for s in sites[1]] == ["sparse", "sparse"]
    assert "dynamic sequence length (example 24): calls shorter than min_seq_len 64 run dense" in sites[1][0].reason


# ============================================================================ the rewrite
def _graph_of(fn, *args):
    gms = []

    def be(gm, ex):
        gms.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=be, fullgraph=True)(*args)
    return gms[0]


def test_find_does_not_modify_the_graph():
    gm = _graph_of(mm_mask_masked_fill, *qkv(), key_keep())
    before = gm.code
    matches = find_attention_sites(gm, CFG)
    assert len(matches) == 1 and gm.code == before
    m = matches[0]
    assert m.output.op == "call_function" and m.mask is not None and m.mask_invert
    assert m.scale == pytest.approx(0.125)


def test_rewrite_is_atomic():
    gm = _graph_of(mm_einsum_bshd, *qkv((B, S, H, D)))
    (m,) = find_attention_sites(gm, CFG)
    before = gm.graph.python_code("self").src
    n_nodes = len(gm.graph.nodes)
    m.out_perm = (0, 1, 2, 3)  # a wrong output layout: the result's shape check fails
    with pytest.raises(RuntimeError, match="rewritten output has shape"):
        rewrite_site(gm, m, 12345)
    gm.graph.lint()
    assert len(gm.graph.nodes) == n_nodes and gm.graph.python_code("self").src == before
    # non-strict: the site stays dense with the failure as its reason, the graph is unchanged
    os.environ["FGCOMPILE_STRICT"] = "0"
    try:
        rewrite_sites(gm, [(m, 12345)])
    finally:
        os.environ["FGCOMPILE_STRICT"] = "1"
    assert m.info.decision == "dense" and m.info.reason.startswith("rewrite failed")
    assert len(gm.graph.nodes) == n_nodes


def test_rewrite_erases_only_the_region():
    def f(q, k, v):
        kt = k.transpose(-2, -1)
        s = q @ kt * 0.125
        return s.softmax(-1) @ v + kt.sum()  # kt is used outside: it stays

    r = check(f, qkv(), [("matmul_softmax",) + SPARSE])
    g = r.graphs[0].graph
    assert any(n.op == "call_method" and n.target == "transpose" and n.users for n in g.nodes)
    assert not any("matmul" in str(n.target) for n in g.nodes)


# ============================================================================ explain + Report
class Breaky(nn.Module):
    def forward(self, q, k, v):
        a = F.scaled_dot_product_attention(q, k, v)
        torch._dynamo.graph_break()
        return mm_basic(a, k, v)


def test_explain_report():
    q, k, v = qkv()
    rep = fgcompile.explain(Net(), q, k, v, config=CFG)
    assert isinstance(rep, fgcompile.Report)
    assert len(rep.sites) == 6 and rep.graph_breaks == 0 and rep.graph is rep.graphs[0]
    text = str(rep)
    lines = text.splitlines()
    assert lines[0] == "fgcompile: 6 attention site(s), 6 sparse, 0 dense; 1 graph(s), 0 graph break(s)"
    header = lines[2].split()
    assert header == ["name", "pattern", "B", "H/H_kv", "S_q", "S_kv", "D", "dtype", "mask", "decision", "reason"]
    assert lines[4].split()[:10] == ["blocks.0", "sdpa", "2", "2/2", "64", "64", "64", "float32", "none", "sparse"]
    assert lines[8].startswith("mm ") and "matmul_softmax" in lines[8]
    # fixed width: every row's columns start where the header's do
    starts = [lines[2].index(h) for h in ("pattern", "decision", "reason")]
    for row in lines[4:10]:
        assert all(row[i - 2 : i] == "  " and row[i] != " " for i in starts)
    assert "torch.ops.fgcompile.site_attention.default(" in text
    assert "def forward" in text


def test_explain_runs_no_sparse_kernel_and_keeps_other_compiles(monkeypatch):
    import fgcompile.runtime as rt

    def boom(*a, **k):
        raise AssertionError("explain must not run fgcompile's op")

    monkeypatch.setattr(rt, "run_site", boom)
    m = Attn()
    q, k, v = qkv()
    calls = []

    def counting(gm, ex):
        calls.append(1)
        return gm.forward

    torch._dynamo.reset()
    c = torch.compile(m, backend=counting)
    with torch.no_grad():
        c(q, k, v)
        rep = fgcompile.explain(m, q, k, v, config=FGAttnConfig(min_seq_len=64, predictor="pooled"))
        assert [s.decision for s in rep.sites] == ["sparse"]
        rep2 = fgcompile.explain(c, q, k, v, config=FGAttnConfig(min_seq_len=64))  # a compiled model
        assert len(rep2.sites) == 1
        c(q, k, v)  # the user's compiled model is still cached: no recompile
    assert calls == [1]
    assert torch.is_grad_enabled()


def test_explain_graph_breaks():
    q, k, v = qkv()
    torch._dynamo.reset()
    rep = fgcompile.explain(Breaky(), q, k, v, config=CFG)
    assert rep.graph_breaks == 1 and len(rep.graphs) == 2
    assert [s.pattern for s in rep.sites] == ["sdpa", "matmul_softmax"]
    assert "rewritten graph 1" in str(rep)


def test_explain_says_when_nothing_was_captured():
    """A call Dynamo runs eagerly (Mochi's attention: a frame with a graph break inside a loop) has
    no graph: the report says so instead of an empty table."""
    def per_item(q, k, v, keep):  # Mochi's processor: the valid keys of each item by nonzero, in a loop
        out = []
        for i in range(q.shape[0]):
            idx = torch.nonzero(keep[i]).flatten()
            out.append(F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, idx], v[i:i + 1, :, idx]))
        return torch.cat(out)

    torch._dynamo.reset()
    rep = fgcompile.explain(per_item, *qkv(), key_keep(), config=CFG)
    if rep.graphs:
        pytest.skip("this torch captures the loop")
    assert rep.sites == []
    assert "Dynamo captured no graph" in str(rep)


@torch.compiler.disable
def _run_attention_eagerly(q, k, v):  # Mochi's run_attention
    return F.scaled_dot_product_attention(q, k, v)


def test_explain_gives_dynamos_reasons_for_attention_it_runs_eagerly():
    """Attention in a ``torch.compiler.disable``d function (Mochi) or behind an unsupported context
    manager (Latte's ``torch.backends.cuda.sdp_kernel``) never reaches a graph: ``explain`` lists
    Dynamo's reasons, so the user sees why there is no site."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(64, 192)

        def forward(self, x):
            q, k, v = self.qkv(x).view(1, S, 3, 1, 64).permute(2, 0, 3, 1, 4)
            return _run_attention_eagerly(q, k, v)

    torch._dynamo.reset()
    rep = fgcompile.explain(M(), torch.randn(1, S, 64), config=CFG)
    assert rep.sites == []
    assert any("torch.compiler.disable" in r for r in rep.graph_break_reasons), rep.graph_break_reasons
    assert "Dynamo's reasons" in str(rep)


def test_explain_toy_dit_table():
    from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT

    m = ToyVideoDiT(ToyDiTConfig(depth=2, width=128, heads=2, attn_impl="manual")).eval()
    x, t, text = rand(1, 4, 2, 16, 16), torch.rand(1), rand(1, 16, 64)
    rep = fgcompile.explain(m, x, t, text, config=CFG)
    got = [(s.name, s.pattern, s.decision) for s in rep.sites]
    assert got == [
        ("blocks.0.attn", "matmul_softmax", "sparse"),
        ("blocks.0.cross", "sdpa", "dense"),
        ("blocks.1.attn", "matmul_softmax", "sparse"),
        ("blocks.1.cross", "sdpa", "dense"),
    ]
    assert "seq_len_kv 16 < min_seq_len 64" in rep.sites[1].reason
    assert "blocks.1.cross" in rep.table()


def test_compiled_manual_toy_dit_matches_eager():
    """The whole backend (Inductor included) on the hand-written-attention toy DiT."""
    from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT

    m = ToyVideoDiT(ToyDiTConfig(depth=1, width=128, heads=2, attn_impl="manual")).eval()
    x, t, text = rand(2, 4, 2, 16, 16), torch.rand(2), rand(2, 16, 64)
    with torch.no_grad():
        ref = m(x, t, text)
        c = torch.compile(m, backend=fgattn_backend(CFG), fullgraph=True)
        out = c(x, t, text)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    st = fgcompile.stats(c)
    assert list(st) == ["blocks.0.attn"] and st["blocks.0.attn"].dense_calls == 1


# ============================================================================ logging
def test_torch_logs_prints_decisions():
    code = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        import fgcompile.dynamo_backend as fb
        def f(q, kv):
            return F.scaled_dot_product_attention(q, q, q) + F.scaled_dot_product_attention(q, kv, kv)
        q, kv = torch.randn(1, 2, 64, 64), torch.randn(1, 2, 8, 64)
        def be(gm, ex):
            fb.transform(gm, ex, fb.FGAttnConfig(predictor="dense", min_seq_len=64))
            return gm.forward
        with torch.no_grad():
            torch.compile(f, backend=be)(q, kv)
        """
    )
    env = dict(os.environ, TORCH_LOGS="+fgcompile")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if "fgcompile: site" in line]
    assert len(lines) == 2, r.stderr[-3000:]
    assert "(sdpa) B=1 H=2/2 S_q=64 S_kv=64 D=64 float32 mask=none -> sparse" in lines[0]
    assert "-> dense: seq_len_kv 8 < min_seq_len 64" in lines[1]
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "fgcompile: site" not in r.stderr


# ============================================================================ probes of session 6
def test_dynamic_separate_k_v_inputs_stay_sites():
    """Under dynamic shapes, k and v of separate graph inputs get their own length symbols: equal
    example sizes make them one site (under a guard on the equality), not a silent miss; a key
    padding mask whose length is another sum of symbols counts as well."""
    # automatic dynamic shapes: the second call's new length recompiles with symbolic lengths
    r = capture(sdpa_pos, *qkv(), dynamic=None, run_twice=qkv((B, H, 2 * S, D)))
    assert [(s.pattern, s.decision, s.mask) for s in r.sites] == [("sdpa", "sparse", "none")] * 2
    assert "dynamic sequence length" in r.sites[1].reason
    torch.testing.assert_close(r.out2, sdpa_pos(*qkv((B, H, 2 * S, D))), atol=1e-5, rtol=1e-4)

    def joint(img, txt, txt_keep):  # (3, B, H, S, D) each: text and video tokens in one attention
        q, k, v = torch.cat([txt, img], 3).unbind(0)
        mask = torch.cat([txt_keep, txt_keep.new_ones(txt_keep.shape[0], img.shape[3])], 1)[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    a = (rand(3, B, H, S, D), rand(3, B, H, 16, D, seed=5), key_keep(s=16))
    a2 = (rand(3, B, H, 2 * S, D), rand(3, B, H, 8, D, seed=5), key_keep(s=8))
    r = capture(joint, *a, dynamic=None, run_twice=a2)
    assert [(s.pattern, s.decision, s.mask) for s in r.sites] == [("sdpa", "sparse", "key_padding")] * 2
    torch.testing.assert_close(r.out2, joint(*a2), atol=1e-5, rtol=1e-4)


def test_dynamic_key_length_beside_a_static_long_query_length_is_a_site():
    """One attention function serving a self-attention and a short cross-attention (the original
    Wan2.1 code's attention()): the second call makes only the key length dynamic, and the graph
    Dynamo compiles for it (its example: 16 keys) stays a site, whose short calls run dense. Where
    every length is symbolic (dynamic=True) a short key length stays dense."""
    q = rand(B, H, 128, D, seed=1)
    long_kv, short_kv = qkv((B, H, 128, D))[1:], qkv((B, H, 16, D))[1:]
    r = capture(sdpa_pos, q, *long_kv, dynamic=None, run_twice=(q, *short_kv))
    assert [(s.decision, s.seq_len_q, isinstance(s.seq_len_kv, int)) for s in r.sites] == [
        ("sparse", 128, True), ("sparse", 128, False)]
    assert "dynamic sequence length (example 128x16): calls shorter than min_seq_len 64 run dense" in r.sites[1].reason
    torch.testing.assert_close(r.out2, sdpa_pos(q, *short_kv), atol=1e-5, rtol=1e-4)
    r = capture(sdpa_pos, q, *short_kv, dynamic=True)
    assert [s.decision for s in r.sites] == ["dense"] and "< min_seq_len 64" in r.sites[0].reason


def test_graph_built_scale_that_is_not_a_0d_constant_is_not_folded():
    """Only a 0-d tensor made from literals is a constant scale: a 1-element tensor of another
    shape (it changes the scores' dtype by type promotion) and a random one leave the site as
    written, with the reason."""
    one_elem = lambda q, k, v: (q @ k.transpose(-2, -1) / torch.tensor([8.0])).softmax(-1) @ v  # noqa: E731
    rnd = lambda q, k, v: (q @ k.transpose(-2, -1) * torch.rand(())).softmax(-1) @ v  # noqa: E731
    for f in (one_elem, rnd):
        rep = fgcompile.explain(f, *qkv(), config=FGAttnConfig(min_seq_len=64))
        assert rep.sites == [] and any("multiplied or divided by a tensor" in r[2] for r in rep.rejected), rep.rejected


def test_negative_scale_stays_dense():
    """A negative scale is attention of another kind (the kernels need a scale > 0): dense, with
    the reason, decided at compile time (no run-time fallback)."""
    f = lambda q, k, v: (q @ k.transpose(-2, -1) * -0.125).softmax(-1) @ v  # noqa: E731
    check(f, qkv(), [("matmul_softmax", "dense", "none", "scale -0.125 is not a finite number > 0")])
    g = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=-0.5)  # noqa: E731
    check(g, qkv(), [("sdpa", "dense", "none", "scale -0.5 is not a finite number > 0")])
    z = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.0)  # noqa: E731
    check(z, qkv(), [("sdpa", "dense", "none", "scale 0 is not a finite number > 0")])


def test_scale_after_the_fill_scales_the_fill():
    """``masked_fill(-1e4)`` followed by ``* 1e-4`` fills -1, which does not mask a key out: dense
    (its output is eager's); a -inf fill stays a mask whatever the scale after it."""
    q, k, v = qkv()
    keep = key_keep()

    def weak(q, k, v, keep):
        s = (q @ k.transpose(-2, -1)).masked_fill(~keep[:, None, None, :], -1e4) * 1e-4
        return s.softmax(-1) @ v

    def strong(q, k, v, keep):
        s = (q @ k.transpose(-2, -1)).masked_fill(~keep[:, None, None, :], float("-inf")) * 0.125
        return s.softmax(-1) @ v

    check(weak, (q, k, v, keep), [("matmul_softmax", "dense", "other", "scaled by 0.0001 afterwards")])
    check(strong, (q, k, v, keep), [("matmul_softmax", "sparse", "key_padding", "self-attention")])


def test_einsum_scores_written_k_first():
    """``einsum("bhkd,bhqd->bhqk", k, q)`` is the same q.k^T with its operands swapped."""
    f = lambda q, k, v: torch.einsum("bhqk,bhkd->bhqd", torch.einsum("bhkd,bhqd->bhqk", k, q * 0.125).softmax(-1), v)  # noqa: E731
    check(f, qkv(), [("matmul_softmax",) + SPARSE])


def test_cross_attention_reason_is_not_called_self_attention():
    cfg = CFG.replace(min_seq_len=16)
    r = check(sdpa_pos, (rand(B, H, S, D), rand(B, H, 32, D), rand(B, H, 32, D)), [("sdpa", "sparse", "none", "attention 64x32")], config=cfg)
    assert not r.sites[0].reason.startswith("self-attention")


def test_in_place_step_on_the_scores_read_elsewhere_is_named_as_such():
    """An in-place step inside the attention (``s.mul_(c)``) on scores something else reads after it
    is reported as an in-place op, not as a use outside the attention."""

    def inplace(q, k, v):
        s = q @ k.transpose(-2, -1)
        s.mul_(0.125)
        return s.softmax(-1) @ v, s.sum()

    rep = fgcompile.explain(inplace, *qkv(), config=CFG)
    assert not rep.sites
    assert any("modified by the in-place op" in why and "mul_" in why for _, _, why in rep.rejected), rep.rejected
    out = torch.compile(inplace, backend=fgattn_backend(CFG))(*qkv())
    torch.testing.assert_close(out, inplace(*qkv()))


def test_explain_lists_what_is_not_a_site():
    """A softmax the pass does not follow (here logit soft-capping, tanh between the scores and the
    softmax) is listed with its reason, so a user sees why a site was missed."""

    def softcapped(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.125
        return (torch.tanh(s / 30.0) * 30.0).softmax(-1) @ v

    rep = fgcompile.explain(softcapped, *qkv(), config=CFG)
    assert not rep.sites
    assert len(rep.rejected) == 1 and rep.rejected[0][1] == "softmax"
    assert "between the scores and the softmax" in rep.rejected[0][2]
    assert "(torch.tanh)" in rep.rejected[0][2] and " at 0x" not in rep.rejected[0][2]  # no object repr
    assert "not attention sites (left as written):" in str(rep)
    torch.testing.assert_close(torch.compile(softcapped, backend=fgattn_backend(CFG))(*qkv()), softcapped(*qkv()))


def test_scores_viewed_over_leading_dims():
    """Hugging Face BART / Whisper spell attention on (B * H, S, D) with the scores viewed as
    (B, H, S, S) and back around the mask: a reshape of the leading dims keeps every row, so the
    site is served; a boolean mask applied in the other view stays dense (its dims are not q's)."""

    def bart_like(q, k, v):
        w = torch.bmm(q * 0.125, k.transpose(1, 2)).view(B, H, S, S)
        return torch.bmm(F.softmax(w.view(B * H, S, S), dim=-1), v)

    def bart_masked(q, k, v, keep):
        w = torch.bmm(q * 0.125, k.transpose(1, 2)).view(B, H, S, S)
        w = w.masked_fill(~keep[:, None, None, :], float("-inf"))
        return torch.bmm(F.softmax(w.reshape(B * H, S, S), dim=-1), v)

    q, k, v = (t.reshape(B * H, S, D) for t in qkv())
    check(bart_like, (q, k, v), [("matmul_softmax",) + SPARSE])
    check(bart_masked, (q, k, v, key_keep()), [("matmul_softmax", "dense", "other", "reshaped view of the scores")])
    # served sparse with every slice kept: the output is dense attention's
    cfg = FGAttnConfig(min_seq_len=64, block_m=64, alpha=1e-9, profile_calls=(0,))
    c = torch.compile(bart_like, backend=fgattn_backend(cfg))
    with torch.no_grad():
        c(q, k, v)
        out = c(q, k, v)  # a sparse call
    torch.testing.assert_close(out, bart_like(q, k, v), atol=1e-5, rtol=1e-4)


def test_five_d_gqa_is_a_dense_site_with_its_reason():
    """GQA written with a 5-D view (q (B, H_kv, G, S, D) against k/v (B, H_kv, 1, S, D)) is
    attention the kernels do not serve: a dense site with the reason, not a silent miss."""

    def gqa5(q, k, v):
        return ((q @ k.transpose(-2, -1)) * 0.125).softmax(-1) @ v

    check(gqa5, (rand(B, 1, 2, S, D), rand(B, 1, 1, S, D, seed=2), rand(B, 1, 1, S, D, seed=3)),
          [("matmul_softmax", "dense", "none", "5-D inputs (the kernels serve up to 4-D)")])


def test_augmented_assignment_scale_is_not_folded():
    """``q *= c`` writes into q, which another name may still read after the attention: folding
    the multiply into the site's scale and dropping it would leave that reader unscaled. The
    softmax is left as written, with its reason."""

    def f(q, k, v):
        q_alias = q
        q *= 0.125
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v + q_alias

    rep = fgcompile.explain(f, *qkv(), config=CFG)
    assert not rep.sites
    assert any("in-place" in why for _, _, why in rep.rejected), rep.rejected
    out = torch.compile(f, backend=fgattn_backend(CFG))(*qkv())
    torch.testing.assert_close(out, f(*qkv()))


def _write_setitem(q, k, v, kp):
    a = q @ k.transpose(-2, -1) * 0.125
    k[:, :, :4] = 0.0  # eager computed the scores with the old k
    return a.softmax(-1) @ v + k.mean()


def _write_out_arg(q, k, v, kp):
    a = q @ k.transpose(-2, -1) * 0.125
    torch.mul(v, 2.0, out=q)
    return a.softmax(-1) @ v + q.mean()


def _write_through_view(q, k, v, kp):
    q_view = q[:, :, :]
    a = q @ k.transpose(-2, -1) * 0.125
    q_view.zero_()
    return a.softmax(-1) @ v + q.mean()


def _write_mask_through_view(q, k, v, kp):
    kp = kp.clone()
    a = (q @ k.transpose(-2, -1) * 0.125).masked_fill(kp, float("-inf"))
    kp.view(-1).fill_(False)  # eager already applied the mask
    return a.softmax(-1) @ v + kp.float().mean()


def _write_inplace_kwarg(q, k, v, kp):
    k = k.contiguous()
    a = (q @ k.transpose(-2, -1) * 0.125).softmax(-1)
    F.hardtanh(k, -0.1, 0.1, True)  # inplace=True by position
    return a @ v + k.mean()


def _write_module_inplace(q, k, v, kp):
    k = k.contiguous()
    a = (q @ k.transpose(-2, -1) * 0.125).softmax(-1)
    nn.ReLU(inplace=True)(k)
    return a @ v + k.mean()


def _write_foreach(q, k, v, kp):
    k = k.contiguous()
    a = (q @ k.transpose(-2, -1) * 0.125).softmax(-1)
    torch._foreach_mul_([k], 3.0)
    return a @ v + k.mean()


@torch.library.custom_op("fgtest::scale_into", mutates_args=("x",))
def _scale_into(x: torch.Tensor, c: float) -> None:
    x.mul_(c)


@_scale_into.register_fake
def _(x, c):
    return None


def _write_custom_op_packet(q, k, v, kp):
    k = k.contiguous()
    a = (q @ k.transpose(-2, -1) * 0.125).softmax(-1)
    torch.ops.fgtest.scale_into(k, 3.0)
    return a @ v + k.mean()


@pytest.mark.parametrize("fn", [_write_setitem, _write_out_arg, _write_through_view, _write_mask_through_view,
                                _write_inplace_kwarg, _write_module_inplace, _write_foreach, _write_custom_op_packet],
                         ids=["setitem", "out=", "view of q", "view of the mask", "inplace=True", "nn.ReLU(inplace=True)",
                              "_foreach_mul_", "custom op packet"])
def test_write_between_scores_and_output_rejects_the_site(fn):
    """The rewritten op reads q, k and the mask where the attention's output is computed; eager
    read them at the scores. A write in between (``x[i] = y``, ``out=``, an in-place op on a view)
    must leave the softmax as written, with its reason: rewritten, the output was 14-76% off."""
    q, k, v = qkv()
    kp = (torch.arange(S) >= S - 5).expand(B, 1, 1, S).clone()
    rep = fgcompile.explain(fn, q.clone(), k.clone(), v.clone(), kp, config=CFG)
    assert not rep.sites, rep.table()
    assert any("between the attention's scores and its output" in why for _, _, why in rep.rejected), rep.rejected
    torch._dynamo.reset()
    out = torch.compile(fn, backend=fgattn_backend(CFG))(q.clone(), k.clone(), v.clone(), kp)
    torch.testing.assert_close(out, fn(q.clone(), k.clone(), v.clone(), kp))


class _MHA(nn.Module):
    """nn.MultiheadAttention self-attention on (B, S, E) or (S, B, E) inputs."""

    def __init__(self, batch_first=True, kdim=None, bias=True, add_bias_kv=False, call=None):
        super().__init__()
        self.batch_first = batch_first
        self.mha = nn.MultiheadAttention(128, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias,
                                         add_bias_kv=add_bias_kv)
        self.kv = nn.Linear(128, kdim) if kdim else None
        self.call = call or (lambda m, x, kv, kp: m(x, kv, kv, key_padding_mask=kp, need_weights=False)[0])

    def forward(self, x, kp=None):
        kv = self.kv(x) if self.kv is not None else x
        return self.call(self.mha, x, kv, kp)


class _NoFastPath(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *args):
        prev = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.m(*args)
        finally:
            torch.backends.mha.set_fastpath_enabled(prev)


def test_transformer_layer_fast_path_says_why():
    """In eval mode without autograd nn.TransformerEncoderLayer runs one fused PyTorch kernel:
    no site, and the report says so and how to get one."""
    m = nn.TransformerEncoderLayer(128, 2, dim_feedforward=64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(B, S, 128)
    with torch.no_grad():
        rep = fgcompile.explain(m, x, config=CFG)
    assert not rep.sites
    assert any(kind == "mha" and "set_fastpath_enabled(False)" in why for _, kind, why in rep.rejected), rep.rejected


_MHA_OK = {
    "batch_first": dict(),
    "seq_first": dict(batch_first=False),
    "kdim (separate projections)": dict(kdim=96),
    "no bias": dict(bias=False),
    "default need_weights, weights unused": dict(call=lambda m, x, kv, kp: m(x, kv, kv, key_padding_mask=kp)[0]),
    "key_padding_mask": dict(call=lambda m, x, kv, kp: m(x, kv, kv, key_padding_mask=kp, need_weights=False)[0]),
    "TransformerEncoderLayer": None,
}


@pytest.mark.parametrize("case", list(_MHA_OK))
def test_multihead_attention_is_expanded_to_an_sdpa_site(case):
    """Dynamo records nn.MultiheadAttention's F.multi_head_attention_forward as one node; the
    backend writes it out as projections around SDPA, which becomes a site: same output as eager."""
    torch.manual_seed(0)
    if case == "TransformerEncoderLayer":  # without its fused fast path (see the next test)
        m = nn.TransformerEncoderLayer(128, 2, dim_feedforward=64, dropout=0.0, batch_first=True).eval()
        m = _NoFastPath(m)
    else:
        m = _MHA(**_MHA_OK[case]).eval()
    seq_first = case == "seq_first"
    x = torch.randn(S, B, 128) if seq_first else torch.randn(B, S, 128)
    args = (x,)
    if case == "key_padding_mask":
        args = (x, torch.arange(S)[None, :].expand(B, S) >= torch.tensor([[S], [S - 9]]))
    with torch.no_grad():
        rep = fgcompile.explain(m, *args, config=CFG)
        assert len(rep.sites) == 1 and rep.sites[0].pattern == "sdpa", rep.table()
        assert not [r for r in rep.rejected if r[1] == "mha"], rep.rejected
        if case == "key_padding_mask":
            assert rep.sites[0].mask == "key_padding", rep.table()
        ref = m(*args)
        for cfg in (CFG, FGAttnConfig(predictor="profile", alpha=1e-6, min_seq_len=64, block_m=16)):
            torch._dynamo.reset()
            out = torch.compile(m, backend=fgattn_backend(cfg))(*args)
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


_MHA_REJECTED = {
    "weights used": (dict(call=lambda m, x, kv, kp: m(x, kv, kv)[0] + m(x, kv, kv)[1].mean()),
                     "attention weights are used"),
    "attn_mask": (dict(call=lambda m, x, kv, kp: m(x, kv, kv, attn_mask=torch.zeros(S, S), need_weights=False)[0]),
                  "attn_mask"),
    "add_bias_kv": (dict(add_bias_kv=True), "bias_k is set"),
}


@pytest.mark.parametrize("case", list(_MHA_REJECTED))
def test_multihead_attention_not_expanded_says_why(case):
    kw, why = _MHA_REJECTED[case]
    torch.manual_seed(0)
    m = _MHA(**kw).eval()
    x = torch.randn(B, S, 128)
    with torch.no_grad():
        rep = fgcompile.explain(m, x, config=CFG)
        assert any(kind == "mha" and why in r for _, kind, r in rep.rejected), rep.rejected
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(m, backend=fgattn_backend(CFG))(x), m(x), atol=2e-5, rtol=1e-4)


_HEADS_MASKS = {  # keep (B, S) -> a (B, H, 1, S) mask; True: one row per batch repeated over heads
    "expand": (lambda keep: keep[:, None, None, :].expand(B, H, 1, S), True),
    "expand from 2-D": (lambda keep: keep[:1].expand(B, H, 1, S), True),  # one row for every batch
    "repeat": (lambda keep: keep[:, None, None, :].repeat(1, H, 1, 1), True),
    "repeat, one tuple": (lambda keep: keep[:, None, None, :].repeat((1, H, 1, 1)), True),
    "repeat_interleave + view (diffusers)": (lambda keep: keep[:, None, :].repeat_interleave(H, dim=0).view(B, H, -1, S), True),
    "varies over heads": (lambda keep: torch.stack([keep, keep.flip(-1)], 1)[:, :, None, :], False),
    "3-D source on the head axis": (lambda keep: keep[:H, None, :].expand(B, H, 1, S), False),
}


@pytest.mark.parametrize("case", list(_HEADS_MASKS))
def test_key_padding_mask_repeated_over_heads(case):
    """A (B, H, 1, S) boolean mask that repeats one key-padding row per head (diffusers'
    prepare_attention_mask, an expand, a repeat) is a key-padding mask; one that varies over heads
    is not (dense, with the reason). Either way the output equals eager."""
    build, served = _HEADS_MASKS[case]
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, S - 11:] = False
    keep[0, :3] = False

    def f(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=build(keep))

    q, k, v = qkv()
    rep = fgcompile.explain(f, q, k, v, keep, config=CFG)
    assert len(rep.sites) == 1
    site = rep.sites[0]
    if served:
        assert site.mask == "key_padding" and site.decision == "sparse", rep.table()
    else:
        assert site.decision == "dense" and "not a key-padding mask" in site.reason, rep.table()
    cfg = FGAttnConfig(predictor="profile", alpha=1e-6, min_seq_len=64, block_m=16, max_density=1.0)
    torch._dynamo.reset()
    c = torch.compile(f, backend=fgattn_backend(cfg))
    ref = f(q, k, v, keep)
    for _ in range(2):  # profiled, then sparse
        torch.testing.assert_close(c(q, k, v, keep), ref, atol=1e-5, rtol=1e-4)


class _HarmlessWrites(nn.Module):
    """Writes that cannot change what the attention reads: into a fresh tensor of a parallel
    branch, into the key cache before the scores read it, into v before the output reads it."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.qkv = nn.Linear(H * D, 3 * H * D)
        self.g = nn.Linear(H * D, H * D)
        self.register_buffer("kc", torch.zeros(B, H, S, D))

    def forward(self, x):
        q, k, v = self.qkv(x).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
        if self.case == "fresh tensor":
            a = (q @ k.transpose(-2, -1)) * 0.125
            g = self.g(x)
            g.relu_()
            return (a.softmax(-1) @ v).transpose(1, 2).reshape(B, S, -1) * g
        if self.case == "key cache before the scores":
            q = q * 0.125
            self.kc[:, :, :S] = k
            return (q @ self.kc.transpose(-2, -1)).softmax(-1) @ v
        v = v.contiguous()
        a = (q @ k.transpose(-2, -1) * 0.125).softmax(-1)
        v.mul_(2.0)  # eager's p @ v reads the doubled v, as the rewritten op does
        return a @ v


@pytest.mark.parametrize("case", ["fresh tensor", "key cache before the scores", "v before the output"])
def test_writes_that_cannot_change_the_inputs_keep_the_site(case):
    torch.manual_seed(0)
    m = _HarmlessWrites(case).eval()
    x = torch.randn(B, S, H * D)
    with torch.no_grad():
        rep = fgcompile.explain(m, x, config=CFG)
        assert len(rep.sites) == 1, (rep.table(), rep.rejected)
        ref = _HarmlessWrites(case).eval()
        ref.load_state_dict(m.state_dict())
        torch._dynamo.reset()
        out = torch.compile(m, backend=fgattn_backend(CFG))(x)
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-4)


def test_diffusers_mask_repeated_over_heads_under_dynamic_shapes():
    """diffusers' prepare_attention_mask under dynamic shapes (a symbolic head count in
    repeat_interleave): still a key-padding mask, sparse, equal to eager at two lengths."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(D, 3 * D)

        def forward(self, x, keep):  # x (B, H, S, D): the head count is a size of the input
            b, h, s, _ = x.shape
            q, k, v = self.qkv(x).chunk(3, -1)
            mask = keep[:, None, :].repeat_interleave(h, dim=0).view(b, h, -1, s)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch.manual_seed(0)
    m = M().eval()
    cfg = FGAttnConfig(predictor="profile", alpha=1e-6, min_seq_len=16, block_m=16, max_density=1.0, profile_calls=(0,))
    torch._dynamo.reset()
    c = torch.compile(m, backend=fgattn_backend(cfg), dynamic=True)
    with torch.no_grad():
        for s in (48, 80):
            x = torch.randn(B, H, s, D)
            keep = torch.ones(B, s, dtype=torch.bool)
            keep[1, s - 7:] = False
            for _ in range(2):
                torch.testing.assert_close(c(x, keep), m(x, keep), atol=1e-5, rtol=1e-4)
    st = fgcompile.stats(c)
    assert st and all(v.sparse_calls >= 1 for v in st.values()), st


@torch.library.custom_op("xformers_fgtest::attention", mutates_args=())
def _opaque_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


@_opaque_kernel.register_fake
def _(q, k, v):
    return torch.empty_like(q)


def test_opaque_attention_kernels_are_reported():
    """Another library's attention kernel (an xFormers-like custom op here) and FlexAttention are
    one opaque call each: no site, and the report names them with a way out."""
    from torch.nn.attention.flex_attention import flex_attention

    def f(q, k, v):
        return torch.ops.xformers_fgtest.attention(q, k, v) + flex_attention(q, k, v)

    rep = fgcompile.explain(f, *qkv(), config=CFG)
    assert not rep.sites
    opaque = [why for _, kind, why in rep.rejected if kind == "opaque"]
    assert len(opaque) == 2 and all("F.scaled_dot_product_attention" in w for w in opaque), rep.rejected
    assert any("xformers_fgtest" in w for w in opaque) and any("flex_attention" in w for w in opaque), opaque


def test_sdpa_output_keeps_the_layout_eager_gives_it():
    """Eager SDPA returns q's memory layout: with diffusers' transposed (B, S, H, D) q the output
    is (B, S, H, D) in memory and ``.transpose(1, 2).view(B, S, -1)`` after it is legal. The
    rewritten site gives the same layout (on the CPU's contiguous op: a copy)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(128, 384)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(b, s, 3, 2, 64).unbind(2))
            o = F.scaled_dot_product_attention(q, k, v)
            return o.transpose(1, 2).view(b, s, -1)

    m, x = M().eval(), torch.randn(1, 64, 128)
    with torch.no_grad():
        ref = m(x)
        rep = fgcompile.explain(m, x, config=CFG)
        out = torch.compile(m, backend=fgattn_backend(CFG))(x)
    assert [s.decision for s in rep.sites] == ["sparse"]
    torch.testing.assert_close(out, ref)


# ============================================================================ probes of session 14
def test_a_float_attribute_scale_under_dynamic_true_says_how_to_serve_it():
    """Under dynamic=True Dynamo passes a Python float attribute (``self.scale``) as a graph input:
    the site is dense, the reason names the setting that makes it a constant, and explain(...,
    dynamic=True) reports what such a compile does; with specialize_float the site is served."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D, D)
            self.scale = D**-0.5

        def forward(self, q, k, v):
            return (self.proj(q) @ k.transpose(-2, -1) * self.scale).softmax(-1) @ v

    m = M()
    x = qkv()
    with torch.no_grad():
        static = fgcompile.explain(m, *x, config=CFG)
        torch._dynamo.reset()
        dyn = fgcompile.explain(m, *x, config=CFG, dynamic=True)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(specialize_float=True):
            spec = fgcompile.explain(m, *x, config=CFG, dynamic=True)
    assert [s.decision for s in static.sites] == ["sparse"]
    assert [s.decision for s in dyn.sites] == ["dense"]
    assert "specialize_float" in dyn.sites[0].reason
    assert [s.decision for s in spec.sites] == ["sparse"]
    with pytest.raises(ValueError, match="dynamic: expected"):
        fgcompile.explain(m, *x, config=CFG, dynamic="yes")


@pytest.mark.parametrize("spelling", ["method", "functions", "dtype"])
def test_exp_of_log_softmax_is_a_softmax(spelling):
    """``exp(log_softmax(s))`` is softmax written in logs: a site like any other spelling; the
    rewritten graph computes the same attention."""

    def f(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.125
        if spelling == "method":
            p = s.log_softmax(-1).exp()
        elif spelling == "functions":
            p = torch.exp(F.log_softmax(s, dim=-1))
        else:
            p = torch.log_softmax(s, -1, torch.float32).exp()  # dtype given positionally
        return p @ v

    x = qkv()
    r = capture(f, *x)
    assert [(s.pattern, s.decision) for s in r.sites] == [("matmul_softmax", "sparse")], r.sites
    g = r.graphs[0]
    assert len(ops(g)) == 1 and left(g) == []
    assert not any("log_softmax" in str(n.target) for n in g.graph.nodes)
    torch.testing.assert_close(r.out, f(*x), atol=1e-5, rtol=1e-4)


def test_where_fill_given_as_a_0d_tensor_is_a_key_mask():
    """``where(keep, s, torch.tensor(-inf))``: the 0-d tensor of a number is that number (a key
    mask, served); a 0-d tensor computed from the data is not a constant and the reason says so."""

    def f(q, k, v, keep):
        s = q @ k.transpose(-2, -1) * 0.125
        return torch.where(keep[:, None, None, :], s, torch.tensor(float("-inf"))).softmax(-1) @ v

    def g(q, k, v, keep):
        s = q @ k.transpose(-2, -1) * 0.125
        return torch.where(keep[:, None, None, :], s, v.amin() - 1e4).softmax(-1) @ v  # a 0-d tensor of the data

    x = qkv() + (key_keep(),)
    r = capture(f, *x)
    assert [(s.decision, s.mask) for s in r.sites] == [("sparse", "key_padding")], r.sites
    torch.testing.assert_close(r.out, f(*x), atol=1e-5, rtol=1e-4)
    r = capture(g, *x)
    assert [s.decision for s in r.sites] == ["dense"] and "not a constant number" in r.sites[0].reason, r.sites
