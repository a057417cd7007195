"""Detection, decisions and compiled-vs-eager on real model code: diffusers Wan, CogVideoX,
HunyuanVideo, LTX-Video and Flux transformers and a transformers ViT, all from tiny configs with
random weights (no downloads).

Each model is compiled once (module-scoped fixture) with
``fgcompile.backend(predictor="dense", min_seq_len=64)`` (imported from ``fgcompile.backend``) and ``fullgraph=True`` (a graph break
fails the compile): the rewritten graph runs fgcompile's op on its dense path, which must match
eager. ``fgcompile.explain`` gives the sites and decisions, checked exactly.
"""

import os

import pytest
import torch

import fgcompile
from fgcompile.testing.metrics import rel_err
from fgcompile import FGAttnConfig
from fgcompile.dynamo_backend import backend as fgattn_backend

os.environ["FGCOMPILE_STRICT"] = "1"

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CFG = FGAttnConfig(predictor="dense", min_seq_len=64)


def _gen():
    return torch.Generator().manual_seed(1)


def build_wan():
    torch.manual_seed(0)
    m = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=32,
    ).eval()
    g = _gen()
    args = (torch.randn(1, 4, 2, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 8, 32, generator=g))
    return m, args, {"return_dict": False}


def build_cogvideox():
    torch.manual_seed(0)
    m = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=5, patch_size=2,
        max_text_seq_length=8,
    ).eval()
    g = _gen()
    args = (torch.randn(1, 2, 4, 16, 16, generator=g), torch.randn(1, 8, 32, generator=g), torch.tensor([500]))
    return m, args, {"return_dict": False}


def build_hunyuan():
    torch.manual_seed(0)
    m = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(16, 24, 24), guidance_embeds=False,
    ).eval()
    g = _gen()
    text_mask = torch.ones(1, 8, dtype=torch.long)
    text_mask[:, 5:] = 0  # 3 padded text tokens: a key-padding mask on the joint sequence
    args = (
        torch.randn(1, 4, 2, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 8, 32, generator=g),
        text_mask, torch.randn(1, 16, generator=g),
    )
    return m, args, {"return_dict": False}


def build_ltx():
    torch.manual_seed(0)
    m = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=64, cross_attention_dim=128,
        num_layers=2, caption_channels=32,
    ).eval()
    g = _gen()
    text_mask = torch.ones(1, 8, dtype=torch.long)
    text_mask[:, 6:] = 0
    args = (torch.randn(1, 128, 8, generator=g), torch.randn(1, 8, 32, generator=g), torch.tensor([500]), text_mask)
    return m, args, {"num_frames": 2, "height": 8, "width": 8, "return_dict": False}


def build_flux():
    torch.manual_seed(0)
    m = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(16, 24, 24),
    ).eval()
    g = _gen()
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(16.0), indexing="ij"), -1)
    args = (
        torch.randn(1, 128, 16, generator=g), torch.randn(1, 8, 32, generator=g), torch.randn(1, 16, generator=g),
        torch.tensor([0.5]), ids.reshape(-1, 3), torch.zeros(8, 3),
    )
    return m, args, {"return_dict": False}


def build_vit(impl):
    torch.manual_seed(0)
    c = transformers.ViTConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=32,
        patch_size=4, num_channels=3, attn_implementation=impl,
    )
    m = transformers.ViTModel(c, add_pooling_layer=False).eval()
    return m, (torch.randn(2, 3, 32, 32, generator=_gen()),), {}


