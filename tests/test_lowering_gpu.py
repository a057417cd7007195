"""The CUDA lowering (issue 6) on a GPU: the sparse kernel inside Inductor's program.

- the output code holds the kernel's source (``_fg_sparse_fwd``), launched through Inductor's
  ``user_autotune`` with >= 4 configs, and the plan op;
- lowered == opaque (``FGCOMPILE_LOWERING=0``) outputs, call after call through the schedule;
- no host synchronisation in steady-state calls (``set_sync_debug_mode("error")``);
- ``mode="reduce-overhead"`` after the profiled calls: CUDA graphs used, same outputs as default;
- a change of frame count / resolution recompiles and never reuses another shape's mask;
- the compiled toy video DiT vs eager, no graph breaks.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re

import pytest
import torch
import torch.nn.functional as F

import fgcompile
from fgcompile.testing.metrics import rel_err
from fgcompile import FGAttnConfig, runtime
from fgcompile.lowering.inductor import run_and_get_code
from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT

pytestmark = pytest.mark.gpu
os.environ["FGCOMPILE_STRICT"] = "1"

DT = torch.bfloat16


def _model(heads=2, width=256, depth=2):
    torch.manual_seed(0)
    return ToyVideoDiT(ToyDiTConfig(depth=depth, width=width, heads=heads)).eval().cuda().to(DT)


def _inputs(frames=4, hw=32, seed=0, batch=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, 4, frames, hw, hw, device="cuda", generator=g).to(DT)
    t = torch.rand(batch, device="cuda", generator=g).to(DT)
    text = torch.randn(batch, 16, 64, device="cuda", generator=g).to(DT)
    return x, t, text




CFG = FGAttnConfig(predictor="profile", alpha=0.3, profile_calls=(0, 4), block_m=128, block_n=1, min_seq_len=256,
                    max_density=1.0)  # random weights: keep the sparse path whatever the density


def _compile(m, cfg=CFG, **kw):
    return torch.compile(m, backend=fgcompile.backend(cfg), fullgraph=True, **kw)


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _kernel_configs(code: str) -> int:
    from fgcompile.lowering.inductor import count_kernel_configs

    return count_kernel_configs(code)


def _output_code(c) -> str:
    x = _inputs()
    with torch.no_grad():
        _, codes = run_and_get_code(c, *x)
    return "\n".join(codes)


def test_output_code_holds_the_autotuned_kernel(monkeypatch):
    monkeypatch.setenv("FGCOMPILE_AUTOTUNE", "1")
    code = _output_code(_compile(_model()))
    assert "torch.ops.fgcompile.site_plan.default" in code
    assert "def _fg_sparse_fwd(" in code and "@triton.jit" in code
    assert "user_autotune" in code
    n = _kernel_configs(code)
    print("sparse kernel configs in the output code:", n)
    assert n >= 4
    # specialisation: the head dim (128) and tile sizes are bound in the launch
    i = code.index("def _fg_sparse_fwd(")
    deco = code[code.rindex("user_autotune(", 0, i):i]
    assert re.search(r"HEAD_DIM['\"]?\s*[:=]\s*128", code), "HEAD_DIM not bound to 128 in the output code"
    assert re.search(r"BLOCK_M['\"]?\s*[:=]\s*128", code)
    assert "BLOCK_N" in deco
    for line in code.splitlines():
        if "_fg_sparse_fwd" in line and ".run(" in line:
            print("launch:", line.strip()[:400])
    assert "site_attention" not in code  # every site lowered


def test_max_autotune_mode_autotunes_and_default_mode_does_not(monkeypatch):
    """Inductor's rule for its own templates: autotune in mode="max-autotune" only. The default
    mode launches the heuristic config (one compile). The Triton kernel's lowering: on sm_90 the
    default mode otherwise runs the Gluon kernel (test below)."""
    monkeypatch.delenv("FGCOMPILE_AUTOTUNE", raising=False)
    monkeypatch.setenv("FGCOMPILE_SM90_KERNEL", "0")
    code = _output_code(_compile(_model(depth=1)))
    assert "def _fg_sparse_fwd(" in code
    n_default = _kernel_configs(code)
    assert n_default == 1, n_default
    torch._dynamo.reset()
    code = _output_code(_compile(_model(depth=1), mode="max-autotune-no-cudagraphs"))
    n_tuned = _kernel_configs(code)
    print("configs: default mode", n_default, "max-autotune", n_tuned)
    assert n_tuned >= 4


def _gluon_against_triton(monkeypatch, cfg=CFG, dynamic=None):
    """Compile ``_model()`` with the Gluon sm_90 kernel allowed and a copy with it off
    (``FGCOMPILE_SM90_KERNEL`` 1 / 0): the first lowered graph calls
    ``fgcompile::sparse_attention_sm90`` (an opaque op inside the triton_op: no ``_fg_sparse_fwd``
    source in the output code), the second the Triton kernel's source; both give the same outputs
    call by call through the schedule (profiled and sparse calls), and every site stays sparse."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel is for sm_90")
    monkeypatch.delenv("FGCOMPILE_AUTOTUNE", raising=False)
    m1 = _model()
    m2 = copy.deepcopy(m1)
    outs = []
    for m, env in ((m1, "1"), (m2, "0")):
        torch._dynamo.reset()
        monkeypatch.setenv("FGCOMPILE_SM90_KERNEL", env)
        c = _compile(m, cfg, dynamic=dynamic)
        with torch.no_grad():
            _, codes = run_and_get_code(c, *_inputs(seed=0))
            code = "\n".join(codes)
            assert ("fgcompile.sparse_attention_sm90" in code) == (env == "1")
            assert ("def _fg_sparse_fwd(" in code) == (env == "0")
            outs.append([c(*_inputs(seed=i)) for i in range(1, 6)])
        st = fgcompile.stats(c)
        assert all(v.sparse_calls >= 3 and v.fallback is None for v in st.values()), st
    for i, (a, b) in enumerate(zip(*outs)):
        assert rel_err(a, b) < 1e-2, (i, rel_err(a, b))


