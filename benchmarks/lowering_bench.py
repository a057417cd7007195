"""Issue 6 benchmark: the CUDA lowering of the sparse attention op.

    python benchmarks/lowering_bench.py --out benchmarks/results/lowering_h100.json

Three cases: the toy video DiT at a GPU size (latents 1x4x8x64x64, patch 1x2x2 -> 8,192 tokens,
width 512, 4 heads of 128, depth 4, bf16), a Wan-1.3B-shaped attention layer (B=1, H=12,
S=32,760, D=128, bf16: one transformer-style self-attention block, width 1,536), and (compile time
only, needs diffusers) Wan2.1-1.3B itself at 480p (benchmarks/e2e_wan.py's model and inputs),
compiled the way diffusers users compile it, ``compile_repeated_blocks``.

Compiles run in the default mode: the sparse kernel launches its heuristic config and is not
autotuned (``mode="max-autotune"`` autotunes it, as Inductor does its own templates).

- compile time (cold caches: each measurement in a fresh process with empty
  TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR and the FX graph / autotune caches off): the wall
  time of the first call (Dynamo + passes + Inductor + the first run), backend="fgattn" vs
  backend="inductor" on the same model; the first sparse call of fgattn (which runs Inductor's
  autotuning of the kernel's configs) is reported separately.
- runtime: the lowered ``fgcompile::sparse_attention`` op inside a graph compiled by Inductor vs
  the direct launch (``sparse_attention_triton``, triton.autotune), same inputs (random fine-grained
  mask, density 0.3, block_m 128, block_n 1), triton.testing.do_bench median.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOY = dict(latents=(1, 4, 8, 64, 64), width=512, heads=4, depth=4)
WAN = dict(B=1, H=12, S=32760, D=128)


def _toy_model():
    from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT

    torch.manual_seed(0)
    m = ToyVideoDiT(ToyDiTConfig(depth=TOY["depth"], width=TOY["width"], heads=TOY["heads"])).eval().cuda().to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(*TOY["latents"], device="cuda", generator=g).to(torch.bfloat16)
    t = torch.rand(1, device="cuda", generator=g).to(torch.bfloat16)
    text = torch.randn(1, 16, 64, device="cuda", generator=g).to(torch.bfloat16)
    return m, (x, t, text)


class WanAttnBlock(torch.nn.Module):
    """One self-attention block at Wan-1.3B's attention shape (norm, qkv, SDPA, out projection)."""

    def __init__(self, heads=WAN["H"], dim=WAN["D"]):
        super().__init__()
        self.h, self.d = heads, dim
        w = heads * dim
        self.norm = torch.nn.LayerNorm(w)
        self.qkv = torch.nn.Linear(w, 3 * w)
        self.proj = torch.nn.Linear(w, w)

    def forward(self, x):
        B, S, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, S, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.proj(o.transpose(1, 2).reshape(B, S, W))


def _wan_model():
    torch.manual_seed(0)
    m = WanAttnBlock().eval().cuda().to(torch.bfloat16)
    x = torch.randn(WAN["B"], WAN["S"], WAN["H"] * WAN["D"], device="cuda", dtype=torch.bfloat16)
    return m, (x,)


def _wan_full_model():
    from e2e_wan import WAN_13B, build, inputs

    m = build(WAN_13B, torch.device("cuda"), torch.bfloat16)
    lat, t, txt = inputs(1, 21, 60, 104, 512, WAN_13B["text_dim"], torch.device("cuda"), torch.bfloat16)
    return m, (lat, t, txt)


