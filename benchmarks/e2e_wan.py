"""End to end on Wan2.1-1.3B's architecture: one transformer forward, default torch.compile vs
backend="fgattn".

diffusers WanTransformer3DModel with the 1.3B configuration (30 layers, 12 heads of 128, ffn 8960,
qk RMS norm, 3D RoPE), random weights, bf16, on latents (B, 16, 21, 60, 104) = 32,760 tokens (480p,
81 frames) and (B, 16, 21, 90, 160) = 75,600 tokens (720p), text (B, 512, 4096).

Both sides are compiled the way diffusers recommends for these models, block by block
(``model.compile_repeated_blocks(...)``: each of the 30 identical blocks is one compiled graph),
so compile time stays small; the default side uses backend="inductor" (SDPA picks cuDNN on an
H100), the fgattn side ``fgcompile.backend(...)``. Settings of the fgattn side:

- ``d0.6`` / ``d0.3``: the density budget (``density=0.6`` / ``0.3``) over a near-zero alpha, so
  each query block keeps exactly its strongest 60% / 30% of keys (speed at a known density);
- ``profile``: the FG-Attn rule, alpha = 0.5, profiled every 10 calls: the density it reaches on
  these random weights is reported.

Timing: median of CUDA-event-timed forwards after the profiled call (steady state: sparse calls),
warm. Memory: the default model's own peak (its weights + the active memory its forward adds:
allocated, or freed but still used by pending work of a stream), and fgattn's as that plus the
difference of the two models' process peaks during their timed forwards (both models resident in
both; it counts everything fgattn holds on the GPU: device masks, the index lists prefetched
between forwards, its forward's buffers), as a ratio fgattn / default; the process peaks
themselves are kept as process_memory_ratio. Breakdown: torch.profiler kernel times, attention kernels vs the rest. The limit: the run's
time with its self-attention scaled by the density (the default's attention kernels minus those that
stay dense on the fgattn side, i.e. the cross-attention; rows where every site runs dense count
none as staying dense).

    python benchmarks/e2e_wan.py                       # H100: writes benchmarks/results/e2e_wan_<device>.json + .png
    python benchmarks/e2e_wan.py --tiny --device cpu   # a smoke run of the script on a tiny config
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import fgcompile
from fgcompile.testing.metrics import rel_err

WAN_13B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6,
)
TINY = dict(WAN_13B, num_attention_heads=2, attention_head_dim=64, ffn_dim=128, num_layers=2, text_dim=64)

ATTN_KERNEL_MARKERS = ("fmha", "flash", "attention", "sdpa", "cudnn", "_fg_sparse", "_profile", "fg_")


def build(cfg: dict, device, dtype, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**cfg).to(device=device, dtype=dtype).eval()


def inputs(batch, frames, h, w, text_len, text_dim, device, dtype, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    lat = torch.randn(batch, 16, frames, h, w, generator=g).to(device, dtype)
    txt = torch.randn(batch, text_len, text_dim, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    return lat, t, txt


def active_bytes(which: str = "current") -> int:
    """The CUDA caching allocator's active bytes (``"current"`` or ``"peak"``): allocated memory
    plus freed memory that pending work of a stream still uses (``record_stream``: the prefetched
    masks and lists of the side stream), which ``max_memory_allocated`` leaves out (session 13)."""
    return torch.cuda.memory_stats()[f"active_bytes.all.{which}"]


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def timed(fn, reps, device):
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def first_call(fn, device):
    """(output, wall seconds) of ``fn()``, the GPU's work included: a compiled model's first call
    (compile + run)."""
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def kernel_breakdown(fn, device, top=15):
    """(attention ms, other ms, dense attention ms, top kernels) of one call, from the profiler's
    device-kernel times; dense attention: the attention kernels other than fgattn's sparse kernel
    (on the fgattn side, the cross-attention, which stays dense); top kernels: {name (first 90
    characters): [ms, calls]} of the ``top`` longest kernels in total."""
    if device.type != "cuda":
        return None, None, None, None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    attn = other = dense_attn = 0.0
    kernels = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0.0)
        if e.key.startswith("cudaLaunch") or t == 0:
            continue
        kernels.append((t / 1e3, e.key[:90], e.count))
        name = e.key.lower()
        # Inductor's generated kernels (triton_poi/red/per_...) are named after the ops they fuse,
        # which can include "scaled_dot_product_..." (a norm fused with the SDPA input permute):
        # never attention
        if any(m in name for m in ATTN_KERNEL_MARKERS) and not name.startswith("triton_"):
            attn += t
            dense_attn += 0.0 if "_fg_sparse" in name else t
        else:
            other += t
    kernels.sort(reverse=True)
    return attn / 1e3, other / 1e3, dense_attn / 1e3, {n: [round(ms, 3), c] for ms, n, c in kernels[:top]}


def plot(result: dict, path: str) -> None:
    """The time-breakdown PNG of a result: per row, default compile (left) and fgattn (right),
    attention kernels stacked on the rest."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # the plot is a convenience
        print("no plot:", e, file=sys.stderr)
        return
    rows = result["rows"]
    labels = [f"{r['size']} b{r['batch']}\n{r['setting']}" for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    for i, r in enumerate(rows):
        if r["attn_ms_default"] is None:
            ax.bar([i - 0.2], [r["ms_default"]], 0.4, color="grey")
            ax.bar([i + 0.2], [r["ms_fgattn"]], 0.4, color="tab:blue")
            continue
        first = i == 0
        ax.bar([i - 0.2], [r["other_ms_default"]], 0.4, color="lightgrey", label="other (default)" if first else None)
        ax.bar([i - 0.2], [r["attn_ms_default"]], 0.4, bottom=[r["other_ms_default"]], color="tab:red",
               label="attention (cuDNN)" if first else None)
        ax.bar([i + 0.2], [r["other_ms_fgattn"]], 0.4, color="silver", label="other (fgattn)" if first else None)
        ax.bar([i + 0.2], [r["attn_ms_fgattn"]], 0.4, bottom=[r["other_ms_fgattn"]], color="tab:blue",
               label="attention (fgattn)" if first else None)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("GPU kernel time per forward (ms)")
    ax.set_title(f"{result['config']} forward, {result['device']}\ndefault compile (left) vs fgattn (right)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sparse_kernel_name(device) -> str:
    """The sparse kernel compiled models launch on ``device`` (every Wan site is one the Gluon
    kernel serves: bf16, head dim 128, 128-row blocks of single keys)."""
    from fgcompile.kernels.gluon_sparse_sm90 import sm90_device
    from fgcompile.kernels.triton_sparse import sm90_kernel_wanted

    return "gluon_sm90_ws" if sm90_kernel_wanted() and sm90_device(device) else "triton"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny config and grid (smoke run)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-720p", action="store_true")
    p.add_argument("--skip-b2", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--mask-storage", default="host_lists", choices=("host_lists", "host", "device"),
                   help="where fgattn keeps the cached masks between profiled calls (FGAttnConfig.mask_storage), 480p")
    p.add_argument("--mask-storage-720p", default="host", choices=("host_lists", "host", "device"),
                   help="the same at 720p (host_lists' extra list on the GPU, 0.64 GB at density 0.3, would take "
                        "the model's peak memory 13%% over the default compile's)")
    p.add_argument("--settings", default="d0.3,d0.6,profile",
                   help="the 480p batch-1 rows to run, of d0.3, d0.6, profile, and d0.3-host, d0.6-host "
                        "(the budget rows with mask_storage='host': the bitmap packed at every call)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw the PNG of a result JSON")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as fh:
            plot(json.load(fh), args.replot.replace(".json", ".png"))
        return
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = TINY if args.tiny else WAN_13B
    text_len = 16 if args.tiny else 512
    sizes = {"480p": (21, 60, 104), "720p": (21, 90, 160)} if not args.tiny else {"480p": (3, 8, 16), "720p": (3, 12, 16)}
    block_m = 128 if device.type == "cuda" else 64
    min_seq = 4096 if not args.tiny else 64

    dense_model = build(cfg, device, dtype)
    fg_model = build(cfg, device, dtype)
    fg_model.load_state_dict(dense_model.state_dict())
    dense_model.compile_repeated_blocks(backend="inductor")
    # The fgattn side is compiled for each row's density budget (the graph's index buffers hold
    # density_budget(nKB, density) columns), and both sides are compiled afresh for each size
    # (torch._dynamo.reset(): static shapes, no automatic-dynamic recompiles).
    fg_cfg = fgcompile.FGAttnConfig(alpha=1e-6, density=0.3, profile_every=10, block_m=block_m, min_seq_len=min_seq,
                                    mask_storage=args.mask_storage)
    compiled_for = [None]

    def compile_fg(key, density) -> bool:
        if compiled_for[0] == key:
            return False
        torch._dynamo.reset()
        fg_model.compile_repeated_blocks(backend=fgcompile.backend(fg_cfg, density=density))
        compiled_for[0] = key
        return True

    def write():
        def pick(size, batch, setting, key="speedup"):
            for r in rows:
                if (r["size"], r["batch"], r["setting"]) == (size, batch, setting):
                    return r[key]
            return None

        import triton

        result = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "config": "tiny" if args.tiny else "Wan2.1-1.3B", "compile": "compile_repeated_blocks (30 block graphs)",
            "dtype": str(dtype), "reps": args.reps, "rows": rows,
            # the sparse kernel compiled models launched (the Gluon sm_90 kernel on Hopper, else Triton)
            "sparse_kernel": sparse_kernel_name(device),
            "summary": {
                "speedup_480p_d06": pick("480p", 1, "d0.6"),
                "speedup_480p_d03": pick("480p", 1, "d0.3"),
                "speedup_720p_d03": pick("720p", 1, "d0.3"),
                "speedup_480p_b2_d03": pick("480p", 2, "d0.3"),
                "memory_ratio_480p_d03": pick("480p", 1, "d0.3", "memory_ratio"),
                "memory_ratio_720p_d03": pick("720p", 1, "d0.3", "memory_ratio"),
                "memory_ratio_480p_d06": pick("480p", 1, "d0.6", "memory_ratio"),
                "memory_ratio_480p_b2_d03": pick("480p", 2, "d0.3", "memory_ratio"),
                "process_memory_ratio_480p_d03": pick("480p", 1, "d0.3", "process_memory_ratio"),
                "memory_definition": "default: its weights + the peak of active memory (allocated, or freed but "
                                     "still used by a stream's pending work) its forward adds to what was active "
                                     "before; fgattn: the default's + (fgattn's process peak - the default's "
                                     "process peak), both over their timed forwards with both models resident "
                                     "(process_memory_ratio: the process peaks' ratio)",
                "limit_speedup_480p_d03": pick("480p", 1, "d0.3", "limit_speedup"),
                "profile_density_480p": pick("480p", 1, "profile", "density"),
                "speedup_480p_profile": pick("480p", 1, "profile"),
            },
        }
        tag = "cpu" if device.type != "cuda" else torch.cuda.get_device_name().split()[1].lower()
        out = args.out or os.path.join(os.path.dirname(__file__), "results", f"e2e_wan_{tag}.json")
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
        return result, out

    rows = []
    plan = [("480p", 1, [x for x in args.settings.split(",") if x])]
    if not args.skip_b2:
        plan.append(("480p", 2, ["d0.3"]))
    if not args.skip_720p:
        plan.append(("720p", 1, ["d0.3"]))
    storage = dict(mask_storage=args.mask_storage)
    settings_480p = {
        "d0.6": dict(alpha=1e-6, density=0.6, predictor="profile", **storage),
        "d0.3": dict(alpha=1e-6, density=0.3, predictor="profile", **storage),
        "profile": dict(alpha=0.5, density=None, predictor="profile", **storage),
        "d0.6-host": dict(alpha=1e-6, density=0.6, predictor="profile", mask_storage="host"),
        "d0.3-host": dict(alpha=1e-6, density=0.3, predictor="profile", mask_storage="host"),
    }
    with torch.no_grad():
        for size, batch, names in plan:
            settings = settings_480p if size == "480p" else {
                n: {**v, "mask_storage": args.mask_storage_720p} for n, v in settings_480p.items()}
            f, h, w = sizes[size]
            torch._dynamo.reset()
            compiled_for[0] = None
            compile_fg_s = None  # a row that reuses the previous row's compile reports None
            x = inputs(batch, f, h, w, text_len, cfg["text_dim"], device, dtype)
            tokens = f * (h // 2) * (w // 2)

            def run_dense():
                return dense_model(*x, return_dict=False)[0]

            t0 = time.perf_counter()
            ref = run_dense()
            if device.type == "cuda":
                torch.cuda.synchronize()
            compile_dense_s = time.perf_counter() - t0
            run_dense()
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = active_bytes()
                torch.cuda.reset_peak_memory_stats()
            t_dense = timed(run_dense, args.reps, device)
            mem_dense = active_bytes("peak") if device.type == "cuda" else None
            mem_dense_alloc = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            # the model alone: its weights + the active memory its forward adds to what was there
            model_mem_dense = (param_bytes(dense_model) + mem_dense - base) if device.type == "cuda" else None
            attn_dense, other_dense, _, top_dense = kernel_breakdown(run_dense, device)
            print(f"[{size} b{batch}] default compile: {t_dense:.1f} ms (attention {attn_dense} ms)", flush=True)
            def run_fg():
                return fg_model(*x, return_dict=False)[0]

            for name in names:
                if compile_fg((size, batch, settings[name]["density"]), settings[name]["density"]):
                    t0 = time.perf_counter()
                    run_fg()  # compiles
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    compile_fg_s = time.perf_counter() - t0
                fgcompile.configure(fg_model, **settings[name])
                fgcompile.reset(fg_model)
                first = run_fg()  # the profiled call: exact
                err_first = rel_err(first, ref)
                out = run_fg()  # sparse
                err = rel_err(out, ref)
                st = fgcompile.stats(fg_model)
                masks = sum(x.mask_bytes for x in st.values())  # cached bitmaps on the GPU
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                direct_before = sum(x.direct_calls for x in st.values())
                t_fg = timed(run_fg, args.reps, device)
                mem_fg = active_bytes("peak") if device.type == "cuda" else None
                mem_fg_alloc = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
                # the default's model memory plus what the fgattn forwards' process peak adds to the
                # default forwards' (both models resident in both; everything fgattn holds on the
                # GPU counts: device masks, the lists prefetched between forwards, its forward's
                # buffers). Not its own base: that holds the copy prefetched for the next forward.
                model_mem_fg = (model_mem_dense + mem_fg - mem_dense) if device.type == "cuda" else None
                attn_fg, other_fg, cross_fg, top_fg = kernel_breakdown(run_fg, device)
                st = fgcompile.stats(fg_model)
                direct = sum(x.direct_calls for x in st.values()) - direct_before
                per_layer = {n: s.mean_density for n, s in st.items()}
                dens = statistics.mean(s.density_last and statistics.mean(s.density_last) or 0.0 for s in st.values())
                limit = None
                if attn_dense is not None:
                    # only the self-attention can be sparse: the default's attention minus the
                    # attention that stays dense on the fgattn side (cross-attention)
                    self_dense = attn_dense - (cross_fg if dens < 1.0 else 0.0)
                    limit = (t_dense - self_dense) + dens * self_dense
                row = dict(size=size, batch=batch, tokens=tokens, setting=name, density=dens,
                           ms_default=t_dense, ms_fgattn=t_fg, speedup=t_dense / t_fg,
                           limit_ms=limit, limit_speedup=(t_dense / limit) if limit else None,
                           attn_ms_default=attn_dense, other_ms_default=other_dense,
                           attn_ms_fgattn=attn_fg, other_ms_fgattn=other_fg,
                           top_kernels_default=top_dense, top_kernels_fgattn=top_fg,
                           rel_err_profiled_call=err_first, rel_err_sparse_call=err,
                           peak_mem_default=mem_dense, peak_mem_fgattn=mem_fg,
                           peak_mem_allocated_default=mem_dense_alloc, peak_mem_allocated_fgattn=mem_fg_alloc,
                           process_memory_ratio=(mem_fg / mem_dense) if mem_dense else None,
                           model_mem_default=model_mem_dense, model_mem_fgattn=model_mem_fg, mask_bytes=masks,
                           host_list_bytes=sum(x.host_list_bytes for x in st.values()),
                           memory_ratio=(model_mem_fg / model_mem_dense) if model_mem_dense else None,
                           direct_calls_timed=direct, mask_storage=settings[name]["mask_storage"],
                           path="graph kernel" if direct == 0 else "kernel inside site_plan (lists wider than the compiled buffers)",
                           first_call_s_default=compile_dense_s, first_call_s_fgattn=compile_fg_s,
                           per_layer_density=per_layer)
                rows.append(row)
                write()
                print(f"[{size} b{batch}] fgattn {name}: {t_fg:.1f} ms, density {dens:.3f}, speedup {t_dense / t_fg:.2f}x"
                      f"{f', limit {t_dense / limit:.2f}x' if limit else ''}, rel err {err:.3e}", flush=True)

    result, out = write()
    plot(result, out.replace(".json", ".png"))
    print("\nsetting            ms_default  ms_fgattn  speedup  density  limit")
    for r in rows:
        print(f"{r['size']} b{r['batch']} {r['setting']:<8} {r['ms_default']:10.1f} {r['ms_fgattn']:10.1f} {r['speedup']:8.2f} "
              f"{r['density']:8.3f} {r['limit_speedup'] if r['limit_speedup'] else float('nan'):6.2f}")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
