"""The predictor schedule inside compiled models: profiled calls, warm-up, reset, per-model state,
stats, and saving/loading calibrated state."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fgcompile
from fgcompile.testing.metrics import rel_err
from fgcompile import FGAttnConfig
from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT, toy_inputs

os.environ["FGCOMPILE_STRICT"] = "1"

SMALL = ToyDiTConfig(depth=2, width=128, heads=2)
SITES = ["blocks.0.attn", "blocks.1.attn"]


def _inputs(batch=1, frames=2, hw=16, seed=0):
    return toy_inputs(SMALL, batch, frames, hw, seed)


def _cfg(**kw):
    base = dict(min_seq_len=64, block_m=64)
    base.update(kw)
    return FGAttnConfig(**base)




def _counts(c):
    return {n: (s.calls, s.dense_calls, s.profiled_calls, s.sparse_calls) for n, s in fgcompile.stats(c).items()}


def test_profile_schedule_and_reset():
    model = ToyVideoDiT(SMALL).eval()
    c = torch.compile(model, backend=fgcompile.backend(_cfg(profile_every=3, dense_calls=1)))
    x = _inputs()
    with torch.no_grad():
        for _ in range(8):
            c(*x)
    # call 0 dense (warm-up); profiled at 1, 4, 7; sparse at 2, 3, 5, 6
    assert _counts(c) == {n: (8, 1, 3, 4) for n in SITES}
    fgcompile.reset(c)
    assert _counts(c) == {n: (0, 0, 0, 0) for n in SITES}
    with torch.no_grad():
        c(*x)
        c(*x)
    assert _counts(c) == {n: (2, 1, 1, 0) for n in SITES}


def test_dense_sites_and_dense_predictor():
    model = ToyVideoDiT(SMALL).eval()
    x = _inputs()
    report = fgcompile.explain(model, *x, config=_cfg(dense_sites=("blocks.1.*",)))
    by_name = {s.name: s for s in report.sites}
    assert by_name["blocks.0.attn"].decision == "sparse"
    assert by_name["blocks.1.attn"].decision == "dense" and "dense_sites" in by_name["blocks.1.attn"].reason


def test_two_models_never_share_state():
    a, b = ToyVideoDiT(SMALL, seed=1).eval(), ToyVideoDiT(SMALL, seed=2).eval()
    be = fgcompile.backend(_cfg(profile_every=2))
    ca, cb = torch.compile(a, backend=be), torch.compile(b, backend=be)
    x = _inputs()
    with torch.no_grad():
        ra, rb = a(*x), b(*x)
        oa = ca(*x)
        ca(*x)
        ca(*x)
        ob = cb(*x)  # b's first call: profiled (exact), though a is in its schedule already
    torch.testing.assert_close(oa, ra, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ob, rb, rtol=1e-4, atol=1e-4)
    assert _counts(ca) == {n: (3, 0, 2, 1) for n in SITES}
    assert _counts(cb) == {n: (1, 0, 1, 0) for n in SITES}


def test_shape_change_reprofiles():
    model = ToyVideoDiT(SMALL).eval()
    c = torch.compile(model, backend=fgcompile.backend(_cfg(profile_every=100)))
    with torch.no_grad():
        c(*_inputs(frames=2))
        c(*_inputs(frames=2))
        x3 = _inputs(frames=3)
        out = c(*x3)  # a new shape: a fresh profile (exact), never the stale mask
        torch.testing.assert_close(out, model(*x3), rtol=1e-4, atol=1e-4)
    assert _counts(c) == {n: (3, 0, 2, 1) for n in SITES}


def test_stats_densities():
    model = ToyVideoDiT(SMALL).eval()
    c = torch.compile(model, backend=fgcompile.backend(_cfg()))
    with torch.no_grad():
        c(*_inputs())
        c(*_inputs())
    for s in fgcompile.stats(c).values():
        assert len(s.density_last) == SMALL.heads and len(s.density_mean) == SMALL.heads
        assert all(0.0 < d < 1.0 for d in s.density_last)
        assert 0 < s.mean_density < 1
    with pytest.raises(ValueError, match="model"):
        fgcompile.stats(ToyVideoDiT(SMALL))


def test_error_shrinks_with_alpha():
    model = ToyVideoDiT(SMALL).eval()
    x = _inputs(batch=2)
    errs, dens = [], []
    with torch.no_grad():
        ref = model(*x)
        for alpha in (4.0, 0.5, 0.05):
            c = torch.compile(model, backend=fgcompile.backend(_cfg(alpha=alpha)))
            c(*x)  # profiled
            out = c(*x)  # sparse with that mask
            errs.append(rel_err(out, ref))
            dens.append(sum(s.mean_density for s in fgcompile.stats(c).values()))
    assert errs[0] > errs[1] > errs[2], errs
    assert dens[0] < dens[1] < dens[2], dens


def test_pooled_predictor_runs_every_call():
    model = ToyVideoDiT(SMALL).eval()
    c = torch.compile(model, backend=fgcompile.backend(_cfg(predictor="pooled", tau=0.95)))
    x = _inputs()
    with torch.no_grad():
        ref = model(*x)
        out = c(*x)
        c(*x)
    assert _counts(c) == {n: (2, 0, 0, 2) for n in SITES}
    assert rel_err(out, ref) < 0.2


@pytest.mark.parametrize("density", [None, 0.3])
def test_save_load_round_trip(tmp_path, density):
    x = _inputs()
    cfg = _cfg(profile_every=50, density=density)
    a = ToyVideoDiT(SMALL, seed=3).eval()
    ca = torch.compile(a, backend=fgcompile.backend(cfg))
    with torch.no_grad():
        ca(*x)  # profiled: calibrates the masks
        expected = ca(*x)  # sparse with the calibrated masks
    path = tmp_path / "state.pt"
    fgcompile.save_state(ca, str(path))

    b = ToyVideoDiT(SMALL, seed=3).eval()
    cb = torch.compile(b, backend=fgcompile.backend(cfg))
    with torch.no_grad():
        cb(*_inputs(seed=5))  # creates the sites (profiles other inputs)
        fgcompile.load_state(cb, str(path))
        got = cb(*x)  # call 1 again: sparse with the loaded masks
    torch.testing.assert_close(got, expected)
    # the loaded counters continue from a's (1 profiled, 1 sparse call), plus this sparse call
    for (na, sa), (nb, sb) in zip(fgcompile.stats(ca).items(), fgcompile.stats(cb).items()):
        assert na == nb and (sb.calls, sb.profiled_calls, sb.sparse_calls) == (3, 1, 2)
    # a loaded mask's index bound is its largest row (counted at load time), within the budget
    from fgcompile import predictors, runtime
    from fgcompile.kernels.packing import popcount_rows

    for site in runtime.state_of(cb).sites.values():
        if site.mask is None:
            continue
        n_kb = site.mask_key[1][2]  # block_n = 1
        assert site.mask_cap == int(popcount_rows(site.mask).max())
        assert site.mask_cap <= predictors.density_budget(n_kb, density)


def test_load_state_mismatch_errors(tmp_path):
    x = _inputs()
    ca = torch.compile(ToyVideoDiT(SMALL).eval(), backend=fgcompile.backend(_cfg()))
    with torch.no_grad():
        ca(*x)
    path = tmp_path / "state.pt"
    fgcompile.save_state(ca, str(path))

    deeper = torch.compile(ToyVideoDiT(ToyDiTConfig(depth=3, width=128, heads=2)).eval(), backend=fgcompile.backend(_cfg()))
    with torch.no_grad():
        deeper(*x)
    with pytest.raises(ValueError, match="sites do not match"):
        fgcompile.load_state(deeper, str(path))

    other_shape = torch.compile(ToyVideoDiT(SMALL).eval(), backend=fgcompile.backend(_cfg()))
    with torch.no_grad():
        other_shape(*_inputs(frames=3))
    with pytest.raises(ValueError, match="shape"):
        fgcompile.load_state(other_shape, str(path))

    bogus = tmp_path / "bogus.pt"
    torch.save({"hello": 1}, str(bogus))
    with pytest.raises(ValueError, match="not an fgcompile state file"):
        fgcompile.load_state(ca, str(bogus))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="not an fgcompile state file"):
        fgcompile.load_state(ca, str(garbage))
    with pytest.raises(ValueError, match="path: expected a file path"):
        fgcompile.save_state(ca, None)

    # malformed entries: each a clear ValueError naming the site, and nothing loaded
    def corrupt(edit, match):
        blob = torch.load(str(path), weights_only=True)
        name = next(n for n, e in blob["sites"].items() if e["mask_bits"] is not None)
        edit(blob["sites"][name])
        bad = tmp_path / "bad.pt"
        torch.save(blob, str(bad))
        before = {n: (s.calls, s.mask) for n, s in fgcompile.runtime.state_of(ca).sites.items()}
        with pytest.raises(ValueError, match=match):
            fgcompile.load_state(ca, str(bad))
        after = {n: (s.calls, s.mask) for n, s in fgcompile.runtime.state_of(ca).sites.items()}
        assert after == before

    corrupt(lambda e: e.update(mask_bits=e["mask_bits"][..., :1]), "mask should be an int32 bitmap of shape")
    corrupt(lambda e: e.update(mask_bits=e["mask_bits"].to(torch.int64)), "int32 bitmap")
    corrupt(lambda e: e.pop("calls"), "expected an entry with")
    corrupt(lambda e: e["config"].update(newfield=1), "unknown FGAttnConfig field\\(s\\) \\['newfield'\\]")
    corrupt(lambda e: e["config"].update(alpha=-1.0), "config is not valid")
    corrupt(lambda e: e.update(counts=[1, 2]), "counts should be 3 ints")
    corrupt(lambda e: e.update(mask_key=[[1, 2], [1], 32, 1]), "mask_key should be")


def test_load_state_warns_when_the_files_settings_replace_the_models(tmp_path, caplog):
    x = _inputs()
    ca = torch.compile(ToyVideoDiT(SMALL).eval(), backend=fgcompile.backend(_cfg(alpha=0.5)))
    cb = torch.compile(ToyVideoDiT(SMALL).eval(), backend=fgcompile.backend(_cfg(alpha=0.2)))
    with torch.no_grad():
        ca(*x)
        cb(*x)
    path = tmp_path / "state.pt"
    fgcompile.save_state(ca, str(path))
    with caplog.at_level("WARNING", logger="fgcompile"):
        fgcompile.load_state(cb, str(path))
    assert any("replace the model's for ['alpha']" in r.getMessage() for r in caplog.records), caplog.records
    assert all(s.config.alpha == 0.5 for s in fgcompile.runtime.state_of(cb).sites.values())


def _regional(depth: int, **cfg):
    """A toy DiT of ``depth`` blocks, each compiled on its own (diffusers' compile_repeated_blocks
    does this) with one fgattn backend of ``_cfg(**cfg)``."""
    model = ToyVideoDiT(ToyDiTConfig(depth=depth, width=128, heads=2)).eval()
    be = fgcompile.backend(_cfg(**cfg))
    for blk in model.blocks:
        blk.compile(backend=be)
    return model


def test_regional_compilation_names_sites_by_full_path():
    model = _regional(3, profile_every=2)
    x = _inputs()
    with torch.no_grad():
        model(*x)
        model(*x)
    st = fgcompile.stats(model)
    assert list(st) == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert all((s.calls, s.profiled_calls, s.sparse_calls) == (2, 1, 1) for s in st.values())


class _DirectBlock(nn.Module):
    """A block that calls SDPA in its own forward (no attention submodule): twice, with a residual
    (``twice``), or once, returning the attention alone."""

    def __init__(self, twice: bool = True):
        super().__init__()
        self.qkv = nn.Linear(128, 384)
        self.twice = twice

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 64).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        if not self.twice:
            return o.transpose(1, 2).reshape(b, s, -1)
        o = F.scaled_dot_product_attention(o, k, v)
        return x + o.transpose(1, 2).reshape(b, s, -1)


class _DirectNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_DirectBlock(), _DirectBlock()])

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


def test_sites_in_a_block_forward_have_one_name_whole_or_regional(tmp_path):
    """SDPA called in a block's own forward is named by the block's path (``blocks.0``,
    ``blocks.0#1``) whether the whole model or each block is compiled, so state saved under one
    loads under the other."""
    torch.manual_seed(0)
    x = torch.randn(1, 256, 128)
    cfg = _cfg(profile_every=100)
    whole = _DirectNet().eval()
    c = torch.compile(whole, backend=fgcompile.backend(cfg))
    with torch.no_grad():
        c(x)
    names = ["blocks.0", "blocks.0#1", "blocks.1", "blocks.1#1"]
    assert sorted(fgcompile.stats(c)) == names
    fgcompile.save_state(c, tmp_path / "s.pt")
    torch._dynamo.reset()
    regional = _DirectNet().eval()
    regional.load_state_dict(whole.state_dict())
    be = fgcompile.backend(cfg)
    for blk in regional.blocks:
        blk.compile(backend=be)
    with torch.no_grad():
        regional(x)
    assert sorted(fgcompile.stats(regional)) == names
    fgcompile.load_state(regional, tmp_path / "s.pt")
    with torch.no_grad():
        torch.testing.assert_close(regional(x), c(x))


def test_configure_changes_runtime_settings_without_recompiling():
    model = ToyVideoDiT(SMALL).eval()
    c = torch.compile(model, backend=fgcompile.backend(_cfg(profile_every=100)))
    x = _inputs()
    with torch.no_grad():
        c(*x)
        c(*x)
        dense_before = {n: s.density_last for n, s in fgcompile.stats(c).items()}
        fgcompile.configure(c, density=0.1)
        c(*x)  # the budget changes the mask: re-profiled at once (exact), then sparse
        c(*x)
    for n, s in fgcompile.stats(c).items():
        assert s.profiled_calls == 2
        assert max(s.density_last) <= 0.11 < max(dense_before[n])  # ceil(0.1 * n_keys) per query block
    with pytest.raises(ValueError, match="min_seq_len"):
        fgcompile.configure(c, min_seq_len=8)
    with pytest.raises(ValueError, match="FGAttnConfig.alpha"):
        fgcompile.configure(c, alpha=-1.0)
    with pytest.raises(ValueError, match="^foo: not an FGAttnConfig field"):
        fgcompile.configure(c, foo=1)


def test_failing_sparse_path_falls_back_to_dense(monkeypatch):
    import fgcompile.attention as attention

    def boom(*args, **kwargs):
        raise RuntimeError("synthetic kernel failure")

    model = ToyVideoDiT(SMALL).eval()
    c = torch.compile(model, backend=fgcompile.backend(_cfg(profile_every=100)))
    x = _inputs()
    with torch.no_grad():
        c(*x)  # profiled
        monkeypatch.setattr(attention, "sparse_attention", boom)
        with pytest.raises(RuntimeError, match="synthetic"):  # the suite runs strict
            c(*x)
        monkeypatch.delenv("FGCOMPILE_STRICT")
        out = c(*x)  # falls back: dense, exact
        torch.testing.assert_close(out, model(*x), rtol=1e-4, atol=1e-4)
        c(*x)
    st = fgcompile.stats(c)
    for s in st.values():
        assert s.fallback is not None and "synthetic kernel failure" in s.fallback
    # the strict failure stopped the forward at blocks.0, before blocks.1 ran
    assert (st["blocks.0.attn"].calls, st["blocks.0.attn"].sparse_calls, st["blocks.0.attn"].dense_calls) == (4, 0, 2)
    assert (st["blocks.1.attn"].calls, st["blocks.1.attn"].sparse_calls, st["blocks.1.attn"].dense_calls) == (3, 0, 2)
    # a new setting gives the sparse path a fresh try (here it works again)
    monkeypatch.undo()
    monkeypatch.delenv("FGCOMPILE_STRICT", raising=False)
    fgcompile.configure(c, alpha=0.4)
    with torch.no_grad():
        c(*x)  # the alpha change drops the mask: profiled
        c(*x)  # sparse
    for s in fgcompile.stats(c).values():
        assert s.fallback is None and s.sparse_calls == 1
    monkeypatch.setenv("FGCOMPILE_STRICT", "1")


def test_too_dense_masks_run_dense_until_the_next_profile():
    model = ToyVideoDiT(SMALL).eval()
    x = _inputs()
    with torch.no_grad():
        ref = model(*x)
        # alpha tiny: every slice is kept (density 1.0 > max_density 0.8): dense, exact
        c = torch.compile(model, backend=fgcompile.backend(_cfg(alpha=1e-9, profile_every=3)))
        for _ in range(4):
            out = c(*x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert _counts(c) == {n: (4, 2, 2, 0) for n in SITES}  # profiled at 0 and 3, dense at 1 and 2
        assert all(min(s.density_last) > 0.8 for s in fgcompile.stats(c).values())  # the last call profiled
        fgcompile.configure(c, max_density=1.0)  # never switch: the same masks run sparse
        fgcompile.reset(c)
        c(*x)
        c(*x)
        assert _counts(c) == {n: (2, 0, 1, 1) for n in SITES}


def test_plan_site_survives_a_failed_packing_of_the_profiled_mask(monkeypatch, caplog):
    from fgcompile import runtime

    h = runtime.register_site("runtime.plan_packing", _cfg(profile_every=100))
    q, k, v = torch.randn(1, 2, 128, 64), torch.randn(1, 2, 128, 64), torch.randn(1, 2, 128, 64)
    out, packed = runtime.plan_site(h, q, k, v, None, 0.125)  # profiled: exact output + the mask's packing
    assert out is not None and packed is not None
    site = runtime._site(h, None)
    site.calls = 100  # the next profiled call: exact output, no packing (the kernel keeps nothing)
    out, packed = runtime.plan_site(h, q, k, v, None, 0.125)
    assert site.n_profiled == 2 and out is not None and packed is None

    def boom(self, bits, k, index_cap=None):
        raise RuntimeError("synthetic packing failure")

    monkeypatch.setattr(runtime.SiteState, "packed", boom)
    site.reset()
    with caplog.at_level("WARNING", logger="fgcompile"):
        out, packed = runtime.plan_site(h, q, k, v, None, 0.125)  # profiled again: packing fails
    assert packed is None and "synthetic packing failure" in caplog.text
    torch.testing.assert_close(out, runtime.dense_attention(q, k, v, None, 0.125), rtol=1e-5, atol=1e-5)


def test_index_cap_from_the_density_budget():
    """A budgeted site's packing has density_budget(nKB, density) index columns; the compiled
    graph's cap (plan_site's index_cap) is honoured when it is at least that bound, and a call
    whose bound exceeds it runs the kernel inside plan_site (the graph selects its output)."""
    from fgcompile import attention, predictors, runtime

    h = runtime.register_site("runtime.index_cap", _cfg(profile_every=100, density=0.25))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 64, generator=g) for _ in range(3))
    bound = predictors.density_budget(128, 0.25)
    assert bound == 32
    out, packed = runtime.plan_site(h, q, k, v, None, 0.125)  # profiled
    assert out is not None and packed.indices.shape[-1] == bound
    out, packed = runtime.plan_site(h, q, k, v, None, 0.125)  # sparse, opaque sizes
    assert out is None and packed.indices.shape[-1] == bound
    ref = attention.sparse_attention(q, k, v, packed, block_m=64, scale=0.125)
    out, wide = runtime.plan_site(h, q, k, v, None, 0.125, index_cap=bound + 8)  # the graph's wider buffer
    assert out is None and wide.indices.shape[-1] == bound + 8
    assert torch.equal(wide.counts, packed.counts) and torch.equal(wide.indices[..., :bound], packed.indices)
    site = runtime._site(h, None)
    sparse_before = site.n_sparse
    out, none = runtime.plan_site(h, q, k, v, None, 0.125, index_cap=bound - 8)  # too narrow: kernel runs here
    assert none is None and site.n_sparse == sparse_before + 1
    st = site.stats()
    assert st.direct_calls == 1 and st.mask_bytes == site.mask.numel() * 4
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_direct_kernel_failure_in_plan_site_falls_back_to_dense(monkeypatch, caplog):
    """A call whose lists exceed the graph's buffers runs the kernel inside plan_site; if that
    kernel fails, the call (and the site from then on) runs dense, logged, counted as dense."""
    import fgcompile.attention as attention
    from fgcompile import runtime

    h = runtime.register_site("runtime.direct_failure", _cfg(profile_every=100, density=0.25))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 128, 64, generator=g) for _ in range(3))
    runtime.plan_site(h, q, k, v, None, 0.125)  # profiled

    def boom(*args, **kwargs):
        raise RuntimeError("synthetic direct failure")

    monkeypatch.setattr(attention, "sparse_attention", boom)
    monkeypatch.delenv("FGCOMPILE_STRICT", raising=False)
    with caplog.at_level("WARNING", logger="fgcompile"):
        out, packed = runtime.plan_site(h, q, k, v, None, 0.125, index_cap=8)  # bound 32 > 8: direct
    assert packed is None and "synthetic direct failure" in caplog.text
    torch.testing.assert_close(out, runtime.dense_attention(q, k, v, None, 0.125), rtol=1e-5, atol=1e-5)
    st = runtime._site(h, None).stats()
    assert (st.sparse_calls, st.direct_calls, st.dense_calls) == (0, 0, 1)
    assert "synthetic direct failure" in st.fallback


@pytest.mark.parametrize("fails", [False, True])
def test_key_padded_dense_calls_take_the_kernel_over_the_real_keys(monkeypatch, caplog, fails):
    """A dense call (here a warm-up call) of a key-padded site where the kernel serves it (on CUDA;
    here forced, with the Triton kernel under the interpreter) runs the sparse kernel over the lists
    of every real key: float64 attention over the real keys; counted once as dense. If that launch
    fails, the call runs SDPA, and the site falls back for good, counted once."""
    from fgcompile import runtime
    from fgcompile.kernels import packing

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA")
    h = runtime.register_site(f"runtime.padded_dense_{fails}", _cfg(dense_calls=2, impl="triton", block_m=64))
    site = runtime._site(h, None)
    serves = runtime.SiteState._kernel_serves_dense
    cpu_as_cuda = type("Q", (), {"device": torch.device("cuda")})()  # its only question of q: the device
    monkeypatch.setattr(runtime.SiteState, "_kernel_serves_dense", lambda self, q: serves(self, cpu_as_cuda))
    made = []
    real = packing.real_key_lists

    def lists(*a):
        made.append(a)
        if fails:
            raise RuntimeError("synthetic padded-dense failure")
        return real(*a)

    monkeypatch.setattr(packing, "real_key_lists", lists)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 192, 32, generator=g) for _ in range(3))
    kp = torch.arange(192)[None, :] < torch.tensor([[192], [150]])
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=kp[:, None, None, :], scale=0.2)
    monkeypatch.delenv("FGCOMPILE_STRICT", raising=False)
    with caplog.at_level("WARNING", logger="fgcompile"):
        out = site(q, k, v, kp, 0.2)
    assert len(made) == 1 and rel_err(out, ref) < 1e-5
    st = site.stats()
    assert (st.calls, st.dense_calls, st.sparse_calls) == (1, 1, 0)
    if fails:
        assert "synthetic padded-dense failure" in st.fallback and "synthetic" in caplog.text
        site(q, k, v, kp, 0.2)
        assert len(made) == 1  # falls back for good: SDPA from now on
    else:
        assert st.fallback is None
    monkeypatch.setenv("FGCOMPILE_STRICT", "1")


def test_stats_of_parameter_free_models_and_functions():
    """A compiled module without parameters (or a compiled function) has no parameter to own its
    sites: stats() reads the state those share instead of raising; a model whose sites all ran
    dense still raises, and says why."""
    import torch.nn.functional as F

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    cfg = FGAttnConfig(min_seq_len=64, block_m=64, predictor="pooled")  # profile: dense (see below)
    c = torch.compile(Attn(), backend=fgcompile.backend(cfg))
    q = torch.randn(1, 2, 128, 64)
    with torch.no_grad():
        c(q, q, q)
        c(q, q, q)
    st = fgcompile.stats(c)  # (with the sites of the other parameter-free graphs of this process)
    assert any(s.calls >= 2 and s.sparse_calls >= 2 for s in st.values()), st
    dense_only = torch.compile(ToyVideoDiT(SMALL).eval(), backend=fgcompile.backend(_cfg(min_seq_len=10 ** 6)))
    with torch.no_grad():
        dense_only(*_inputs())
    with pytest.raises(ValueError, match="no attention site of this model has run sparse.*< min_seq_len 1000000"):
        fgcompile.stats(dense_only)


class _ShiftLayer(nn.Module):
    """q = roll(k): attention peaked on the diagonal shifted by ``shift`` (one mask per layer).
    With ``gain`` the keys come from a parameter-holding graph before a graph break, as in the
    original Wan2.1 code; the attention then runs in a graph segment without parameters."""

    def __init__(self, shift, gain=True):
        super().__init__()
        self.shift = shift
        self.gain = nn.Parameter(torch.full((64,), 3.0)) if gain else None

    def forward(self, k, v):
        if self.gain is not None:
            k = k * self.gain
        q = k.roll(self.shift, dims=2)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(q, k, v)


class _ShiftNet(nn.Module):
    def __init__(self, gain=True):
        super().__init__()
        self.layers = nn.ModuleList([_ShiftLayer(0, gain), _ShiftLayer(128, gain)])

    def forward(self, k, v):
        return [layer(k, v) for layer in self.layers]


def test_parameter_free_graph_keys_its_state_by_the_graph_that_ran_before_it():
    """A graph with no parameter input runs for several layers (a graph-break segment holding
    only the attention, which Dynamo reuses for both layers). Each call takes its state from the
    graph with parameters that ran before it (its layer's): each layer profiles and reuses its
    own mask, and stats name the sites by layer. One shared mask would be far off."""
    from fgcompile import predictors

    torch._dynamo.reset()
    net = _ShiftNet().eval()
    c = torch.compile(net, backend=fgcompile.backend(min_seq_len=64, block_m=64, alpha=0.5, max_density=1.0))
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 256, 64, generator=g), torch.randn(1, 2, 256, 64, generator=g)
    own = []
    with torch.no_grad():
        ref = net(k, v)
        for layer in net.layers:
            kk = k * layer.gain
            qq = kk.roll(layer.shift, dims=2)
            own.append((qq, kk, predictors.profile_slices(qq, kk, alpha=0.5, block_m=64)))
        for o, r in zip(c(k, v), ref):  # profiled: exact
            torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-4)
        for _ in range(2):  # sparse, each layer on its own mask
            for o, (qq, kk, keep) in zip(c(k, v), own):
                torch.testing.assert_close(o, fgcompile.sparse_attention(qq, kk, v, keep, block_m=64), atol=1e-5, rtol=1e-4)
    assert _counts(c) == {"layers.0": (3, 0, 1, 2), "layers.1": (3, 0, 1, 2)}
    assert all(s.mean_density < 0.9 for s in fgcompile.stats(c).values())
    # (the test can fail: each layer on the other's mask is far from its own)
    for (qq, kk, _), (_, _, other), r in zip(own, own[::-1], ref):
        assert rel_err(fgcompile.sparse_attention(qq, kk, v, other, block_m=64), r) > 0.3
    rep = fgcompile.explain(c, k, v)
    assert [s.decision for s in rep.sites] == ["sparse"], rep


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(64))

    def forward(self, x):
        return x * self.w


class _ProjLayer(nn.Module):
    """k = proj(x) (x 3) then a graph break, then attention with q = k.roll(shift). ``first``: a
    module (shared by every layer) applied before the projection, in the same graph; ``after``:
    a module applied after the projection behind its own graph break."""

    def __init__(self, shift, first=None, after=None):
        super().__init__()
        self.shift, self.first, self.after = shift, first, after
        self.proj = nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(3 * torch.eye(64))

    def forward(self, x, v, shift=None):
        k = self.proj(self.first(x) if self.first is not None else x)
        q = k.roll(self.shift if shift is None else shift, dims=2)
        if self.after is not None:
            torch._dynamo.graph_break()
            self.after(x)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(q, k, v)


def _helper_attention(q, k, v):
    torch._dynamo.graph_break()
    return F.scaled_dot_product_attention(q, k, v)


class _SharedFirst(nn.Module):
    """Three _ProjLayers sharing one _Scale: applied first in each projection graph (``where``
    "first": the anchor graph's first parameter is shared by every layer), or behind its own
    graph break after the projection ("after": the last graph with parameters before each
    attention is the shared module's)."""

    where = "first"

    def __init__(self):
        super().__init__()
        shared = _Scale()
        self.layers = nn.ModuleList([_ProjLayer(s, **{self.where: shared}) for s in (0, 64, 128)])

    def forward(self, x, v, step):
        return [layer(x, v) for layer in self.layers]


class _SharedBetween(_SharedFirst):
    where = "after"


class _TiedTwice(nn.Module):  # one block used with other shifts from three lines of the forward
    def __init__(self):
        super().__init__()
        self.block, self.mid = _ProjLayer(0), nn.Linear(64, 64)

    def forward(self, x, v, step):
        a = self.block(x, v, 0)
        b = self.block(x, v, 128)
        self.mid(x)
        return [a, b, self.block(x, v, 192)]


class _LeadTail(nn.Module):  # attention before the first and after the last graph with parameters
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_ProjLayer(s) for s in (0, 64)])

    def forward(self, x, v, step):
        k = 3 * x
        lead = [_helper_attention(k.roll(16, dims=2), k, v)] if step % 4 >= 2 else []
        tail = [_helper_attention(k.roll(200, dims=2), k, v)] if step % 2 == 0 else []
        return lead + [layer(x, v) for layer in self.layers] + tail


@pytest.mark.parametrize("model", [_SharedFirst, _SharedBetween, _TiedTwice, _LeadTail])
def test_anchored_calls_each_keep_their_own_mask(model):
    """Attention calls in graphs without parameters that follow the same anchor graph, or anchor
    graphs owned by a parameter every layer shares, or run from two places of one forward, each
    profile and reuse their own mask: every sparse call equals sparse_attention on its own
    profiled mask (another call's mask is > 0.3 off), every other call is exact."""
    from fgcompile import predictors

    torch._dynamo.reset()
    m = model().eval()
    c = torch.compile(m, backend=fgcompile.backend(min_seq_len=64, block_m=64, alpha=0.5, max_density=1.0))
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(1, 2, 256, 64, generator=g), torch.randn(1, 2, 256, 64, generator=g)
    k = 3 * x
    with torch.no_grad():
        for step in range(8):
            ref = m(x, v, step)
            for i, (o, r) in enumerate(zip(c(x, v, step), ref)):
                # the query of output i: the shift whose dense attention it is (eager)
                shifts = [s for s in (0, 16, 64, 128, 192, 200) if torch.allclose(
                    r, F.scaled_dot_product_attention(k.roll(s, dims=2), k, v), atol=1e-5)]
                assert len(shifts) == 1, (model.__name__, step, i)
                q = k.roll(shifts[0], dims=2)
                own = fgcompile.sparse_attention(q, k, v, predictors.profile_slices(q, k, alpha=0.5, block_m=64), block_m=64)
                assert rel_err(o, own) < 1e-5, (model.__name__, step, i, rel_err(o, own))
    counts = _counts(c).values()
    assert sum(n[3] for n in counts) >= 6 and sum(n[3] > 0 for n in counts) >= 3, _counts(c)  # sparse calls, of 3+ sites
    q0, q1 = k, k.roll(128, dims=2)
    wrong = fgcompile.sparse_attention(q1, k, v, predictors.profile_slices(q0, k, alpha=0.5, block_m=64), block_m=64)
    assert rel_err(wrong, F.scaled_dot_product_attention(q1, k, v)) > 0.3  # (the test can fail)


def test_explain_of_blocks_compiled_in_place_runs_nothing_sparse():
    """explain() on a model whose blocks were compiled in place (``block.compile()``, regional
    compilation) with a graph break inside them: the blocks run uncompiled under the capture, so
    explain reports their attention and their compiled state does not move."""
    torch._dynamo.reset()
    m = _SharedBetween().eval()  # (any model with breaks inside its blocks)
    for layer in m.layers:
        layer.compile(backend=fgcompile.backend(min_seq_len=64, block_m=64, alpha=0.5, max_density=1.0))
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(1, 2, 256, 64, generator=g), torch.randn(1, 2, 256, 64, generator=g)
    with torch.no_grad():
        m(x, v, 0)
        m(x, v, 1)
    before = _counts(m)
    rep = fgcompile.explain(m, x, v, 0, config=FGAttnConfig(min_seq_len=64, block_m=64))
    assert _counts(m) == before and len(before) == 3 and all(c[3] == 1 for c in before.values()), before
    assert [s.decision for s in rep.sites] and all(s.decision == "sparse" for s in rep.sites), rep
    assert all(layer._compiled_call_impl is not None for layer in m.layers)  # restored
    with torch.no_grad():
        m(x, v, 2)
    assert all(c[3] == 2 for c in _counts(m).values()), _counts(m)


def test_parameter_free_graph_without_a_running_owner_stays_dense():
    """Without a graph with parameters before it (here the attention comes first in its layer),
    a parameter-free graph's calls cannot be told apart: with the profile predictor its sites run
    dense, with the reason, instead of applying one layer's cached mask to another."""
    torch._dynamo.reset()
    net = _ShiftNet(gain=False).eval()
    c = torch.compile(net, backend=fgcompile.backend(min_seq_len=64, block_m=64, alpha=0.5, max_density=1.0))
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 256, 64, generator=g) * 3, torch.randn(1, 2, 256, 64, generator=g)
    with torch.no_grad():
        ref = net(k, v)
        for _ in range(3):
            for o, r in zip(c(k, v), ref):
                torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-4)
    rep = fgcompile.explain(_ShiftNet(gain=False).eval(), k, v, config=FGAttnConfig(min_seq_len=64, block_m=64))
    assert [s.decision for s in rep.sites] == ["dense"] and "no parameter input owns this graph" in rep.sites[0].reason


