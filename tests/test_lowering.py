"""The lowering of attention sites (issue 6), on the CPU.

- CPU tensors: the compiled graph keeps the opaque ``fgcompile::site_attention`` op.
- CUDA sites, checked on the FX graph with fake CUDA tensors (FakeTensorMode fakes CUDA devices
  on a CPU build): the site becomes ``site_plan`` + the ``sparse_attention`` triton_op + a select,
  with the right fake shapes; blocked sites stay opaque.
- The split ops run eagerly on CPU tensors (the kernel under TRITON_INTERPRET=1): plan + kernel +
  select gives what the one opaque op gives, call after call through the schedule (dense, profiled,
  sparse), and ``site_plan``'s real outputs have its fake's shapes and strides.
The Inductor side (generated code, autotuning, CUDA graphs) is in tests/test_lowering_gpu.py.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fgcompile
from fgcompile import FGAttnConfig, runtime
from fgcompile.dynamo_backend import transform
from fgcompile.lowering import inductor as lowering_inductor
from fgcompile.lowering import ops as lops
from fgcompile.lowering.cuda import full_tile_for, index_cap_for, lowering_blocker
from graph_capture import as_fake_cuda as _as_fake_cuda, capture as _capture

os.environ["FGCOMPILE_STRICT"] = "1"

SITE = torch.ops.fgcompile.site_attention.default
PLAN = torch.ops.fgcompile.site_plan.default


class Attn(nn.Module):
    def __init__(self, dim=64, heads=1, kv_heads=1):
        super().__init__()
        self.h, self.hk, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, self.d * kv_heads)
        self.v = nn.Linear(dim, self.d * kv_heads)

    def forward(self, x):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(B, S, self.hk, self.d).transpose(1, 2)
        v = self.v(x).view(B, S, self.hk, self.d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.h != self.hk)
        return o.transpose(1, 2).reshape(B, S, self.h * self.d)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# ----------------------------------------------------------------------------- CPU: opaque op
def test_cpu_sites_keep_the_opaque_op():
    m = Attn(64).eval()
    x = torch.randn(2, 256, 64)
    gm, ex = _capture(m, x)
    with torch.no_grad():
        r = transform(gm, ex, FGAttnConfig(min_seq_len=64))
    assert [s.decision for s in r.sites] == ["sparse"]
    assert r.lowered == 0
    t = _targets(gm)
    assert SITE in t and PLAN not in t


def test_cpu_compiled_graph_holds_site_attention_and_matches_eager():
    from torch._inductor.utils import run_and_get_code

    m = Attn(64).eval()
    x = torch.randn(2, 256, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = m(x)
        c = torch.compile(m, backend=fgcompile.backend(predictor="dense", min_seq_len=64), fullgraph=True)
        out, code = run_and_get_code(c, x)
    src = "\n".join(code)
    assert "torch.ops.fgcompile.site_attention.default" in src
    assert "site_plan" not in src and "_fg_sparse_fwd" not in src
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- CUDA rewrite on fake tensors
@pytest.mark.parametrize("heads,kv_heads,block_n,density", [(1, 1, 1, None), (2, 1, 16, None), (1, 1, 1, 0.3), (2, 2, 16, 0.3)])
def test_fake_cuda_site_is_lowered(heads, kv_heads, block_n, density):
    m = Attn(64 * heads, heads, kv_heads).eval()
    x = torch.randn(2, 256, 64 * heads)
    gm, ex = _capture(m, x)
    fakes = _as_fake_cuda(gm, ex)
    cfg = FGAttnConfig(min_seq_len=64, block_m=64, block_n=block_n, density=density)
    with torch.no_grad():
        r = transform(gm, fakes, cfg)
    assert [s.decision for s in r.sites] == ["sparse"]
    assert r.lowered == 1
    t = _targets(gm)
    sparse_op = lops.sparse_attention_op()
    assert SITE not in t
    assert t.count(PLAN) == 1 and t.count(sparse_op) == 1 and torch.where not in t
    plan = next(n for n in gm.graph.nodes if n.target is PLAN)
    q, k, v, kp, scale, site, owner, bm, bn, ft, cap = plan.args
    assert (bm, bn, ft) == (64, block_n, full_tile_for(block_n))
    nkb = -(-256 // block_n)
    # a density budget bounds every row: the index buffer has that many columns (0 = nKB)
    assert cap == (0 if density is None else math.ceil(density * nkb))
    assert owner is not None and owner.op == "placeholder"
    assert runtime.template_of(site).config == cfg
    # fake shapes of the plan's outputs: counts (B, H, nQB), indices (B, H, nQB, nKB), ...
    counts, indices, fcounts, ftiles, dense_out, use_dense = plan.meta["example_value"]
    assert tuple(counts.shape) == (2, heads, 4) and counts.dtype == torch.int32
    assert tuple(indices.shape) == (2, heads, 4, cap or nkb)
    # the compiled model packs without full tiles (packing.MODEL_FULL_TILE): one unused column
    assert ft == 0 and tuple(ftiles.shape) == (2, heads, 4, 1)
    assert tuple(dense_out.shape) == (2, heads, 256, 64) and dense_out.device.type == "cuda"
    assert use_dense.shape == () and use_dense.dtype == torch.bool
    sp = next(n for n in gm.graph.nodes if n.target is sparse_op)
    assert sp.args[-5] is False  # no autotuning outside mode="max-autotune": one heuristic config
    assert sp.args[-1] is False  # the Triton kernel: no GPU here (the Gluon sm_90 kernel needs one)
    parts = tuple(n for n in gm.graph.nodes if n.op == "call_function" and n.args and n.args[0] is plan)
    # the lists, then dense_out and use_dense: the kernel's epilogue selects (no torch.where)
    assert sp.args[3:7] == parts[:4] and sp.args[-4:-2] == parts[4:6]
    assert [a.args[1] for a in sp.args[-4:-2]] == [4, 5]
    # an SDPA site's output has q's layout, as eager cuDNN SDPA's: a permuted (B, S, H, D) q gives
    # a permuted output (no copy before the output projection)
    assert sp.args[-2] is True
    qv, ov = sp.args[0].meta["example_value"], sp.meta["example_value"]
    assert ov.stride() == qv.stride() and (heads == 1 or not qv.is_contiguous())
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0].meta["example_value"]
    assert tuple(out.shape) == (2, 256, 64 * heads) and out.device.type == "cuda"


class HandAttn(Attn):
    """The same attention written by hand: softmax(q k^T * scale) @ v, whose eager output (a matmul's)
    is contiguous."""

    def forward(self, x):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(B, S, self.hk, self.d).transpose(1, 2)
        v = self.v(x).view(B, S, self.hk, self.d).transpose(1, 2)
        o = torch.softmax(q @ k.transpose(-2, -1) * self.d ** -0.5, dim=-1) @ v
        return o.reshape(B, self.h, S * self.d).sum(1)  # a view of o's contiguous layout would also work


def test_fake_cuda_hand_written_site_keeps_a_contiguous_output():
    m = HandAttn(128, heads=2, kv_heads=2).eval()
    gm, ex = _capture(m, torch.randn(2, 256, 128))
    fakes = _as_fake_cuda(gm, ex)
    with torch.no_grad():
        r = transform(gm, fakes, FGAttnConfig(min_seq_len=64, block_m=64))
    assert [s.pattern for s in r.sites] == ["matmul_softmax"] and r.lowered == 1
    sp = next(n for n in gm.graph.nodes if n.target is lops.sparse_attention_op())
    assert not sp.args[0].meta["example_value"].is_contiguous()  # q: a permuted view
    assert sp.args[-2] is False and sp.meta["example_value"].is_contiguous()


def test_fake_cuda_reference_impl_stays_opaque():
    m = Attn(64).eval()
    x = torch.randn(2, 256, 64)
    gm, ex = _capture(m, x)
    fakes = _as_fake_cuda(gm, ex)
    with torch.no_grad():
        r = transform(gm, fakes, FGAttnConfig(min_seq_len=64, impl="reference"))
    assert r.lowered == 0 and SITE in _targets(gm) and PLAN not in _targets(gm)


def test_fake_cuda_site_that_runs_dense_stays_opaque():
    """A site the detection pass made to run dense at every call (``RUN_DENSE`` on its SDPA node,
    as ``expand_flash`` marks the second sequence of a varlen call) stays the opaque op on CUDA: no
    kernel nor index buffers for it; its reason says so."""
    from fgcompile.passes.find_attention import RUN_DENSE

    m = Attn(64).eval()
    gm, ex = _capture(m, torch.randn(2, 256, 64))
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    sdpa.meta[RUN_DENSE] = "a test's reason"
    fakes = _as_fake_cuda(gm, ex)
    with torch.no_grad():
        r = transform(gm, fakes, FGAttnConfig(min_seq_len=64))
    assert [s.decision for s in r.sites] == ["sparse"] and r.sites[0].run_dense == "a test's reason"
    assert "runs dense at every call: a test's reason" in r.sites[0].reason
    assert r.lowered == 0 and SITE in _targets(gm) and PLAN not in _targets(gm)


def test_large_key_lists_warn_with_the_size():
    """A site whose per-call key lists would take more than 4 GiB (HunyuanVideo 720p, 129 frames,
    no density budget: 9.9 GiB) gets a warning naming the size and the budget that bounds it;
    a budget small enough, or a small site, none; symbolic sizes none."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fgcompile.lowering.cuda import large_lists_warning
    from fgcompile.lowering.ops import plan_shapes

    mode = FakeTensorMode()
    with mode:
        q = torch.empty(1, 24, 119056, 128, device="cuda", dtype=torch.bfloat16)
        small = torch.empty(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16)

    def warning(t, cap):
        return large_lists_warning("blocks.0.attn", plan_shapes(t, t, t, 128, 1, 0, cap)["indices"], cap > 0)

    why = warning(q, 0)
    assert why is not None and "9.9 GiB" in why and "without a density budget" in why and "density" in why
    assert warning(q, index_cap_for(119056, 1, 0.3)) is None  # 3.0 GiB
    assert warning(small, 0) is None  # Wan 480p: 0.4 GiB
    with FakeTensorMode(shape_env=ShapeEnv()) as sym:
        s = sym.shape_env.create_unbacked_symint()
        torch._check(s >= 2)
        qs = torch.empty(1, 24, s, 128, device="cuda")
    assert warning(qs, 0) is None


def test_lowering_blockers():
    cfg = FGAttnConfig()
    with FakeTensorMode():
        q = torch.empty(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
        assert lowering_blocker(q, q, q, cfg) is None
        assert "device" in lowering_blocker(q.cpu(), q.cpu(), q.cpu(), cfg)
        assert "impl" in lowering_blocker(q, q, q, FGAttnConfig(impl="reference"))
        q2 = torch.empty(1, 2, 256, 72 + 4, device="cuda", dtype=torch.bfloat16)
        assert "head dim" in lowering_blocker(q2, q2, q2, cfg)
        v = torch.empty(1, 2, 256, 32, device="cuda", dtype=torch.bfloat16)
        assert "value head dim" in lowering_blocker(q, q, v, cfg)
        q3 = torch.empty(1, 2, 256, 64, device="cuda", dtype=torch.float64)
        assert "dtype" in lowering_blocker(q3, q3, q3, cfg)
        assert "block_m" in lowering_blocker(q, q, q, FGAttnConfig(block_m=256))


def test_partition_patches():
    assert lowering_inductor.partition_config_patches(False) == {}
    p = lowering_inductor.partition_config_patches(True)
    assert p["graph_partition"] is True
    if hasattr(torch.Tag, "cudagraph_unsafe"):
        assert torch.Tag.cudagraph_unsafe in PLAN.tags
    else:  # pragma: no cover - older torch
        assert lowering_inductor.PLAN_OP_NAME in p["custom_should_partition_ops"]


def test_missing_api_error_names_it(monkeypatch):
    monkeypatch.delattr(torch.library, "wrap_triton")
    with pytest.raises(RuntimeError, match="torch.library.wrap_triton"):
        lowering_inductor.triton_op_api()


# ----------------------------------------------------------------------------- the split ops, eagerly
def _split_call(site, q, k, v, scale, owner, cfg):
    ft = full_tile_for(cfg.block_n)
    outs = PLAN(q, k, v, None, scale, site, owner, cfg.block_m, cfg.block_n, ft)
    fake = lops._site_plan_fake(q, k, v, None, scale, site, owner, cfg.block_m, cfg.block_n, ft)
    for real, f in zip(outs, fake):  # what Inductor asserts on an extern op's outputs
        assert real.shape == f.shape and real.stride() == f.stride() and real.dtype == f.dtype, (real.shape, f.shape)
    c, ix, fc, ftl, dense_out, use_dense = outs
    out = lops.sparse_attention_op()(q, k, v, c, ix, fc, ftl, scale, cfg.block_m, cfg.block_n, k.shape[2], ft,
                                     False, dense_out, use_dense)
    return out, bool(use_dense)


@pytest.mark.parametrize("block_n,kv_heads", [(1, 2), (16, 1)])
def test_split_ops_match_the_opaque_op_through_the_schedule(block_n, kv_heads):
    torch.manual_seed(0)
    cfg = FGAttnConfig(predictor="profile", alpha=0.3, profile_every=3, dense_calls=1, block_m=64,
                       block_n=block_n, impl="triton", max_density=1.0)  # random q/k: dense masks
    B, H, S, D = 1, 2, 256, 64
    owner_a, owner_b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    h = runtime.register_site("lowering.test", cfg)
    scale = D ** -0.5
    kinds = []
    for call in range(5):
        q = torch.randn(B, H, S, D)
        k = torch.randn(B, kv_heads, S, D) * 2
        v = torch.randn(B, kv_heads, S, D)
        ref = torch.ops.fgcompile.site_attention(q, k, v, None, scale, h, owner_a)
        out, dense = _split_call(h, q, k, v, scale, owner_b, cfg)
        kinds.append(dense)
        if dense:  # dense / profiled call: the exact output, bitwise
            assert torch.equal(out, ref)
        else:  # same plan, same kernel launch
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert kinds == [True, True, False, False, True]  # dense warm-up, profiled, sparse, sparse, profiled
    st_a = runtime._state_of_owner(owner_a).sites["lowering.test"]
    st_b = runtime._state_of_owner(owner_b).sites["lowering.test"]
    assert (st_a.n_dense, st_a.n_profiled, st_a.n_sparse) == (st_b.n_dense, st_b.n_profiled, st_b.n_sparse) == (1, 2, 2)


def test_site_plan_opcheck():
    cfg = FGAttnConfig(predictor="pooled", block_m=64)
    h = runtime.register_site("lowering.opcheck", cfg)
    q = torch.randn(1, 2, 128, 64)
    k, v = torch.randn(1, 2, 128, 64), torch.randn(1, 2, 128, 64)
    torch.library.opcheck(PLAN, (q, k, v, None, 0.125, h, None, 64, 1, 128),
                          test_utils=("test_schema", "test_faketensor"))


def test_kernel_config_patches_exist_in_this_torch():
    # Inductor types float kernel arguments as fp64 unless this private flag is off (the kernel's
    # qk_scale would promote the softmax to fp64); the patch must name a flag this torch has.
    import torch._inductor.config as icfg

    p = lowering_inductor.kernel_config_patches()
    for key in p:
        assert hasattr(icfg, key)
    if hasattr(icfg, "_use_fp64_for_unbacked_floats"):
        assert p["_use_fp64_for_unbacked_floats"] is False
    # the sparse kernel is launched as Inductor launches its own kernels (no C launcher compile)
    static = getattr(icfg, "use_static_cuda_launcher", False) and hasattr(icfg, "static_launch_user_defined_triton_kernels")
    assert p.get("static_launch_user_defined_triton_kernels", False) is bool(static)
    assert set(p) <= {"_use_fp64_for_unbacked_floats", "static_launch_user_defined_triton_kernels"}


def test_precompile_only_for_cuda_sites(monkeypatch):
    """``fgcompile.lowering.warmup`` compiles the schedule step's kernels in the background for
    CUDA sites with static shapes only; off under the interpreter and with FGCOMPILE_PRECOMPILE=0."""
    from fgcompile.lowering import warmup

    q = torch.zeros(1, 2, 256, 64).transpose(1, 2)
    assert warmup._spec(q) == ((1, 256, 2, 64), q.stride(), torch.float32, q.device)
    assert warmup._nbytes(warmup._spec(q)) == q.numel() * 4
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    env = ShapeEnv()
    dyn = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC, DimDynamic.STATIC, DimDynamic.DYNAMIC, DimDynamic.STATIC])
    sym = FakeTensorMode(shape_env=env).from_tensor(torch.zeros(1, 2, 256, 64), symbolic_context=dyn)
    assert warmup._spec(sym) is None and not env.guards  # symbolic: skipped, no guard added
    assert not warmup.enabled()  # the test suite runs under TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert warmup.enabled()
    assert not warmup.schedule("s", FGAttnConfig(), q, q, q, None, 0.125, None, lowered=False)  # CPU tensors
    assert not warmup._PENDING
    monkeypatch.setenv("FGCOMPILE_PRECOMPILE", "0")
    assert not warmup.enabled()