@pytest.mark.parametrize("density,dynamic", [(None, None), (0.3, None), (None, True)])
def test_gluon_sm90_kernel_in_the_lowered_graph(monkeypatch, density, dynamic):
    """On an sm_90 GPU the default mode's lowered graph calls the warp-specialised Gluon kernel and
    gives what the Triton kernel's lowering gives (``_gluon_against_triton``), also compiled with
    symbolic sizes (``dynamic=True``: the launch checks the real tensors)."""
    _gluon_against_triton(monkeypatch, dataclasses.replace(CFG, density=density), dynamic)


def test_gluon_failure_in_the_lowered_graph_runs_the_triton_kernel(monkeypatch, caplog):
    """A Gluon kernel that fails to build inside a compiled model (made to raise here) does not
    crash the forward: ``fgcompile::sparse_attention_sm90`` runs the Triton kernel on the same
    lists, with one warning, and the outputs match the Triton kernel's lowering."""
    from fgcompile.kernels import triton_sparse as ts

    def broken(*a, **k):
        raise RuntimeError("made to fail")

    monkeypatch.setattr(ts, "_SM90_FAILED", {})
    monkeypatch.setattr(ts, "launch_sparse_kernel_sm90", broken)  # (FGCOMPILE_SM90_KERNEL=0 never calls it)
    with caplog.at_level("WARNING", logger="fgcompile"):
        _gluon_against_triton(monkeypatch)
    assert sum("Gluon sm_90 kernel failed" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("density", [None, 0.3])
def test_lowered_matches_opaque_through_the_schedule(monkeypatch, density):
    """Also with a density budget (index buffers of the budget's width in the graph), raised by
    configure() after call 2 (its sparse calls no longer fit: the kernel runs inside site_plan)."""
    cfg = dataclasses.replace(CFG, density=density)
    m1 = _model()
    m2 = copy.deepcopy(m1)
    c1 = _compile(m1, cfg)
    outs1 = []
    with torch.no_grad():
        for i in range(6):
            if density is not None and i == 2:
                fgcompile.configure(c1, density=0.6)
            outs1.append(c1(*_inputs(seed=i)))
    torch._dynamo.reset()
    monkeypatch.setenv("FGCOMPILE_LOWERING", "0")
    c2 = _compile(m2, cfg)
    with torch.no_grad():
        for i in range(6):
            if density is not None and i == 2:
                fgcompile.configure(c2, density=0.6)
            o2 = c2(*_inputs(seed=i))
            assert rel_err(outs1[i], o2) < 2e-2, (i, rel_err(outs1[i], o2))
    s1, s2 = fgcompile.stats(c1), fgcompile.stats(c2)
    profiled = 2 if density is None else 3  # configure() drops the mask: call 2 re-profiles
    for name in s1:
        assert s1[name].profiled_calls == s2[name].profiled_calls == profiled
        assert s1[name].sparse_calls == s2[name].sparse_calls == 6 - profiled


def test_no_host_sync_in_steady_state():
    m = _model()
    c = _compile(m)
    with torch.no_grad():
        for i in range(3):  # compile, profiled call, first sparse call (autotuning benchmarks)
            c(*_inputs(seed=i))
        torch.cuda.synchronize()
        x = _inputs(seed=9)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                out = c(*x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out.float()).all()


def test_reduce_overhead_matches_default():
    from torch._dynamo.utils import counters

    m1 = _model()
    m2 = copy.deepcopy(m1)
    cfg = FGAttnConfig(predictor="profile", alpha=0.3, profile_calls=(0,), block_m=128, min_seq_len=256, max_density=1.0)
    c_default = _compile(m1, cfg)
    c_ro = _compile(m2, cfg, mode="reduce-overhead")
    counters.clear()
    with torch.no_grad():
        for i in range(6):
            x = _inputs(seed=i)
            a = c_default(*x).clone()
            b = c_ro(*x).clone()
            assert rel_err(a, b) < 1e-2, (i, rel_err(a, b))
    skips = dict(counters["inductor"])
    assert not any("cudagraph_skips" in k and v for k, v in skips.items()), skips
    s = fgcompile.stats(c_ro)
    assert all(v.sparse_calls == 5 for v in s.values())


def test_shape_change_recompiles_and_never_reuses_a_stale_mask():
    m = _model()
    c = _compile(m)
    with torch.no_grad():
        for i in range(2):
            c(*_inputs(frames=4, seed=i))  # profiled, sparse (S = 4 * 16 * 16 = 1024)
        o = c(*_inputs(frames=8, seed=5))  # another shape: S = 2048 -> profiled again (no mask of this shape)
        st = runtime.state_of(c)
        for site in st.sites.values():
            assert site.mask_key[0][2] == 2048
        o2 = c(*_inputs(frames=8, seed=6))  # sparse with the 2048 mask
        o3 = c(*_inputs(frames=4, hw=48, seed=7))  # another resolution: S = 4 * 24 * 24 = 2304
    for site in st.sites.values():
        assert site.mask_key[0][2] == 2304
        assert site.n_profiled == 3 and site.n_sparse == 2
    for t in (o, o2, o3):
        assert torch.isfinite(t.float()).all()
    ref = m(*_inputs(frames=8, seed=6))
    assert rel_err(o2, ref) < 0.15


def test_toy_dit_compiled_vs_eager():
    m = _model(heads=2, width=256, depth=2)
    x = _inputs(frames=4, hw=32)
    dense = FGAttnConfig(predictor="dense", min_seq_len=256)
    with torch.no_grad():
        ref = m(*x)
        out = _compile(m, dense)(*x)
    assert rel_err(out, ref) < 1e-2
    torch._dynamo.reset()
    m2 = copy.deepcopy(m)
    c = _compile(m2, FGAttnConfig(predictor="profile", alpha=0.05, profile_calls=(0,), min_seq_len=256, max_density=1.0))
    with torch.no_grad():
        p = c(*x)  # profiled: exact
        s = c(*x)  # sparse
    assert rel_err(p, ref) < 1e-2
    assert rel_err(s, ref) < 0.05, rel_err(s, ref)
    assert all(v.sparse_calls == 1 for v in fgcompile.stats(c).values())


def _check_profiled_then_sparse(m, cfg, *inputs):
    """Compile ``m`` (one site, profiled at call 0): the profiled call is exact, the sparse call
    close, and the site ran sparse once."""
    with torch.no_grad():
        ref = m(*inputs)
        c = _compile(m, cfg)
        p = c(*inputs)
        s = c(*inputs)
    assert rel_err(p, ref) < 1e-2
    assert rel_err(s, ref) < 0.05, rel_err(s, ref)
    st = fgcompile.stats(c)
    assert len(st) == 1 and all(v.sparse_calls == 1 for v in st.values()), st


@pytest.mark.parametrize("padded", [False, True])
def test_multihead_attention_expanded_and_lowered(padded):
    """nn.MultiheadAttention (its fused call expanded to SDPA, ``passes.expand_mha``), with and
    without a key_padding_mask: a lowered sparse site, profiled call exact, sparse call close."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(256, 2, batch_first=True).cuda().to(DT).eval()

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x, kp):
            return self.mha(x, x, x, key_padding_mask=kp, need_weights=False)[0]

    x = torch.randn(2, 2048, 256, device="cuda", dtype=DT)
    kp = torch.arange(2048, device="cuda")[None, :] >= torch.tensor([[2048], [1900]], device="cuda") if padded else None
    cfg = FGAttnConfig(predictor="profile", alpha=0.05, profile_calls=(0,), min_seq_len=256, max_density=1.0)
    _check_profiled_then_sparse(M(), cfg, x, kp)


class _PaddedAttention(torch.nn.Module):
    """One SDPA self-attention with a key-padding mask (B, 1, 1, S), GQA (4 query heads, 2 kv)."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(256, 256)
        self.kv = torch.nn.Linear(256, 256)

    def forward(self, x, keep):
        b, s_, _ = x.shape
        q = self.q(x).view(b, s_, 4, 64).transpose(1, 2)
        k, v = self.kv(x).view(b, s_, 2, 2, 64).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], enable_gqa=True)
        return o.transpose(1, 2).reshape(b, s_, 256)