def test_compiled_function_called_from_eager_code(monkeypatch):
    """A compiled function called from a module's eager forward after a compiled submodule with
    parameters: its calls are told apart by their order after that submodule's graph, each with
    its own mask. Called from code where no such module runs, the same compiled function's calls
    cannot be told apart and run dense (the profile predictor), not on another call's mask."""
    from fgcompile import predictors

    torch._dynamo.reset()
    backend = fgcompile.backend(min_seq_len=64, block_m=64, alpha=0.5, max_density=1.0)
    attend = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend=backend)

    class Pre(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.full((64,), 3.0))

        def forward(self, k):
            return k * self.gain

    class Eager(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = torch.compile(Pre(), backend=backend)

        def forward(self, k, v):
            k = self.pre(k)
            return [attend(k.roll(s, dims=2), k, v) for s in (0, 128)]

    m = Eager().eval()
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 256, 64, generator=g), torch.randn(1, 2, 256, 64, generator=g)
    with torch.no_grad():
        kk = k * 3.0
        qs = [kk.roll(s, dims=2) for s in (0, 128)]
        keeps = [predictors.profile_slices(q, kk, alpha=0.5, block_m=64) for q in qs]
        for o, q in zip(m(k, v), qs):  # profiled: exact
            torch.testing.assert_close(o, F.scaled_dot_product_attention(q, kk, v), atol=1e-5, rtol=1e-4)
        for _ in range(2):  # sparse, each call on its own mask
            for o, q, keep in zip(m(k, v), qs, keeps):
                torch.testing.assert_close(o, fgcompile.sparse_attention(q, kk, v, keep, block_m=64), atol=1e-5, rtol=1e-4)
        assert sorted(c[1:] for c in _counts(m).values()) == [(0, 1, 2), (0, 1, 2)]
        for q in qs + qs:  # no module runs: dense, exact
            torch.testing.assert_close(attend(q, kk, v), F.scaled_dot_product_attention(q, kk, v), atol=1e-5, rtol=1e-4)
    assert rel_err(fgcompile.sparse_attention(qs[1], kk, v, keeps[0], block_m=64),
                   F.scaled_dot_product_attention(qs[1], kk, v)) > 0.3  # (the test can fail)
    # more anchored calls than one anchor serves: the later ones take the shared state (dense)
    from fgcompile import runtime

    monkeypatch.setattr(runtime, "MAX_ANCHORED_CALLS", 1)
    fgcompile.reset(m)
    before = {n: s.dense_calls for n, s in fgcompile.stats(attend).items()}  # calls no module owns
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(m(k, v)[1], F.scaled_dot_product_attention(qs[1], kk, v), atol=1e-5, rtol=1e-4)
    grew = [s for n, s in fgcompile.stats(attend).items() if s.dense_calls != before.get(n, 0)]
    assert len(grew) == 1 and grew[0].dense_calls == before[grew[0].name] + 3 and "dense" in grew[0].fallback
    assert sorted(c[1:] for c in _counts(m).values()) == [(0, 0, 0), (0, 1, 2)]  # the first call: as before


