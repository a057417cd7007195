"""The fgattn backend: discovery, configuration, and compiled-vs-eager on the toy video DiT."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import fgcompile
from fgcompile.testing.metrics import rel_err
from fgcompile import FGAttnConfig
from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT

os.environ["FGCOMPILE_STRICT"] = "1"


def _toy_inputs(batch, frames=2, hw=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, hw, hw, generator=g)
    t = torch.rand(batch, generator=g)
    text = torch.randn(batch, 16, 64, generator=g)
    return x, t, text




# ----------------------------------------------------------------------------- discovery
def test_backend_found_without_importing_fgcompile():
    code = textwrap.dedent(
        """
        import sys, torch
        import torch.nn.functional as F
        assert "fgcompile" not in sys.modules
        def f(q):
            return F.scaled_dot_product_attention(q, q, q) * 2
        q = torch.randn(1, 2, 64, 64)
        out = torch.compile(f, backend="fgattn")(q)
        torch.testing.assert_close(out, f(q))
        assert "fgcompile" in sys.modules
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "FGCOMPILE_STRICT"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout


def test_string_backend_accepts_options():
    m = nn.Linear(8, 8)
    x = torch.randn(3, 8)
    c = torch.compile(m, backend="fgattn", options={"alpha": 0.25, "min_seq_len": 16})
    torch.testing.assert_close(c(x), m(x))


def test_string_backend_rejects_bad_options():
    m = nn.Linear(8, 8)
    c = torch.compile(m, backend="fgattn", options={"alhpa": 0.25})
    with pytest.raises(Exception, match="alhpa"):
        c(torch.randn(3, 8))


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "field,value",
    [
        ("predictor", "magic"),
        ("alpha", 0.0),
        ("alpha", float("nan")),
        ("profile_every", 0),
        ("profile_calls", (1, 1)),
        ("profile_calls", (-1,)),
        ("tau", 1.5),
        ("gamma", 2.0),
        ("density", 0.0),
        ("density", 1.2),
        ("block_m", 100),
        ("block_m", 8),
        ("block_n", 3),
        ("block_n", 256),
        ("dense_calls", -1),
        ("dense_sites", (1,)),
        ("min_seq_len", 0),
        ("impl", "cuda"),
        ("alpha", True),
        ("alpha", 10**400),  # an int no float holds
        ("tau", 10**400),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"FGAttnConfig\.{field}: expected"):
        FGAttnConfig(**{field: value})


def test_config_defaults_and_schedule():
    c = FGAttnConfig()
    assert c.predictor == "profile" and c.alpha == 0.5 and c.block_m == 128 and c.block_n == 1
    assert [i for i in range(50) if c.is_profiled_call(i)] == [0, 10, 20, 30, 40]
    c = FGAttnConfig(dense_calls=3, profile_every=4)
    assert [i for i in range(12) if c.is_profiled_call(i)] == [3, 7, 11]
    c = FGAttnConfig(profile_calls=[15, 0, 30])
    assert c.profile_calls == (0, 15, 30)
    assert [i for i in range(40) if c.is_profiled_call(i)] == [0, 15, 30]
    assert FGAttnConfig(dense_sites="blocks.0.*").is_dense_site("blocks.0.attn")
    assert not FGAttnConfig(dense_sites=("blocks.0.*",)).is_dense_site("blocks.10.attn")


def test_backend_factory():
    b = fgcompile.backend(alpha=0.7)
    assert b.config.alpha == 0.7
    b2 = fgcompile.backend(FGAttnConfig(tau=0.8), alpha=0.3)
    assert b2.config.tau == 0.8 and b2.config.alpha == 0.3
    with pytest.raises(ValueError, match="config"):
        fgcompile.backend("profile")
    with pytest.raises(ValueError, match="unknown FGAttnConfig field"):
        fgcompile.backend(alhpa=0.3)


# ----------------------------------------------------------------------------- models
class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x):
        return self.net(x).softmax(-1) * 3


def test_model_without_attention_matches_inductor():
    m = NoAttention()
    x = torch.randn(4, 16)
    report = fgcompile.explain(m, x)
    assert report.sites == []
    out = torch.compile(m, backend="fgattn")(x)
    torch.testing.assert_close(out, torch.compile(m, backend="inductor")(x))
    torch.testing.assert_close(out, m(x))


