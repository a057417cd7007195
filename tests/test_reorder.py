"""The query order (``fgcompile.query_order``, ``FGAttnConfig(query_order="pca")``): the order
itself, the profile predictor and the compiled model in it, and its saved state."""

import os

import pytest
import torch

import fgcompile
from fgcompile import FGAttnConfig
from fgcompile.kernels.reference import dense_attention_reference, sparse_attention_reference
from fgcompile.predictors import profile_slices
from fgcompile.reorder import _levels, order_rows, query_order, restore_rows
from fgcompile.testing.metrics import rel_err
from fgcompile.testing.synthetic import make_attention_inputs
from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT, toy_inputs

os.environ["FGCOMPILE_STRICT"] = "1"

SMALL = ToyDiTConfig(depth=2, width=128, heads=2)


def _is_perm(p: torch.Tensor) -> bool:
    S = p.shape[-1]
    return p.dtype == torch.int64 and torch.equal(p.sort(-1).values, torch.arange(S).expand(p.shape))


@pytest.mark.parametrize("S,block_m", [(1000, 128), (300, 128), (128, 128), (100, 128), (2048, 64), (257, 16)])
def test_query_order_is_a_permutation_in_whole_blocks(S, block_m):
    q = torch.randn(2, 3, S, 16)
    p = query_order(q, block_m)
    assert p.shape == (2, 3, S) and _is_perm(p)
    assert torch.equal(query_order(q, block_m), p)  # deterministic
    # every split falls on a block boundary; only the last group is short
    for groups in _levels(S, block_m):
        assert all(s % block_m == 0 for s, _ in groups)
    # the layout of q does not matter (diffusers passes (B, S, H, D) views)
    assert torch.equal(query_order(q.transpose(1, 2).contiguous().transpose(1, 2), block_m), p)


def test_query_order_groups_alike_queries():
    # two kinds of query, interleaved in the model's order: every block of consecutive queries
    # holds both; in the "pca" order each block holds one kind
    g = torch.Generator().manual_seed(0)
    S, D = 1024, 32
    centres = torch.randn(2, D, generator=g) * 4
    kind = torch.arange(S) % 2
    q = (centres[kind] + 0.1 * torch.randn(S, D, generator=g))[None, None]
    p = query_order(q, 128)
    kinds = kind[p[0, 0]].reshape(-1, 128)
    assert bool(((kinds == kinds[:, :1]).all(1)).all())


def test_the_projection_finds_the_leading_principal_directions():
    # q with a planted 4-dim structure (large variances) plus small isotropic noise, and a large common
    # component: the projection's rank-4 basis spans the planted directions
    from fgcompile.reorder import _project

    g = torch.Generator().manual_seed(1)
    B, H, S, D = 2, 3, 3000, 64
    planted = torch.linalg.qr(torch.randn(B, H, D, 4, generator=g))[0]
    coef = torch.randn(B, H, S, 4, generator=g) * torch.tensor([8.0, 6.0, 4.0, 3.0])
    q = coef @ planted.transpose(-1, -2) + 0.1 * torch.randn(B, H, S, D, generator=g) + 20.0
    z = _project(q, 4)
    assert z.shape == (B, H, S, 4) and z.dtype == torch.float32
    basis = torch.linalg.lstsq(q - q.mean(2, keepdim=True), z - z.mean(2, keepdim=True)).solution  # (B, H, D, 4)
    # the basis is orthonormal and lies in the planted subspace
    torch.testing.assert_close(basis.transpose(-1, -2) @ basis, torch.eye(4).expand(B, H, 4, 4), atol=2e-3, rtol=0)
    inside = planted.transpose(-1, -2) @ basis
    torch.testing.assert_close(inside.transpose(-1, -2) @ inside, torch.eye(4).expand(B, H, 4, 4), atol=2e-3, rtol=0)
    assert torch.equal(_project(q, 64), q.float())  # rank >= D: q itself


@pytest.mark.parametrize("kind", ["constant", "rank2", "bf16"])
def test_query_order_of_degenerate_queries(kind):
    # all rows equal (no direction at all), fewer independent directions than RANK, bf16 with a large
    # common component: still a permutation in whole blocks, and alike rows still share blocks
    g = torch.Generator().manual_seed(2)
    S, D = 1024, 32
    if kind == "constant":
        q = torch.ones(1, 2, S, D)
    else:
        kinds = torch.arange(S) % 2
        q = (torch.randn(2, D, generator=g) * 4)[kinds][None, None].repeat(1, 2, 1, 1)
        q = q + (0.0 if kind == "rank2" else 0.01 * torch.randn(1, 2, S, D, generator=g)) + 50.0
        if kind == "bf16":
            q = q.bfloat16()
    p = query_order(q, 128)
    assert _is_perm(p)
    if kind != "constant":
        blocks = kinds[p].reshape(1, 2, -1, 128)
        assert bool((blocks == blocks[..., :1]).all())