def test_stats_of_a_model_whose_attention_runs_in_a_segment_without_parameters():
    """A graph break between the projections and the attention leaves the attention in a graph
    with no parameter (the original Wan2.1 code does this): under the pooled predictor it runs
    sparse in the shared state, and ``stats`` / ``reset`` of the model reach that state instead of
    saying it has none."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(128, 384)

        def forward(self, x):
            q, k, v = self.qkv(x).view(1, 256, 3, 2, 64).permute(2, 0, 3, 1, 4)
            torch._dynamo.graph_break()
            return F.scaled_dot_product_attention(q, k, v)

    torch._dynamo.reset()
    m = M().eval()
    c = torch.compile(m, backend=fgcompile.backend(min_seq_len=64, predictor="pooled", tau=1.0, max_density=1.0))
    x = torch.randn(1, 256, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), atol=1e-5, rtol=1e-4)
    st = fgcompile.stats(c)
    assert "attention" in st and st["attention"].calls >= 1, st
    fgcompile.reset(c)


class _TiedAttn(nn.Module):
    """Self-attention over (B, S, 128) tokens, 2 heads of 64, scaled up so that its maps are peaked."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(128, 384)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, 2, 64).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q * 4, k, v).transpose(1, 2).reshape(B, S, 128)


def test_weight_tied_module_called_from_two_graphs_gets_a_state_per_call_site():
    """One module called from two places with a graph break between them: both graphs name the
    site ``attn`` and have the same owner parameter. Each call site keeps its own state (the second
    runs as ``attn#1``), so the second use never runs on the first use's profiled mask: the
    outputs equal those of the same model with the block's weights copied into two modules."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = _TiedAttn()

        def forward(self, x):
            x = x + self.attn(x)
            torch._dynamo.graph_break()
            return x + self.attn(x.flip(1))  # another token order: another attention map

    class Untied(nn.Module):
        def __init__(self, tied):
            super().__init__()
            self.attn, self.attn2 = _TiedAttn(), _TiedAttn()
            self.attn.load_state_dict(tied.attn.state_dict())
            self.attn2.load_state_dict(tied.attn.state_dict())

        def forward(self, x):
            x = x + self.attn(x)
            torch._dynamo.graph_break()
            return x + self.attn2(x.flip(1))

    torch.manual_seed(0)
    tied = Tied().eval()
    untied = Untied(tied).eval()
    cfg = FGAttnConfig(min_seq_len=64, block_m=64, alpha=30.0, dense_calls=0)
    ct = torch.compile(tied, backend=fgcompile.backend(cfg))
    cu = torch.compile(untied, backend=fgcompile.backend(cfg))
    x = torch.randn(1, 256, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = [(ct(x), cu(x)) for _ in range(3)]  # call 0 profiles, 1 and 2 reuse
    st, su = fgcompile.stats(ct), fgcompile.stats(cu)
    assert sorted(st) == ["attn", "attn#1"], sorted(st)
    assert all(0 < s.mean_density < 0.9 for s in st.values()), {n: s.mean_density for n, s in st.items()}
    for n_t, n_u in (("attn", "attn"), ("attn#1", "attn2")):
        assert st[n_t].density_last == su[n_u].density_last and st[n_t].calls == su[n_u].calls == 3
    for o_t, o_u in outs:
        torch.testing.assert_close(o_t, o_u, atol=1e-5, rtol=1e-5)


class _PaddedAttn(torch.nn.Module):
    """SDPA with a boolean key-padding mask ``keep`` (B, S_kv), behind one parameter (an owner)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, q, k, v, keep):
        return torch.nn.functional.scaled_dot_product_attention(q * self.w, k, v, attn_mask=keep[:, None, None, :])