@pytest.mark.parametrize("why", ["warm_up", "max_density", "dense_predictor", "budget"])
def test_key_padded_dense_calls_run_the_kernel_on_the_real_keys(why, monkeypatch):
    """A dense call of a key-padded site (a warm-up call; a site over ``max_density``, with and
    without a density budget) runs the sparse kernel on every real key
    (``packing.real_key_lists``) inside site_plan, and its output is float64 attention's to bf16
    rounding; ``predictor="dense"`` keeps SDPA."""
    from fgcompile.kernels import packing

    made = []
    real = packing.real_key_lists
    monkeypatch.setattr(packing, "real_key_lists", lambda *a: made.append(a) or real(*a))
    torch.manual_seed(0)
    m = _PaddedAttention().cuda().eval()
    x = torch.randn(2, 2048, 256, device="cuda")
    keep = torch.arange(2048, device="cuda")[None, :] < torch.tensor([[2000], [1700]], device="cuda")
    with torch.no_grad():
        ref = copy.deepcopy(m).double()(x.double(), keep)
    m, x = m.to(DT), x.to(DT)
    cfg = dict(warm_up=FGAttnConfig(dense_calls=2, min_seq_len=256),
               max_density=FGAttnConfig(alpha=1e-6, max_density=0.5, min_seq_len=256),
               dense_predictor=FGAttnConfig(predictor="dense", min_seq_len=256),
               budget=FGAttnConfig(alpha=1e-6, density=0.5, max_density=0.4, min_seq_len=256))[why]
    c = _compile(m, cfg)
    outs = []
    with torch.no_grad():
        for _ in range(3):
            outs.append(c(x, keep))
            torch.cuda.synchronize()  # the profiled mask's density reaches the host before the next call
    st = next(iter(fgcompile.stats(c).values()))
    errs = [rel_err(o, ref) for o in outs]
    assert all(e < 1e-2 for e in errs), errs
    # warm_up: calls 0 and 1 dense, 2 profiled; max_density, budget: 0 profiled, 1 and 2 dense
    assert st.dense_calls == (3 if why == "dense_predictor" else 2) and st.fallback is None, st
    assert len(made) == (0 if why == "dense_predictor" else 2), made