def test_cpu_graph_does_not_start_the_compile_pool(monkeypatch):
    # Inductor's worker pool compiles Triton kernels only: a CPU graph must not spawn it
    from fgcompile.lowering import torch_private

    calls = []
    monkeypatch.setattr(torch_private, "warm_compile_pool", lambda: calls.append(1) or True)
    m = NoAttention()
    torch.compile(m, backend="fgattn")(torch.randn(4, 16))
    assert calls == []


@pytest.fixture(scope="module")
def toy():
    return ToyVideoDiT(ToyDiTConfig(depth=2, width=128, heads=2)).eval()


@pytest.mark.parametrize("batch", [1, 2])
def test_toy_dense_predictor_matches_eager(batch):
    toy = ToyVideoDiT(ToyDiTConfig(depth=2, width=128, heads=2)).eval()
    x, t, text = _toy_inputs(batch)
    cfg = FGAttnConfig(predictor="dense", min_seq_len=64, block_m=64)
    with torch.no_grad():
        ref = toy(x, t, text)
        c = torch.compile(toy, backend=fgcompile.backend(cfg))
        out = c(x, t, text)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    st = fgcompile.stats(c)
    assert sorted(st) == ["blocks.0.attn", "blocks.1.attn"]
    assert all(s.dense_calls == 1 and s.sparse_calls == 0 for s in st.values())


@pytest.mark.parametrize("batch", [1, 2])
def test_toy_profile_predictor_close_to_eager(toy, batch):
    x, t, text = _toy_inputs(batch, seed=batch)
    cfg = FGAttnConfig(predictor="profile", alpha=0.5, profile_every=3, min_seq_len=64, block_m=64)
    model = ToyVideoDiT(ToyDiTConfig(depth=2, width=128, heads=2)).eval()
    with torch.no_grad():
        ref = model(x, t, text)
        c = torch.compile(model, backend=fgcompile.backend(cfg))
        first = c(x, t, text)  # a profiled call: dense attention, exact
        torch.testing.assert_close(first, ref, rtol=1e-4, atol=1e-4)
        second = c(x, t, text)  # reuses the profiled mask: sparse
    st = fgcompile.stats(c)
    for s in st.values():
        assert (s.calls, s.profiled_calls, s.sparse_calls) == (2, 1, 1)
        assert len(s.density_last) == 2 and all(0 < d <= 1 for d in s.density_last)
    assert rel_err(second, ref) < 0.05


def test_grad_mode_keeps_attention_dense(toy):
    x, t, text = _toy_inputs(1)
    report = fgcompile.explain(toy, x, t, text, config=FGAttnConfig(min_seq_len=64))
    assert [s.decision for s in report.sites if s.name.endswith(".attn")] == ["sparse", "sparse"]
    assert [s.decision for s in report.sites if s.name.endswith(".cross")] == ["dense", "dense"]
    cfg = FGAttnConfig(min_seq_len=64, block_m=64)
    c = torch.compile(toy, backend=fgcompile.backend(cfg))
    out = c(x, t, text)  # grad enabled, parameters require grad: no sparse site
    out.sum().backward()
    torch.testing.assert_close(out, toy(x, t, text), rtol=1e-4, atol=1e-4)
    # the model has no sparse site, hence no state: stats says what its compile decided, and explain
    # (which captures under torch.no_grad()) says that the compiled model ran otherwise
    with pytest.raises(ValueError, match="no attention site of this model has run sparse.*autograd is recording"):
        fgcompile.stats(c)
    rep = fgcompile.explain(c, x, t, text)
    assert rep.config == cfg
    assert {n for n, (d, r) in rep.compiled_otherwise.items() if d == "dense" and "autograd" in r} == {
        s.name for s in rep.sites if s.decision == "sparse"
    } != set()
    assert "when the compiled model ran, fgcompile decided otherwise:" in str(rep)


def test_failing_pass_falls_back_to_dense(monkeypatch, toy):
    import fgcompile.passes.find_attention as fa

    def boom(gm, config):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(fa, "find_attention_sites", boom)
    monkeypatch.delenv("FGCOMPILE_STRICT", raising=False)
    x, t, text = _toy_inputs(1)
    with torch.no_grad():
        out = torch.compile(toy, backend=fgcompile.backend(min_seq_len=64))(x, t, text)
        torch.testing.assert_close(out, toy(x, t, text), rtol=1e-4, atol=1e-4)