@pytest.mark.parametrize("storage", ["host", "host_lists"])
def test_cached_mask_follows_the_key_padding_of_each_call(storage):
    """Keys padded at the profiled call are cached as kept, and every sparse call applies its own
    padding: a later call whose padding differs at the same shape (another prompt's text length)
    gets dense attention's answer when every slice is kept, never the profiled call's padding.
    With mask_storage="host_lists" no lists are kept for padded calls (each packs its own)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, generator=g) for _ in range(3))
    m = _PaddedAttn()
    c = torch.compile(m, backend=fgcompile.backend(min_seq_len=64, block_m=64, alpha=1e-6, max_density=1.0,
                                                   mask_storage=storage))
    half = torch.ones(1, 256, dtype=torch.bool)
    half[:, 128:] = False
    full = torch.ones(1, 256, dtype=torch.bool)
    with torch.no_grad():
        for keep in (half, full, half, full):  # profiled once, then sparse with other paddings
            torch.testing.assert_close(c(q, k, v, keep), m(q, k, v, keep), atol=1e-5, rtol=1e-4)
    (s,) = fgcompile.stats(c).values()
    assert (s.profiled_calls, s.sparse_calls) == (1, 3) and s.host_list_bytes == 0


def test_configure_block_n_on_a_key_padding_site_is_refused():
    """Key-padding sites are served with block_n == 1 only (the compile-time rule): configure
    refuses block_n > 1 there instead of failing the site at its next call."""
    q = torch.randn(1, 2, 256, 64)
    keep = torch.ones(1, 256, dtype=torch.bool)
    c = torch.compile(_PaddedAttn(), backend=fgcompile.backend(min_seq_len=64, block_m=64))
    with torch.no_grad():
        c(q, q, q, keep)
    with pytest.raises(ValueError, match="^block_n: a site with a key-padding mask needs block_n == 1"):
        fgcompile.configure(c, block_n=2)


def test_compiling_again_with_another_config_restarts_the_schedule():
    """A second torch.compile of the same module with another config starts its sites' schedules
    over (its dense warm-up runs), instead of inheriting the first compile's call count."""
    model = ToyVideoDiT(SMALL).eval()
    x = _inputs()
    c1 = torch.compile(model, backend=fgcompile.backend(_cfg()))
    c2 = torch.compile(model, backend=fgcompile.backend(_cfg(dense_calls=2)))
    with torch.no_grad():
        for _ in range(3):
            c1(*x)
        for _ in range(3):
            c2(*x)
    for s in fgcompile.stats(c2).values():
        assert (s.calls, s.dense_calls, s.profiled_calls, s.sparse_calls) == (3, 2, 1, 0)