@pytest.mark.parametrize("predictor,density", [("profile", None), ("profile", 0.3), ("pooled", None)])
def test_precompile_step_on_the_cpu(monkeypatch, predictor, density):
    """The scratch schedule step itself (what the background job runs on CUDA), here on the CPU:
    it packs a mask for the graph's index columns (the packing kernel) and, for an opaque site,
    runs the sparse kernel on it."""
    from fgcompile.lowering import warmup
    from fgcompile.predictors import density_budget

    seen = []
    packed, run_sparse = runtime.SiteState.packed, runtime.SiteState.run_sparse

    def spy_packed(self, bits, k, index_cap=None):
        p = packed(self, bits, k, index_cap)
        seen.append(("packed", bits.device.type, p.indices.shape[-1]))
        return p

    def spy_run(self, *a, **kw):
        seen.append(("sparse",))
        return run_sparse(self, *a, **kw)

    monkeypatch.setattr(runtime.SiteState, "packed", spy_packed)
    monkeypatch.setattr(runtime.SiteState, "run_sparse", spy_run)
    q = torch.zeros(1, 2, 256, 32)
    specs = tuple(warmup._spec(t) for t in (q, q, q))
    cfg = FGAttnConfig(predictor=predictor, density=density, block_m=64, min_seq_len=64)
    for lowered in (True, False):
        seen.clear()
        cols = density_budget(256, density) if density else 256
        warmup._step("t", cfg, (*specs, None), 32 ** -0.5, cols if lowered else None, lowered)
        assert seen[0] == ("packed", "cpu", cols), seen
        assert (("sparse",) in seen) == (not lowered)