@pytest.mark.parametrize("spelling", ["sdpa_one_minus", "hand_written_where"])
def test_key_mask_written_as_a_bias_lowered(spelling):
    """A float bias built in the graph from a boolean key mask (0 / very negative) is served as a
    key-padding site on CUDA: lowered, profiled call exact, sparse call close, padded keys unused."""
    torch.manual_seed(0)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(256, 768)

        def forward(self, x, keep):
            b, s_, _ = x.shape
            q, k, v = self.qkv(x).view(b, s_, 3, 2, 128).permute(2, 0, 3, 1, 4).unbind(0)
            if spelling == "sdpa_one_minus":
                bias = ((1 - keep.to(x.dtype)) * -10000.0)[:, None, None, :]
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            else:
                bias = torch.where(keep, 0.0, float("-inf"))[:, None, None, :]
                o = ((q @ k.transpose(-2, -1)) * 128 ** -0.5 + bias).softmax(-1).to(v.dtype) @ v
            return o.transpose(1, 2).reshape(b, s_, 256)

    m = M().cuda().to(DT).eval()
    x = torch.randn(2, 2048, 256, device="cuda", dtype=DT)
    keep = torch.arange(2048, device="cuda")[None, :] < torch.tensor([[2048], [1900]], device="cuda")
    cfg = FGAttnConfig(predictor="profile", alpha=0.05, profile_calls=(0,), min_seq_len=256, max_density=1.0)
    rep = fgcompile.explain(m, x, keep, config=cfg)
    assert [(s_.decision, s_.mask) for s_ in rep.sites] == [("sparse", "key_padding")], rep.table()
    _check_profiled_then_sparse(m, cfg, x, keep)