def test_explain_of_a_compiled_model_uses_its_config():
    """explain(compiled model) decides with the config the model was compiled with (here a small
    min_seq_len, under which its sites run sparse), not the defaults."""
    model = ToyVideoDiT(SMALL).eval()
    c = torch.compile(model, backend=fgcompile.backend(_cfg()))
    x = _inputs()
    with torch.no_grad():
        c(*x)
    rep = fgcompile.explain(c, *x)
    self_attn = [s for s in rep.sites if s.seq_len_kv == s.seq_len_q]  # the toy's cross-attention stays dense
    assert rep.config == _cfg() and self_attn and all(s.decision == "sparse" for s in self_attn)


def test_explain_of_a_compiled_model_whose_sites_all_run_dense_uses_its_config():
    """A model whose sites all run dense has no run-time state; explain still decides with the
    config it was compiled with (min_seq_len 64, not the default 4096), and stats' error lists the
    reasons its compile recorded."""
    model = ToyVideoDiT(SMALL).eval()
    cfg = _cfg(dense_sites=("*",))
    c = torch.compile(model, backend=fgcompile.backend(cfg))
    x = _inputs()
    with torch.no_grad():
        c(*x)
    rep = fgcompile.explain(c, *x)
    assert rep.config == cfg and rep.sites and all(s.decision == "dense" for s in rep.sites)
    assert not any("min_seq_len 4096" in s.reason for s in rep.sites), rep.table()
    assert any("matches config.dense_sites" in s.reason for s in rep.sites), rep.table()
    with pytest.raises(ValueError, match="its compiles decided: .*matches config.dense_sites"):
        fgcompile.stats(c)