def _first(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return out


class Result:
    def __init__(self, model, report, ref, out, stats):
        self.model, self.report, self.ref, self.out, self.stats = model, report, ref, out, stats


def _run(builder, *a):
    model, args, kwargs = builder(*a)
    with torch.no_grad():
        report = fgcompile.explain(model, *args, config=CFG, **kwargs)
        ref = _first(model(*args, **kwargs))
        compiled = torch.compile(model, backend=fgattn_backend(CFG), fullgraph=True)
        out = _first(compiled(*args, **kwargs))
    return Result(model, report, ref, out, fgcompile.stats(compiled))


BUILDERS = {
    "wan": (build_wan,),
    "cogvideox": (build_cogvideox,),
    "hunyuan": (build_hunyuan,),
    "ltx": (build_ltx,),
    "flux": (build_flux,),
    "vit_sdpa": (build_vit, "sdpa"),
    "vit_eager": (build_vit, "eager"),
}

# name -> [(site name, pattern, mask, decision, reason fragment)]
EXPECTED = {
    "wan": [
        ("blocks.0.attn1", "sdpa", "none", "sparse", "self-attention 128x128"),
        ("blocks.0.attn2", "sdpa", "none", "dense", "seq_len_kv 8 < min_seq_len 64"),
        ("blocks.1.attn1", "sdpa", "none", "sparse", "self-attention 128x128"),
        ("blocks.1.attn2", "sdpa", "none", "dense", "seq_len_kv 8 < min_seq_len 64"),
    ],
    "cogvideox": [  # joint text + video attention: 8 + 128 tokens
        ("transformer_blocks.0.attn1", "sdpa", "none", "sparse", "self-attention 136x136"),
        ("transformer_blocks.1.attn1", "sdpa", "none", "sparse", "self-attention 136x136"),
    ],
    "hunyuan": [
        ("context_embedder.token_refiner.refiner_blocks.0.attn", "sdpa", "other", "dense",
         "attn_mask of shape (1, 2, 8, 8) is not a key-padding mask"),
        ("transformer_blocks.0.attn", "sdpa", "key_padding", "sparse", "key-padding mask folded"),
        ("single_transformer_blocks.0.attn", "sdpa", "key_padding", "sparse", "key-padding mask folded"),
    ],
    "ltx": [
        ("transformer_blocks.0.attn1", "sdpa", "none", "sparse", "self-attention 128x128"),
        ("transformer_blocks.0.attn2", "sdpa", "other", "dense", "float additive mask"),
        ("transformer_blocks.1.attn1", "sdpa", "none", "sparse", "self-attention 128x128"),
        ("transformer_blocks.1.attn2", "sdpa", "other", "dense", "float additive mask"),
    ],
    "flux": [
        ("transformer_blocks.0.attn", "sdpa", "none", "sparse", "self-attention 136x136"),
        ("single_transformer_blocks.0.attn", "sdpa", "none", "sparse", "self-attention 136x136"),
    ],
    "vit_sdpa": [
        ("layers.0.attention", "sdpa", "none", "sparse", "self-attention 65x65"),
        ("layers.1.attention", "sdpa", "none", "sparse", "self-attention 65x65"),
    ],
    "vit_eager": [
        ("layers.0.attention", "matmul_softmax", "none", "sparse", "self-attention 65x65"),
        ("layers.1.attention", "matmul_softmax", "none", "sparse", "self-attention 65x65"),
    ],
}

_CACHE = {}


@pytest.fixture(scope="module", params=list(BUILDERS))
def result(request):
    name = request.param
    if name not in _CACHE:
        builder, *a = BUILDERS[name]
        _CACHE[name] = Result.__new__(Result)
        _CACHE[name] = _run(builder, *a)
    return name, _CACHE[name]


def test_sites_and_decisions(result):
    name, r = result
    got = [(s.name, s.pattern, s.mask, s.decision) for s in r.report.sites]
    assert got == [e[:4] for e in EXPECTED[name]], r.report.table()
    for s, e in zip(r.report.sites, EXPECTED[name]):
        assert e[4] in s.reason, (s.name, s.reason)
        assert s.head_dim == 64 and s.dtype == "float32" and s.num_heads == s.num_kv_heads == 2
        assert not s.is_causal
    modules = dict(r.model.named_modules())
    assert all(s.name in modules for s in r.report.sites)
    assert r.report.graph_breaks == 0 and len(r.report.graphs) == 1


def test_rewritten_graph_has_one_op_per_sparse_site(result):
    name, r = result
    n_sparse = sum(e[3] == "sparse" for e in EXPECTED[name])
    g = r.report.graph.graph
    ops = [n for n in g.nodes if n.target is torch.ops.fgcompile.site_attention.default]
    assert len(ops) == n_sparse
    sdpa = [n for n in g.nodes if n.target is torch.nn.functional.scaled_dot_product_attention]
    softmax = [n for n in g.nodes if "softmax" in str(n.target)]
    n_dense = len(EXPECTED[name]) - n_sparse
    assert len(sdpa) + len(softmax) == n_dense


def test_compiled_matches_eager_without_graph_breaks(result):
    name, r = result
    # fullgraph=True in the fixture: a graph break would have raised there
    torch.testing.assert_close(r.out, r.ref, rtol=2e-4, atol=2e-4)
    sparse = sorted(e[0] for e in EXPECTED[name] if e[3] == "sparse")
    assert sorted(r.stats) == sparse
    assert all(s.calls == 1 and s.dense_calls == 1 and s.sparse_calls == 0 for s in r.stats.values())


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_hunyuan_sparse_path_never_attends_padded_text(impl):
    """The key-padding sites on their sparse path (the Triton kernel under the interpreter, or the
    reference): with alpha tiny every real key is kept and the padded text keys never are, so the
    sparse calls equal eager masked attention; with alpha large they differ."""
    model, args, kwargs = build_hunyuan()
    with torch.no_grad():
        ref = _first(model(*args, **kwargs))
        outs = {}
        for alpha in (1e-9, 50.0):
            model, args, kwargs = build_hunyuan()  # same seeded weights, fresh state
            cfg = FGAttnConfig(min_seq_len=64, block_m=64, alpha=alpha, profile_every=100, impl=impl, max_density=1.0)
            compiled = torch.compile(model, backend=fgattn_backend(cfg), fullgraph=True)
            first = _first(compiled(*args, **kwargs))  # profiled: dense, exact
            torch.testing.assert_close(first, ref, rtol=2e-4, atol=2e-4)
            outs[alpha] = _first(compiled(*args, **kwargs))  # sparse, with the profiled mask
            st = fgcompile.stats(compiled)
            assert sorted(st) == ["single_transformer_blocks.0.attn", "transformer_blocks.0.attn"]
            assert all(s.sparse_calls == 1 and s.fallback is None for s in st.values())
            if alpha < 1:  # all 133 real keys of 136 kept, the 3 padded ones never
                assert all(abs(d - 133 / 136) < 1e-6 for s in st.values() for d in s.density_last)
    torch.testing.assert_close(outs[1e-9], ref, rtol=2e-4, atol=2e-4)
    assert rel_err(outs[50.0], ref) > 1e-3


@pytest.mark.parametrize("name", ["wan", "cogvideox", "hunyuan", "ltx", "flux", "vit_eager"])
def test_sparse_path_on_real_models(name):
    """Each model compiled with the profile predictor (alpha 3: a real part of the slices is
    skipped): the profiled calls are exact, the sparse call between them is close to eager and not
    equal to it, and no site falls back to dense attention."""
    torch._dynamo.reset()
    builder, *a = BUILDERS[name]
    m, args, kw = builder(*a)
    cfg = FGAttnConfig(predictor="profile", alpha=3.0, min_seq_len=64, block_m=64, max_density=1.0, profile_every=2)
    with torch.no_grad():
        ref = _first(m(*args, **kw)).float()
        c = torch.compile(m, backend=fgattn_backend(cfg), fullgraph=True)
        errs = [rel_err(_first(c(*args, **kw)), ref) for _ in range(3)]
    assert errs[0] < 1e-5 and errs[2] < 1e-5, errs  # calls 0 and 2 are profiled: dense attention
    assert 1e-5 < errs[1] < 0.15, errs  # call 1 runs the cached masks (a wrong kernel or mask gives ~1)
    st = fgcompile.stats(c)
    assert st and all(s.fallback is None and (s.profiled_calls, s.sparse_calls) == (2, 1) for s in st.values())
    assert all(s.mean_density < 0.95 for s in st.values()), {k: s.mean_density for k, s in st.items()}


def build_hunyuan15():
    torch.manual_seed(0)
    m = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=32,
        image_embed_dim=32, rope_axes_dim=(16, 24, 24),
    ).eval()
    g = _gen()
    m1 = torch.ones(1, 8, dtype=torch.long)
    m1[:, 6:] = 0
    m2 = torch.ones(1, 4, dtype=torch.long)
    m2[:, 3:] = 0
    kw = dict(
        hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g), encoder_attention_mask=m1,
        encoder_hidden_states_2=torch.randn(1, 4, 32, generator=g), encoder_attention_mask_2=m2,
        image_embeds=torch.randn(1, 4, 32, generator=g), return_dict=False,
    )
    return m, kw