@pytest.mark.parametrize("lowered", [True, False])
@pytest.mark.parametrize("setting", ["profile", "budget", "pooled"])
def test_precompile_step_runs(lowered, setting):
    """The background precompile's scratch step (``fgcompile.lowering.warmup._step``) runs the
    schedule step's kernels for each predictor, for lowered and opaque sites; it raises on failure."""
    from fgcompile.lowering import warmup

    cfg = {"profile": CFG, "budget": dataclasses.replace(CFG, density=0.3),
           "pooled": dataclasses.replace(CFG, predictor="pooled")}[setting]
    q = torch.empty(1, 4, 1000, 128, device="cuda", dtype=DT).transpose(1, 2).contiguous().transpose(1, 2)
    k, v = (torch.empty(1, 2, 1000, 128, device="cuda", dtype=DT) for _ in range(2))
    specs = tuple(warmup._spec(t) for t in (q, k, v))
    assert specs[0][1] == q.stride()
    from fgcompile.predictors import density_budget

    cols = density_budget(1000, 0.3) if setting == "budget" else 1000
    thunks = warmup._step("t", cfg, (*specs, None), 128 ** -0.5, cols if lowered else None, lowered)
    assert thunks  # the step's Triton kernels, to compile in parallel
    for dev, t in thunks:
        with torch.cuda.device(dev):
            t()  # JITFunction.warmup: compiles, launches nothing


@pytest.mark.parametrize("setting", ["profile", "pooled"])
def test_precompile_children_fill_tritons_cache(setting, monkeypatch, tmp_path):
    """The schedule step's kernels compile in forked children (no CUDA call there) into Triton's
    on-disk cache; the warmup thread's own compile of each launch is then a cache hit."""
    from triton import knobs

    from fgcompile.lowering import warmup

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    cfg = CFG if setting == "profile" else dataclasses.replace(CFG, predictor="pooled")
    q, k, v = (torch.empty(1, 4, 1000, 128, device="cuda", dtype=DT) for _ in range(3))
    thunks = warmup._step("t", cfg, (*(warmup._spec(t) for t in (q, k, v)), None), 128 ** -0.5, 1000, True)
    for _, t in thunks:  # forget the binaries other tests compiled in this process
        warmup._jit_function(t).device_caches.clear()
    before = warmup.stats()
    warmup._compile_in_children("t", thunks)
    after = warmup.stats()
    n = after["children"] - before["children"]
    assert n >= 1 and after["children_ok"] - before["children_ok"] == n, after
    assert list(tmp_path.glob("*/*.cubin")), "the children compiled nothing into the cache"
    hits: list = []
    monkeypatch.setattr(knobs.compilation, "listener", lambda **kw: hits.append(kw.get("cache_hit")))
    for dev, t in thunks:
        with torch.cuda.device(dev):
            warmup._load(t())
    assert len(hits) >= len(thunks) and all(hits), hits