def test_block_m_the_triton_kernels_do_not_take_is_dense_at_compile_time():
    """block_m 256 (the plain-torch path's largest) on the Triton path: dense with the reason at
    compile time, not a run-time fallback."""
    model = ToyVideoDiT(SMALL).eval()
    rep = fgcompile.explain(model, *_inputs(), config=_cfg(block_m=256, impl="triton"))
    self_attn = [s for s in rep.sites if s.seq_len_kv == s.seq_len_q]  # the toy's cross-attention stays dense
    assert self_attn and all(s.decision == "dense" and "block_m 256" in s.reason for s in self_attn)
    rep = fgcompile.explain(model, *_inputs(), config=_cfg(block_m=256))  # the CPU: the reference path
    assert all(s.decision == "sparse" for s in rep.sites if s.seq_len_kv == s.seq_len_q)


def test_configure_dense_sites_by_full_path_under_regional_compilation():
    """With each block compiled on its own, a block's graph names its site ``attn``; configure's
    dense_sites match the full path (``blocks.0.attn``, as stats names it)."""
    model = _regional(2, profile_every=100)
    x = _inputs()
    with torch.no_grad():
        model(*x)
        fgcompile.configure(model, dense_sites=("blocks.0.*",))
        model(*x)
        model(*x)
    st = fgcompile.stats(model)
    assert (st["blocks.0.attn"].dense_calls, st["blocks.0.attn"].sparse_calls) == (2, 0)
    assert (st["blocks.1.attn"].dense_calls, st["blocks.1.attn"].sparse_calls) == (0, 2)