def test_hunyuan15_joint_attention_with_padded_text_is_sparse():
    """HunyuanVideo-1.5 masks its joint attention with ``pad & pad.transpose`` (padded text and
    image tokens, as keys and as queries): its blocks are key-padding sites, sparse, and the
    compiled model equals eager with every slice kept and is close to it with slices skipped."""
    torch._dynamo.reset()
    m, kw = build_hunyuan15()
    rep = fgcompile.explain(m, config=FGAttnConfig(min_seq_len=64, block_m=64), **kw)
    main = [s for s in rep.sites if s.seq_len_q == 144]  # video 128 + text 8 + text_2 4 + image 4 tokens
    assert main and all((s.mask, s.decision) == ("key_padding", "sparse") for s in main), rep.table()
    with torch.no_grad():
        ref = _first(m(**kw)).float()
        for alpha, bound in ((1e-9, 1e-5), (3.0, 0.15)):
            torch._dynamo.reset()
            cfg = FGAttnConfig(min_seq_len=64, block_m=64, alpha=alpha, max_density=1.0, profile_every=100)
            c = torch.compile(m, backend=fgattn_backend(cfg))
            errs = [rel_err(_first(c(**kw)), ref) for _ in range(2)]  # profiled (exact), then sparse
            assert errs[0] < 1e-5 and errs[1] < bound, (alpha, errs)
            st = fgcompile.stats(c)
            assert st and all(s.sparse_calls == 1 and s.fallback is None for s in st.values()), st