def test_compile_precompiles_the_schedule_step():
    """The compile starts the site's schedule step in the background and the first call joins it.
    (The step's key ends with ``lowered``: True where Inductor compiles the Triton sparse kernel,
    False where the Gluon sm_90 kernel serves the site and the step compiles it too, on Hopper.)"""
    import dataclasses

    from fgcompile.lowering import warmup

    cfg = dataclasses.replace(CFG, alpha=0.31)  # a key no other test schedules
    steps = warmup._STATS["steps"]
    c = _compile(_model(depth=1), cfg)
    with torch.no_grad():
        c(*_inputs())
    assert not warmup._PENDING  # joined at the first call
    assert [key for key in warmup._DONE_KEYS if key[2] == cfg], warmup._DONE_KEYS
    assert warmup._STATS["steps"] > steps  # traced (a failed step drops its key and counts nothing)


def test_compile_starts_inductors_compile_pool(monkeypatch):
    # as backend="inductor" does on entry: without it Inductor compiles its kernels in this process
    from fgcompile.lowering import torch_private

    calls, real = [], torch_private.warm_compile_pool
    monkeypatch.setattr(torch_private, "warm_compile_pool", lambda: calls.append(1) or real())
    c = _compile(_model(depth=1))
    with torch.no_grad():
        c(*_inputs())
    assert calls, "the backend did not start Inductor's compile pool"


_WARM_CACHE_SCRIPT = """
import torch, fgcompile
from torch._dynamo.utils import counters
from fgcompile import FGAttnConfig
from fgcompile.testing.metrics import rel_err
from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT
torch.manual_seed(0)
m = ToyVideoDiT(ToyDiTConfig(depth=2, width=256, heads=2)).eval().cuda().to(torch.bfloat16)
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(1, 4, 4, 32, 32, device="cuda", generator=g).to(torch.bfloat16)
t = torch.rand(1, device="cuda", generator=g).to(torch.bfloat16)
text = torch.randn(1, 16, 64, device="cuda", generator=g).to(torch.bfloat16)
cfg = FGAttnConfig(predictor="profile", alpha=0.3, profile_calls=(0,), min_seq_len=256, max_density=1.0)
c = torch.compile(m, backend=fgcompile.backend(cfg), fullgraph=True)
with torch.no_grad():
    ref = m(x, t, text)
    c(x, t, text)  # profiled
    s = c(x, t, text)  # sparse
err = rel_err(s, ref)
print("HITS", counters["inductor"]["fxgraph_cache_hit"], "ERR", err)
"""


def test_warm_inductor_cache_in_a_new_process(tmp_path):
    """A second process compiling the same model loads Inductor's cached code (an FX-graph-cache
    hit: the sparse op is not traced again) and runs it: every custom op that code calls (the Gluon
    sm_90 one on Hopper) is registered by the lowering pass itself."""
    import subprocess
    import sys

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               TRITON_CACHE_DIR=str(tmp_path / "triton"), TORCHINDUCTOR_FX_GRAPH_CACHE="1")
    runs = [subprocess.run([sys.executable, "-c", _WARM_CACHE_SCRIPT], env=env, capture_output=True, text=True,
                           timeout=600) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    hits, err = (float(w) for w in runs[1].stdout.split("HITS")[-1].split("ERR"))
    assert hits >= 1, runs[1].stdout  # the second process did load the cached graph
    assert err < 0.05, err