def _child_compile(case: str, backend: str) -> dict:
    """Runs in a fresh process: cold-compile time of one backend on one model."""
    import torch._inductor.config as icfg

    import fgcompile

    icfg.fx_graph_cache = False
    if hasattr(icfg, "autotune_local_cache"):
        icfg.autotune_local_cache = False
    m, args = {"toy": _toy_model, "wan": _wan_model, "wan_model": _wan_full_model}[case]()
    torch.cuda.synchronize()
    be = backend if backend == "inductor" else fgcompile.backend(predictor="profile", alpha=0.3, profile_calls=(0,))
    inner, spent = torch._dynamo.lookup_backend(be), []

    def be(gm, example_inputs):  # the backend's own time (fgcompile's passes + Inductor), per graph
        t = time.perf_counter()
        try:
            return inner(gm, example_inputs)
        finally:
            spent.append(time.perf_counter() - t)
    if case == "wan_model":
        m.compile_repeated_blocks(backend=be)
        c = lambda *a: m(*a, return_dict=False)[0]  # noqa: E731
    else:
        c = torch.compile(m, backend=be, fullgraph=True)
    res = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        c(*args)
        torch.cuda.synchronize()
        res["first_call_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        c(*args)  # fgattn: the first sparse call (Inductor autotunes the kernel's configs here)
        torch.cuda.synchronize()
        res["second_call_s"] = time.perf_counter() - t0
        for _ in range(2):
            c(*args)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            c(*args)
        torch.cuda.synchronize()
        res["steady_call_s"] = (time.perf_counter() - t0) / 5
    res["backend_s"] = sum(spent)  # the rest of the first call: Dynamo's tracing and the first run
    if backend != "inductor":  # whether Inductor's program took the sparse kernel's early compile
        from fgcompile.lowering import early_compile

        res["early_compile"] = early_compile.stats()
        from fgcompile.lowering import warmup

        res["precompile"] = warmup.stats()
    try:  # Dynamo's per-phase compile times (private; diagnostic only)
        res["dynamo_compile_times"] = torch._dynamo.utils.compile_times(repr="str")
    except Exception as e:  # pragma: no cover
        res["dynamo_compile_times"] = f"unavailable: {e}"
    return res


#: compile-time variants: backend of the child and extra environment
VARIANTS = {
    "inductor": ("inductor", {}),
    "fgattn": ("fgattn", {}),
    "fgattn_noprecompile": ("fgattn", {"FGCOMPILE_PRECOMPILE": "0"}),  # without the background JIT
    # the schedule step's kernels compiled on the background thread only (before session 10)
    "fgattn_thread_precompile": ("fgattn", {"FGCOMPILE_PRECOMPILE_FORK": "0"}),
    # every site left an opaque op (no wrap_triton kernel for Inductor to analyse and compile)
    "fgattn_opaque": ("fgattn", {"FGCOMPILE_LOWERING": "0"}),
    # the gather loop with a masked tail step instead of a padded last tile (triton_sparse.PAD_TAIL)
    "fgattn_masked_tail": ("fgattn", {"FGCOMPILE_PAD_TAIL": "0"}),
    # the sparse kernel compiled when Inductor's program loads (before session 9's early compile)
    "fgattn_no_early": ("fgattn", {"FGCOMPILE_EARLY_COMPILE": "0"}),
    # the profiled call's dense forward from PyTorch's fused attention: no profiling-forward compile
    "fgattn_sdpa_forward": ("fgattn", {"FGCOMPILE_PROFILE_FORWARD": "sdpa"}),
}


#: a variant's ratio key where it is not ``compile_time_ratio_<variant less "fgattn_">`` (the key
#: committed results use)
_RATIO_NAMES = {"fgattn_noprecompile": "without_precompile"}


def _child(case: str, variant: str) -> dict:
    backend, extra = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(d, "inductor"), TRITON_CACHE_DIR=os.path.join(d, "triton"), **extra)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH")) if p)
        r = subprocess.run([sys.executable, __file__, "--child", case, backend], env=env, capture_output=True, text=True, timeout=400)
        if r.returncode != 0:
            raise RuntimeError(f"child {case}/{variant} failed:\n{r.stderr[-4000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def compile_times(case: str, repeats: int = 1, variants=("inductor", "fgattn")) -> dict:
    """Cold-compile times of ``case`` per variant, ``repeats`` fresh processes each (the variants
    interleaved, so that drift of the machine hits all alike); the ratio of the medians."""
    import statistics

    runs: dict = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            runs[v].append(_child(case, v))
    out = {v: runs[v][0] for v in variants}  # the first sample's details, as before
    # compile time = first call minus one steady call (the first call also runs the model once)
    samples = {v: [r["first_call_s"] - r["steady_call_s"] for r in runs[v]] for v in variants}
    out["compile_s_samples"] = samples
    out["early_compile_samples"] = {v: [r.get("early_compile") for r in runs[v]] for v in variants if v != "inductor"}
    out["precompile_samples"] = {v: [r.get("precompile") for r in runs[v]] for v in variants if v != "inductor"}
    out["phase_samples"] = {v: [_phases(r.get("dynamo_compile_times")) for r in runs[v]] for v in variants}
    out["compile_s"] = {v: statistics.median(x) for v, x in samples.items()}
    out["compile_time_ratio"] = out["compile_s"]["fgattn"] / out["compile_s"]["inductor"]
    for v in variants:  # each other variant's ratio: compile_time_ratio_<variant less "fgattn_">
        if v.startswith("fgattn_"):
            suffix = _RATIO_NAMES.get(v, v[len("fgattn_"):])
            out[f"compile_time_ratio_{suffix}"] = out["compile_s"][v] / out["compile_s"]["inductor"]
    out["fgattn_first_sparse_call_s"] = out["fgattn"]["second_call_s"]
    out["repeats"] = repeats
    return out


#: rows of Dynamo's compile-time table kept per sample: the backend's time, Inductor's, fgcompile's
_PHASES = ("OutputGraph.call_user_compiler", "inductor_import", "create_aot_dispatcher_function", "compile_fx_inner",
           "async_compile.precompile", "PyCodeCache.load_by_key_path")


def _phases(table: object) -> dict:
    """{phase: seconds} of the rows of ``_PHASES`` and fgcompile's own (``fgcompile.*``) in
    Dynamo's compile-time table (``compile_times(repr="str")``)."""
    out = {}
    for line in str(table or "").splitlines():
        parts = line.replace(",", " ").split()  # "name  value" (tabulate) or "name, value"
        if len(parts) >= 2 and (parts[0] in _PHASES or parts[0].startswith("fgcompile.")):
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


def _kernel_configs(code: str):
    """The sparse kernel's autotune configs in Inductor's output code; None where the graph calls
    the Gluon sm_90 kernel (an opaque op: no Triton source, no configs)."""
    from fgcompile.lowering.inductor import count_kernel_configs

    if "def _fg_sparse_fwd(" not in code and "fgcompile.sparse_attention_sm90" in code:
        return None
    return count_kernel_configs(code)


def runtime_ratio(B, H, S, D, density=0.3, dtype=torch.bfloat16) -> dict:
    import triton

    from fgcompile.attention import pack_slices
    from fgcompile.kernels.triton_sparse import sparse_attention_triton
    import torch._inductor.config as icfg

    from fgcompile.lowering.inductor import kernel_config_patches, run_and_get_code
    from fgcompile.lowering.ops import sparse_attention_op

    op = sparse_attention_op()
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype) for _ in range(3))
    keep = torch.rand(B, H, -(-S // 128), S, device="cuda") < density
    from fgcompile.kernels.packing import model_full_tile

    p = pack_slices(keep, block_n=1, seq_len_kv=S, block_m=128, full_tile=model_full_tile(1))  # the compiled model's packing
    scale = D ** -0.5

    # the kernel the lowering pass would pick (the Gluon sm_90 kernel where sm90_serves), so that
    # both sides run the same kernel: the direct launch picks it the same way
    from fgcompile.kernels.triton_sparse import sm90_serves

    sm90 = sm90_serves(q, k, v, torch.empty_like(q), 128, 1, p.full_tile)

    def lowered(q, k, v, c, ix, fc, ft):
        return op(q, k, v, c, ix, fc, ft, scale, 128, 1, S, p.full_tile, sm90=sm90)

    torch._dynamo.reset()
    # what the fgattn backend patches in when it lowers a site (fp32 float kernel arguments)
    cl = torch.compile(lowered, backend="inductor", fullgraph=True)
    args = (q, k, v, p.counts, p.indices, p.full_counts, p.full_tiles)
    with icfg.patch(kernel_config_patches()):
        out_l, codes = run_and_get_code(cl, *args)
    code = "\n".join(codes)
    n_cfg = _kernel_configs(code)  # 1: the default mode launches the heuristic config
    out_d = sparse_attention_triton(q, k, v, p, scale)
    torch.cuda.synchronize()
    from fgcompile.testing.metrics import rel_err

    rel = rel_err(out_l, out_d)
    # interleave the two measurements (3 rounds each) so clock drift hits both alike
    tl, td = [], []
    for _ in range(3):
        tl.append(triton.testing.do_bench(lambda: cl(*args), warmup=25, rep=200, return_mode="median"))
        td.append(triton.testing.do_bench(lambda: sparse_attention_triton(q, k, v, p, scale), warmup=25, rep=200, return_mode="median"))
    ml, md = sorted(tl)[1], sorted(td)[1]
    return {
        "shape": dict(B=B, H=H, S=S, D=D, dtype=str(dtype), density=density, block_m=128, block_n=1),
        "lowered_ms": ml, "direct_ms": md, "lowered_ms_rounds": tl, "direct_ms_rounds": td,
        "runtime_ratio_lowered_vs_direct": ml / md,
        "rel_diff_lowered_vs_direct": rel,
        "kernel": "gluon_sm90" if sm90 else "triton",
        "autotune_configs_in_output_code": n_cfg,
        "direct_autotuner_choice": __import__("fgcompile.kernels.triton_sparse", fromlist=["best_config"]).best_config(),
    }


def model_step(case: str) -> dict:
    """Steady-state time of one compiled-model call (sparse calls), lowered vs the opaque op."""
    import triton

    import fgcompile

    res = {}
    for lowering in ("1", "0"):
        os.environ["FGCOMPILE_LOWERING"] = lowering
        torch._dynamo.reset()
        m, args = _toy_model() if case == "toy" else _wan_model()
        c = torch.compile(m, backend=fgcompile.backend(predictor="profile", alpha=0.3, profile_calls=(0,)), fullgraph=True)
        with torch.no_grad():
            for _ in range(3):
                c(*args)
            res["lowered_ms" if lowering == "1" else "opaque_ms"] = triton.testing.do_bench(lambda: c(*args), warmup=5, rep=100, return_mode="median")
    os.environ.pop("FGCOMPILE_LOWERING", None)
    res["ratio_lowered_vs_opaque"] = res["lowered_ms"] / res["opaque_ms"]
    return res


def runtime_ratios() -> dict:
    """{"toy": ..., "wan": ...}: :func:`runtime_ratio` at the toy DiT's and at Wan2.1's attention shapes."""
    toy_tokens = TOY["latents"][2] * TOY["latents"][3] * TOY["latents"][4] // 4
    return {"toy": runtime_ratio(1, TOY["heads"], toy_tokens, TOY["width"] // TOY["heads"]),
            "wan": runtime_ratio(WAN["B"], WAN["H"], WAN["S"], WAN["D"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/lowering_h100.json")
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--no-model-step", action="store_true", help="skip the optional toy model-step extra")
    ap.add_argument("--compile-only", action="store_true",
                    help="measure compile times only; keep the runtime figures of the JSON already at --out (measured anew when there is none)")
    ap.add_argument("--cases", default="toy,wan,wan_model", help="compile-time cases (wan_model needs diffusers)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="fresh-process compiles per variant (default 3: one cold compile varies by up to 30%%); "
                         "the ratio of the medians")
    ap.add_argument("--variants", default="inductor,fgattn", help=f"compile-time variants, of {sorted(VARIANTS)}")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child_compile(*a.child)))
        return
    import triton

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": "python benchmarks/lowering_bench.py --out " + a.out,
        "toy": {"config": TOY},
        "wan": {"config": WAN},
    }
    t0 = time.time()
    merged = a.compile_only and os.path.exists(a.out)  # else the runtime is measured here too
    if merged:
        with open(a.out) as f:
            old = json.load(f)
        for case in ("toy", "wan"):
            result[case]["runtime"] = old[case]["runtime"]
        result["runtime_from"] = {k: old.get(k) for k in ("device", "torch", "triton", "command")}
    if a.compile_only:
        result["command"] += " --compile-only"
    if a.repeats != 3 or a.variants != "inductor,fgattn":
        result["command"] += f" --repeats {a.repeats} --variants {a.variants}"
    if not merged:
        for case, r in runtime_ratios().items():
            result[case]["runtime"] = r
    print(json.dumps(result, indent=1), flush=True)
    cases = a.cases.split(",")
    for case in cases:
        result.setdefault(case, {})["compile"] = compile_times(case, a.repeats, tuple(a.variants.split(",")))
        with open(a.out, "w") as f:  # partial (a run cut short keeps the cases done)
            json.dump({**result, "partial": f"compile cases done up to {case}"}, f, indent=1)
        print(case, json.dumps(result[case]["compile"]["compile_s"]), result[case]["compile"]["compile_time_ratio"], flush=True)
    if not a.compile_only and not a.no_model_step:
        try:
            result["toy"]["model_step"] = model_step("toy")
        except Exception as e:  # an extra; the summary does not depend on it
            result["model_step_error"] = f"{type(e).__name__}: {e}"
    ratios = {c: result[c]["compile"]["compile_time_ratio"] for c in cases}
    result["summary"] = {
        "compile_time_ratio": max(ratios.values()),
        **{f"compile_time_ratio_{c}": r for c, r in ratios.items()},
        "compile_mode": "default (heuristic kernel config, no autotuning)",
        "runtime_ratio_lowered_vs_direct": max(result["toy"]["runtime"]["runtime_ratio_lowered_vs_direct"],
                                               result["wan"]["runtime"]["runtime_ratio_lowered_vs_direct"]),
        "runtime_ratio_lowered_vs_direct_toy": result["toy"]["runtime"]["runtime_ratio_lowered_vs_direct"],
        "runtime_ratio_lowered_vs_direct_wan": result["wan"]["runtime"]["runtime_ratio_lowered_vs_direct"],
        "targets": {"compile_time_ratio": "<= 1.3", "runtime_ratio_lowered_vs_direct": "<= 1.03"},
    }
    result["bench_wall_s"] = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