def test_order_rows_and_restore_rows_are_inverse():
    t = torch.randn(2, 300, 3, 8).transpose(1, 2)  # (2, 3, 300, 8) in diffusers' (B, S, H, D) layout
    p = query_order(torch.randn(2, 3, 300, 4), 64)
    o = order_rows(t, p)
    assert torch.equal(o[1, 2, 7], t[1, 2, p[1, 2, 7]])
    back = restore_rows(o, p, like=t)
    assert torch.equal(back, t) and back.stride() == t.stride()


def test_query_order_errors():
    with pytest.raises(ValueError, match="q: expected a \\(B, H, S_q, D\\) tensor"):
        query_order(torch.randn(3, 100, 8))
    with pytest.raises(ValueError, match="block_m: expected an int >= 1"):
        query_order(torch.randn(1, 1, 100, 8), 0)
    with pytest.raises(ValueError, match="rank: expected an int >= 1"):
        query_order(torch.randn(1, 1, 100, 8), 16, rank=0)


def test_config_query_order_validation():
    assert FGAttnConfig().query_order == "none"
    with pytest.raises(ValueError, match="FGAttnConfig.query_order: expected one of"):
        FGAttnConfig(query_order="hilbert")
    with pytest.raises(ValueError, match="query_order.*predictor='pooled'"):
        FGAttnConfig(predictor="pooled", query_order="pca")


def test_the_pca_order_keeps_fewer_slices_on_the_suite():
    # the FG-Attn rule at one alpha on quality.py's CPU suite: blocks of alike queries keep 19% fewer
    # slices (0.52 of them instead of 0.64) at no more error (0.0168 against 0.0172)
    q, k, v = make_attention_inputs(8, 16, 16, heads=5, head_dim=64, seed=0)
    scale = q.shape[-1] ** -0.5
    dense = dense_attention_reference(q, k, v, scale)
    keep = profile_slices(q, k, alpha=1.0, block_m=128, scale=scale)
    err = rel_err(sparse_attention_reference(q, k, v, keep, 128, 1, scale), dense)
    p = query_order(q, 128)
    qo = order_rows(q, p)
    keep_o = profile_slices(qo, k, alpha=1.0, block_m=128, scale=scale)
    out_o = restore_rows(sparse_attention_reference(qo, k, v, keep_o, 128, 1, scale), p)
    assert keep_o.float().mean() < 0.85 * keep.float().mean()
    assert rel_err(out_o, dense) <= err


def _compiled(order, **kw):
    cfg = FGAttnConfig(min_seq_len=64, block_m=64, query_order=order, **kw)
    return torch.compile(ToyVideoDiT(SMALL, seed=3).eval(), backend=fgcompile.backend(cfg))


def test_compiled_model_in_the_pca_order():
    from fgcompile import runtime

    x = toy_inputs(SMALL, 1, 4, 32, 0)  # 1,024 tokens: 16 query blocks
    with torch.no_grad():
        ref = ToyVideoDiT(SMALL, seed=3).eval()(*x)
    errs, dens = {}, {}
    for order in ("none", "pca"):
        c = _compiled(order)
        with torch.no_grad():
            first = c(*x)  # profiled: exact
            second = c(*x)  # sparse, in the mask's order
        torch.testing.assert_close(first, ref, rtol=1e-4, atol=1e-4)
        errs[order] = rel_err(second, ref)
        dens[order] = sum(s.mean_density for s in fgcompile.stats(c).values())
        sites = runtime.state_of(c).sites.values()
        assert all((s.order is not None) == (order == "pca") for s in sites)
        if order == "pca":
            assert all(s.order.dtype == torch.int32 and s.order.shape == (1, SMALL.heads, 1024) for s in sites)
            assert all(st.order_bytes == 4 * SMALL.heads * 1024 for st in fgcompile.stats(c).values())
    assert 0 < errs["pca"] < 0.05 and dens["pca"] < dens["none"]
    # reset and a configure() that changes the order drop the mask and its order
    fgcompile.configure(c, query_order="none")
    assert all(s.order is None and s.mask is None for s in runtime.state_of(c).sites.values())
    with torch.no_grad():
        c(*x)
    assert all(s.order is None for s in runtime.state_of(c).sites.values())