def test_load_state_keeps_dense_sites_under_regional_compilation(tmp_path):
    """A saved ``dense_sites`` pattern names full paths (``blocks.0.*``): loaded into a model
    whose blocks were compiled one by one, it must still match them."""
    x = _inputs()
    a, b = _regional(2, profile_every=100), _regional(2, profile_every=100)
    with torch.no_grad():
        a(*x)
        fgcompile.configure(a, dense_sites=("blocks.0.*",))
        path = tmp_path / "state.pt"
        fgcompile.save_state(a, str(path))
        b(*x)
        fgcompile.load_state(b, str(path))
        a(*x)
        b(*x)
    for st in (fgcompile.stats(a), fgcompile.stats(b)):
        assert (st["blocks.0.attn"].dense_calls, st["blocks.1.attn"].dense_calls) == (1, 0)


def test_load_state_refuses_another_batch_size(tmp_path):
    # a cached mask holds one set of rows per batch item
    ca = torch.compile(ToyVideoDiT(SMALL).eval(), backend=fgcompile.backend(_cfg()))
    cb = torch.compile(ToyVideoDiT(SMALL).eval(), backend=fgcompile.backend(_cfg()))
    with torch.no_grad():
        ca(*_inputs(batch=2))
        cb(*_inputs(batch=1))
    path = tmp_path / "state.pt"
    fgcompile.save_state(ca, str(path))
    with pytest.raises(ValueError, match=r"\(batch, heads, S_q, S_kv, head_dim\) = \(2,"):
        fgcompile.load_state(cb, str(path))