def test_autotune_decision_is_part_of_the_graph(monkeypatch):
    """The sparse kernel autotunes in mode="max-autotune" or with FGCOMPILE_AUTOTUNE=1 (=0: never).
    The backend decides before Inductor runs and passes the decision as an argument of the op, so
    Inductor's graph cache cannot replay a graph compiled under the other setting."""
    from fgcompile.kernels.triton_sparse import autotune_wanted

    monkeypatch.delenv("FGCOMPILE_AUTOTUNE", raising=False)
    assert autotune_wanted(True) and not autotune_wanted(False) and not autotune_wanted()
    monkeypatch.setenv("FGCOMPILE_AUTOTUNE", "1")
    assert autotune_wanted(False)
    monkeypatch.setenv("FGCOMPILE_AUTOTUNE", "0")
    assert not autotune_wanted(True)
    m = Attn(64).eval()
    gm, ex = _capture(m, torch.randn(2, 256, 64))
    fakes = _as_fake_cuda(gm, ex)
    with torch.no_grad():
        transform(gm, fakes, FGAttnConfig(min_seq_len=64, block_m=64), autotune=True)
    sp = next(n for n in gm.graph.nodes if n.target is lops.sparse_attention_op())
    assert sp.args[-5] is True


_EXIT_SCRIPT = r"""
import time
from concurrent.futures import ThreadPoolExecutor
from fgcompile.lowering import warmup
warmup._POOL = ThreadPoolExecutor(max_workers=1)
warmup._cancel_at_exit()
for _ in range(5):
    warmup._POOL.submit(time.sleep, 1.5)
print(time.time())  # the end of the script: what follows is the exit
"""