def test_site_sparse_call_matches_the_reference_in_its_order():
    from fgcompile import runtime

    q, k, v = make_attention_inputs(2, 16, 16, heads=2, head_dim=32, seed=2)
    scale = q.shape[-1] ** -0.5
    site = runtime.SiteState("s", FGAttnConfig(min_seq_len=64, block_m=64, query_order="pca", alpha=0.5))
    exact = site(q, k, v, None, scale)  # profiled
    torch.testing.assert_close(exact, dense_attention_reference(q, k, v, scale), rtol=1e-4, atol=1e-5)
    got = site(q, k, v, None, scale)  # sparse
    p = query_order(q, 64)
    assert torch.equal(site.order.long(), p)
    qo = order_rows(q, p)
    want = restore_rows(sparse_attention_reference(qo, k, v, profile_slices(qo, k, alpha=0.5, block_m=64, scale=scale),
                                                   64, 1, scale), p)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_site_in_the_pca_order_with_gqa_and_key_padding():
    # 4 query heads over 2 key/value heads, the last 40 keys of item 1 padded: the order is per
    # query head, the padding applies to the keys, and every row comes back in place
    from fgcompile import runtime

    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 640, 32, generator=g)
    k, v = (torch.randn(2, 2, 640, 32, generator=g) for _ in range(2))
    kp = torch.ones(2, 640, dtype=torch.bool)
    kp[1, -40:] = False
    scale = 32 ** -0.5
    site = runtime.SiteState("s", FGAttnConfig(min_seq_len=64, block_m=64, query_order="pca", alpha=2.0, max_density=1.0))
    site(q, k, v, kp, scale)  # profiled
    got = site(q, k, v, kp, scale)
    p = query_order(q, 64)
    qo = order_rows(q, p)
    keep = profile_slices(qo, k, alpha=2.0, block_m=64, scale=scale, key_padding=kp)
    torch.testing.assert_close(got, restore_rows(sparse_attention_reference(qo, k, v, keep, 64, 1, scale), p),
                               rtol=1e-4, atol=1e-5)
    assert site.order.shape == (2, 4, 640) and site.n_sparse == 1


def test_save_load_keeps_the_order(tmp_path):
    x = toy_inputs(SMALL, 1, 2, 16, 0)
    ca = _compiled("pca", profile_every=50)
    with torch.no_grad():
        ca(*x)
        expected = ca(*x)
    path = tmp_path / "state.pt"
    fgcompile.save_state(ca, str(path))
    cb = _compiled("none", profile_every=50)
    with torch.no_grad():
        cb(*toy_inputs(SMALL, 1, 2, 16, 5))
        fgcompile.load_state(cb, str(path))  # the file's query_order replaces the model's
        got = cb(*x)
    torch.testing.assert_close(got, expected)

    def corrupt(edit, match):
        blob = torch.load(str(path), weights_only=True)
        edit(next(e for e in blob["sites"].values() if e["order"] is not None))
        bad = tmp_path / "bad.pt"
        torch.save(blob, str(bad))
        with pytest.raises(ValueError, match=match):
            fgcompile.load_state(cb, str(bad))

    corrupt(lambda e: e.update(order=None), "should come with its query order")
    corrupt(lambda e: e["config"].update(query_order="none"), "should come with its query order")
    corrupt(lambda e: e.update(order=e["order"][..., :10]), "int32 permutation")
    corrupt(lambda e: e.update(order=torch.zeros_like(e["order"])), "int32 permutation")
    corrupt(lambda e: e.update(order=e["order"].long()), "int32 permutation")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_model_in_the_pca_order_cuda():
    # the lowered path: a sparse call of a reordered site runs its kernel inside site_plan
    cfg = dict(min_seq_len=64, block_m=64)
    model = ToyVideoDiT(SMALL, seed=3).cuda().eval()
    x = [t.cuda() for t in toy_inputs(SMALL, 1, 2, 16, 0)]
    outs = {}
    for order in ("none", "pca"):
        c = torch.compile(model, backend=fgcompile.backend(FGAttnConfig(query_order=order, **cfg)))
        with torch.no_grad():
            c(*x)
            outs[order] = c(*x)
        st = fgcompile.stats(c)
        assert all(s.sparse_calls == 1 and s.fallback is None for s in st.values())
        if order == "pca":
            assert all(s.direct_calls == 1 for s in st.values())
        fgcompile.reset(c)
        torch._dynamo.reset()
    with torch.no_grad():
        ref = model(*x)
    assert rel_err(outs["pca"], ref) < 0.05
    assert rel_err(outs["pca"], ref) <= 1.5 * rel_err(outs["none"], ref) + 1e-3