def test_stats_and_explain_of_a_compiled_method():
    # torch.compile(model.forward): the state is the module's, and the compiled method finds it
    model = ToyVideoDiT(SMALL).eval()
    f = torch.compile(model.forward, backend=fgcompile.backend(_cfg()))
    with torch.no_grad():
        f(*_inputs())
        rep = fgcompile.explain(f, *_inputs())
    st = fgcompile.stats(f)
    assert st.keys() == fgcompile.stats(model).keys() and any(s.profiled_calls == 1 for s in st.values())
    assert any(s.decision == "sparse" for s in rep.sites)  # the compiled config, not the default


def test_a_short_call_does_not_leave_later_long_calls_dense():
    """A short call after a long one makes Dynamo recompile with a dynamic sequence length, whose
    graph is decided on the short example: the self-attention stays a site, its calls shorter than
    min_seq_len run dense and the long ones sparse (profiled, then from the cached mask)."""
    torch.manual_seed(0)
    cfg = FGAttnConfig(predictor="profile", min_seq_len=64, block_m=32, alpha=1.0, max_density=1.0, profile_every=10)
    m = _DirectBlock(twice=False).eval()
    c = torch.compile(m, backend=fgcompile.backend(cfg))
    seen = []
    with torch.no_grad():
        for s in (256, 48, 512, 512, 40):
            x = torch.randn(2, s, 128)
            out = c(x)
            if s < 64:
                torch.testing.assert_close(out, m(x), atol=1e-5, rtol=1e-4)
            st = fgcompile.stats(c)["attention"]
            seen.append((s, st.calls, st.profiled_calls, st.sparse_calls, st.dense_calls))
    # 256: profiled; 48 (recompiled, dynamic): dense; 512: profiled (new shape), then sparse; 40: dense
    assert seen == [(256, 1, 1, 0, 0), (48, 2, 1, 0, 1), (512, 3, 2, 0, 1), (512, 4, 2, 1, 1), (40, 5, 2, 1, 2)], seen


def test_blocks_sharing_a_parameter_keep_their_own_state():
    """A compiled graph's state is owned by the parameter nearest its attention (the query
    projection's weight), not by its first parameter: blocks compiled one by one that share a
    tied gain used first in their forward keep one state each, and each block's first call is
    profiled (exact), not run on the other block's mask."""

    class Block(nn.Module):
        def __init__(self, gain):
            super().__init__()
            self.gain = gain  # the same Parameter in every block, read first
            self.qkv = nn.Linear(128, 384)
            self.out = nn.Linear(128, 128)
            with torch.no_grad():
                self.qkv.weight.mul_(8.0)  # peaked attention: sparse masks

        def forward(self, x):
            h = x * self.gain
            b, s, _ = h.shape
            q, k, v = self.qkv(h).view(b, s, 3, 2, 64).permute(2, 0, 3, 1, 4)
            return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 128))

    torch.manual_seed(0)
    gain = nn.Parameter(torch.ones(128))
    blocks = nn.ModuleList([Block(gain), Block(gain)]).eval()
    be = fgcompile.backend(_cfg(profile_every=100, density=0.3))
    compiled = [torch.compile(b, backend=be) for b in blocks]
    x = torch.randn(1, 256, 128)
    with torch.no_grad():
        first = compiled[0](x)  # block 0 profiles
        torch.testing.assert_close(first, blocks[0](x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(compiled[1](x), blocks[1](x), atol=1e-5, rtol=1e-4)  # its own profiled call
        compiled[0](x)
        compiled[1](x)
    for c in compiled:
        st = fgcompile.stats(c)
        assert [(s.calls, s.profiled_calls, s.sparse_calls) for s in st.values()] == [(2, 1, 1)], st