def test_exit_drops_queued_precompiles():
    """A process that ends with background compiles queued waits for the running one only (five
    1.5 s jobs queued: the executor's own exit hook alone would take 7.5 s)."""
    import subprocess
    import sys
    import time

    res = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], capture_output=True, text=True, timeout=60)
    exit_s = time.time() - float(res.stdout.split()[-1])
    assert res.returncode == 0, res.stderr[-2000:]
    assert exit_s < 4.5, exit_s


def test_precompile_threads_setting(monkeypatch, caplog):
    """FGCOMPILE_PRECOMPILE_THREADS sets the background pool's threads (default 1); a bad value
    warns and uses one thread instead of failing the compile."""
    from fgcompile.lowering import warmup

    monkeypatch.delenv("FGCOMPILE_PRECOMPILE_THREADS", raising=False)
    assert warmup._workers() == 1
    monkeypatch.setenv("FGCOMPILE_PRECOMPILE_THREADS", "3")
    assert warmup._workers() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("FGCOMPILE_PRECOMPILE_THREADS", bad)
        with caplog.at_level("WARNING", logger="fgcompile"):
            assert warmup._workers() == 1
        assert "FGCOMPILE_PRECOMPILE_THREADS" in caplog.text
        caplog.clear()


def test_precompile_jobs_queue_their_kernel_compiles(monkeypatch, caplog):
    """A schedule-step job queues its kernels' compile thunks on the pool; ``wait()`` joins the
    step and the compiles it queued (also those queued while it was joining); a failing compile
    is logged, never raised."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fgcompile.lowering import warmup

    done, gate = [], threading.Event()

    def compile_ok():
        gate.wait(5)
        done.append("ok")

    def compile_bad():
        raise RuntimeError("no such kernel")

    compile_ok.__name__ = "k"
    fake_thunks = [(torch.device("cpu"), compile_ok), (torch.device("cpu"), compile_bad)]
    monkeypatch.setattr(warmup, "_step", lambda *a: (gate.wait(5), fake_thunks)[1])
    pool = ThreadPoolExecutor(max_workers=2)
    monkeypatch.setattr(warmup, "_POOL", pool)
    monkeypatch.setattr(warmup, "_PENDING", [])
    warmup._PENDING.append(pool.submit(warmup._run, ("key",), "site", None, (), 1.0, None, True))
    threading.Timer(0.2, gate.set).start()
    with caplog.at_level("DEBUG", logger="fgcompile"):
        warmup.wait()
    assert done == ["ok"] and not warmup._PENDING
    assert "compiled k for site" in caplog.text and "no such kernel" in caplog.text
    pool.shutdown()


def test_precompile_builds_each_kernels_launcher():
    # the background compile also builds the launcher and loads the binary (Triton's
    # CompiledKernel._init_handles), for one kernel or an autotuner's list; objects without it pass
    from fgcompile.lowering import warmup

    class Compiled:
        def __init__(self):
            self.loaded = 0

        def _init_handles(self):
            self.loaded += 1

    one, many = Compiled(), [Compiled(), Compiled()]
    warmup._load(one)
    warmup._load(many)
    warmup._load(object())
    assert one.loaded == 1 and [c.loaded for c in many] == [1, 1]
