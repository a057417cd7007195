"""Where the GPU waits during one Wan2.1-1.3B forward: idle gaps on the compute stream, default
compile against backend="fgattn".

e2e_wan.py's kernel breakdown leaves ~6-7 ms of a 414 ms fgattn forward (d0.6) outside any kernel,
against ~1 ms for the default compile. This script profiles one warm forward of each (480p,
batch 1, ``compile_repeated_blocks`` as in e2e_wan.py) with torch.profiler (CPU and CUDA), and from
its Chrome trace:

- the compute stream (the stream with the most kernel time): its span (first kernel start to
  last kernel end), busy time (the union of its kernels, copies and memsets) and idle gaps;
- each gap's cause, from the launch of the kernel after it (matched by correlation id): "host"
  when that launch came after the previous kernel had ended (the GPU waited for the CPU), else
  "device" (a cross-stream wait or the launch latency); host gaps are attributed to the innermost
  CPU op around the launch;
- the kernels, copies and memsets of the forward, by name (total ms, count: every stream);
- the self-attention kernels and the host-to-device copies on other streams in time (which
  kernels ran while a copy did);
- the CUDA runtime/driver calls of the forward on the CPU (count and total ms; synchronising calls
  and allocations show up here);
- the time of the forward on the host (until the call returns, no sync) and on the GPU (events),
  and the most active memory (allocated, or freed but still used by a stream's pending work) the
  timed forwards added to what was active before them.

Variants: ``default``, and fgattn at a density budget with each ``--storages`` mask storage
(default ``host_lists,device,host``).

    python benchmarks/gap_probe.py [--density 0.6] [--storages host_lists,device] [--out OUT.json]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def analyse_trace(path: str, top: int = 15) -> dict:
    """The compute stream's span, busy time and idle gaps (with causes) and the CPU's CUDA API calls
    of a Chrome trace written by ``torch.profiler.profile.export_chrome_trace``."""
    with open(path) as fh:
        events = [e for e in json.load(fh)["traceEvents"] if e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    by_stream = defaultdict(list)
    for e in gpu:
        by_stream[e["args"].get("stream")].append(e)
    kernel_time = {s: sum(e["dur"] for e in es if e["cat"] == "kernel") for s, es in by_stream.items()}
    main = max(kernel_time, key=kernel_time.get)
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    ops_by_tid = defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op":
            ops_by_tid[e["tid"]].append(e)
    for es in ops_by_tid.values():
        es.sort(key=lambda e: e["ts"])

    def enclosing_op(launch) -> str:
        ops = ops_by_tid.get(launch["tid"], [])
        i = bisect.bisect_right([o["ts"] for o in ops], launch["ts"])
        best = None
        for o in reversed(ops[:i]):
            if o["ts"] + o["dur"] >= launch["ts"] and (best is None or o["dur"] < best["dur"]):
                best = o
        return best["name"] if best is not None else "(no op)"

    es = sorted(by_stream[main], key=lambda e: e["ts"])
    gaps, busy, end = [], 0.0, None
    for i, e in enumerate(es):
        start, stop = e["ts"], e["ts"] + e["dur"]
        if end is not None and start > end:
            gap = start - end
            launch = launches.get(e["args"].get("correlation"))
            cause, where = "device", ""
            if launch is not None and launch["ts"] + launch["dur"] > end:
                cause, where = "host", enclosing_op(launch)
            gaps.append(dict(us=gap, cause=cause, cpu_op=where, before=e["name"][:80],
                             after=es[i - 1]["name"][:80], at_us=start - es[0]["ts"]))
        busy += max(0.0, stop - max(start, end if end is not None else start))
        end = stop if end is None else max(end, stop)
    span = end - es[0]["ts"]
    by_cause = defaultdict(float)
    by_op = defaultdict(float)
    for g in gaps:
        by_cause[g["cause"]] += g["us"]
        if g["cause"] == "host":
            by_op[g["cpu_op"]] += g["us"]
    api = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in LAUNCH_CATS:
            api[e["name"]][0] += 1
            api[e["name"]][1] += e["dur"] / 1e3
    kernels = defaultdict(lambda: [0.0, 0])
    for e in gpu:
        kernels[e["name"][:80]][0] += e["dur"] / 1e3
        kernels[e["name"][:80]][1] += 1
    other_streams = {str(s): dict(kernels_ms=round(kernel_time[s] / 1e3, 3),
                                  copies_ms=round(sum(e["dur"] for e in es2 if e["cat"] == "gpu_memcpy") / 1e3, 3))
                     for s, es2 in by_stream.items() if s != main}
    gaps.sort(key=lambda g: -g["us"])
    # the self-attention kernels against the host-to-device copies of other streams: when each ran
    # (ms from the first kernel of the forward) and how much of each kernel a copy overlapped
    t0 = es[0]["ts"]
    # the self-attention kernels in order: the sparse kernel's, else cuDNN's (over 1 ms: not the
    # cross-attention's)
    in_order = sorted(gpu, key=lambda e: e["ts"])
    attn = ([e for e in in_order if e["name"].startswith("_fg_sparse_fwd")]
            or [e for e in in_order if "sdpa" in e["name"] and e["dur"] > 1000.0])
    copies = sorted((e for e in gpu if e["cat"] == "gpu_memcpy" and e["args"].get("stream") != main
                     and e["dur"] > 100.0), key=lambda e: e["ts"])

    def overlap(a, b):
        return max(0.0, min(a["ts"] + a["dur"], b["ts"] + b["dur"]) - max(a["ts"], b["ts"]))

    timeline = dict(
        attention=[[round((e["ts"] - t0) / 1e3, 3), round(e["dur"] / 1e3, 4),
                    round(sum(overlap(e, c) for c in copies) / max(e["dur"], 1e-9), 3)] for e in attn],
        copies=[[round((c["ts"] - t0) / 1e3, 3), round(c["dur"] / 1e3, 4)] for c in copies],
    )
    return dict(
        span_ms=span / 1e3, busy_ms=busy / 1e3, idle_ms=(span - busy) / 1e3, n_gaps=len(gaps),
        idle_by_cause_ms={k: v / 1e3 for k, v in by_cause.items()},
        host_idle_by_cpu_op_ms=dict(sorted(((k, v / 1e3) for k, v in by_op.items()), key=lambda kv: -kv[1])[:top]),
        gaps_over_50us=sum(1 for g in gaps if g["us"] > 50), top_gaps=gaps[:top],
        gap_histogram_us={f"<{b}": sum(1 for g in gaps if g["us"] < b and g["us"] >= a)
                          for a, b in ((0, 5), (5, 20), (20, 100), (100, 1000), (1000, 1e9))},
        api_calls={k: [v[0], round(v[1], 3)] for k, v in sorted(api.items(), key=lambda kv: -kv[1][1])[:25]},
        top_kernels={k: [round(v[0], 3), v[1]] for k, v in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:2 * top]},
        attention_ms_in_order=[round(e["dur"] / 1e3, 4) for e in attn],
        main_stream=str(main), other_streams=other_streams,
        timeline=timeline,
    )


def main(argv=None) -> None:
    import triton
    from results_io import write_result

    import fgcompile
    from e2e_wan import WAN_13B, active_bytes, build, inputs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--density", type=float, default=0.6)
    p.add_argument("--storages", default="host_lists,device,host", help="mask storages, comma-separated")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    x = inputs(1, 21, 60, 104, 512, WAN_13B["text_dim"], device, dtype)
    dense = build(WAN_13B, device, dtype)
    fg = build(WAN_13B, device, dtype)
    fg.load_state_dict(dense.state_dict())
    dense.compile_repeated_blocks(backend="inductor")
    cfg = fgcompile.FGAttnConfig(alpha=1e-6, density=args.density, profile_every=10, block_m=128, min_seq_len=4096)
    fg.compile_repeated_blocks(backend=fgcompile.backend(cfg))

    def measure(model) -> dict:
        def fwd():
            return model(*x, return_dict=False)[0]

        gpu, host = [], []
        torch.cuda.synchronize()
        base = active_bytes()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.reps):
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            a.record()
            fwd()
            b.record()
            host.append(1e3 * (time.perf_counter() - t0))
            torch.cuda.synchronize()
            gpu.append(a.elapsed_time(b))
        peak = active_bytes("peak") - base  # the most active memory the timed forwards added
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fwd()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "trace.json")
            prof.export_chrome_trace(path)
            trace = analyse_trace(path)
        return dict(gpu_ms=statistics.median(gpu), host_ms=statistics.median(host), gpu_all=gpu, host_all=host,
                    forward_peak_bytes=peak, trace=trace)

    results = {}
    with torch.no_grad():
        for _ in range(2):
            dense(*x, return_dict=False)
        results["default"] = measure(dense)
        fg(*x, return_dict=False)  # compiles; fgcompile's state exists from here on
        for storage in [s for s in args.storages.split(",") if s]:
            fgcompile.configure(fg, mask_storage=storage)
            fgcompile.reset(fg)
            for _ in range(3):  # the profiled call, sparse calls
                fg(*x, return_dict=False)
            name = f"fgattn_d{args.density}_{storage}"
            results[name] = measure(fg)
            st = fgcompile.stats(fg)
            results[name]["profiled_calls"] = sum(s.profiled_calls for s in st.values())
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               shape="480p b1 (32,760 tokens)", density=args.density, variants=results)
    write_result(out, "gap_probe", args.out)
    print(f"\n{'variant':<28} {'gpu ms':>8} {'host ms':>8} {'span':>8} {'busy':>8} {'idle':>7} {'host idle':>9} gaps>50us  peak GB")
    for k, r in results.items():
        t = r["trace"]
        print(f"{k:<28} {r['gpu_ms']:8.1f} {r['host_ms']:8.1f} {t['span_ms']:8.1f} {t['busy_ms']:8.1f} "
              f"{t['idle_ms']:7.2f} {t['idle_by_cause_ms'].get('host', 0.0):9.2f} {t['gaps_over_50us']:9d}  "
              f"{r['forward_peak_bytes'] / 1e9:.3f}")
    for k, r in results.items():
        t = r["trace"]
        print(f"\n{k}: idle by cause {t['idle_by_cause_ms']}, histogram {t['gap_histogram_us']}")
        print("  host idle by CPU op:", {a: round(b, 3) for a, b in list(t["host_idle_by_cpu_op_ms"].items())[:6]})
        for g in t["top_gaps"][:6]:
            print(f"  {g['us']:8.1f} us {g['cause']:<6} at {g['at_us'] / 1e3:7.2f} ms before {g['before'][:40]} "
                  f"(after {g['after'][:30]}) op {g['cpu_op'][:40]}")
        print("  api:", {a: b for a, b in list(t["api_calls"].items())[:8]})
        print("  kernels:", {a[:40]: b for a, b in list(t["top_kernels"].items())[:8]})
        a = t["attention_ms_in_order"]
        if a:
            print(f"  attention kernels: {len(a)}, first 10 mean {statistics.mean(a[:10]):.3f} ms, last 10 mean "
                  f"{statistics.mean(a[-10:]):.3f} ms, all {statistics.mean(a):.3f} ms")
        tl_ = t["timeline"]
        if tl_["copies"]:
            print("  attention [start ms, ms, share overlapped by a copy]:", tl_["attention"][:3], "...", tl_["attention"][-3:])
            print("  copies [start ms, ms]:", tl_["copies"][:4], "...", tl_["copies"][-3:])
            lap = [x for x in tl_["attention"] if x[2] > 0.5]
            free = [x for x in tl_["attention"] if x[2] <= 0.5]
            if lap and free:
                print(f"  attention with a copy over half of it: {len(lap)} kernels, {statistics.mean(x[1] for x in lap):.3f} ms;"
                      f" without: {len(free)}, {statistics.mean(x[1] for x in free):.3f} ms")


if __name__ == "__main__":
    main()
