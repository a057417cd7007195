"""Why the sparse kernel runs ~10% slower inside Wan2.1-1.3B than alone (cuDNN does not:
``kernel_in_model.py``, in model / alone 1.002). Captures one layer's own q, k, v and packed lists
during a sparse forward of the compiled model (480p, density budget 0.6), then times, in one run:

- the layer's kernel in the model (torch.profiler, one sparse forward), with mask_storage "host_lists"
  and "device" (no side-stream copies during the kernel);
- the same kernel alone (do_bench median) on the model's own q, k, v in place (where its allocator
  put them; their contents may have changed since), on copies of them in the same layout, on
  contiguous copies, and on random tensors of the same layout, with the same lists;

- the kernel alone on the captured tensors in the conditions the model puts it in: timed by the
  profiler as in the model (not by events), right after a ~3 ms chain of FFN-sized GEMMs (power
  draw, clocks), and while a pinned host-to-device copy runs on another stream (the host lists'
  prefetch);
- the SM clock and board power (NVML, when ``pynvml`` imports) sampled during the model's forward
  and during the kernel alone;

so that the slowdown can be told apart between the data, the layout, and the model around it.
``--other-dtype`` also times each alone case on a copy of the lists in the other index dtype (int32 /
int16): session 11 found int16 lists ~8% slower (results/session11/captured_probe_h200*.json, taken
while compiled models used int16 lists; they use int32 again since).

    python benchmarks/captured_probe.py [--layer 15] [--other-dtype] [--out OUT.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _same_layout_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its storage copied whole: same strides and offset, same data."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage().clone(), t.storage_offset(), t.size(), t.stride())


class ClockSampler:
    """SM clock (MHz) and board power (W) of GPU 0 sampled every ``period`` seconds on a thread while
    the ``with`` block runs (NVML through ``pynvml``; empty when it does not import)."""

    def __init__(self, period: float = 0.002):
        self.period, self.samples = period, []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # noqa: BLE001 - no NVML: no samples
            self._nvml = None

    def __enter__(self):
        import threading

        self.samples, self._stop = [], threading.Event()

        def run():
            n = self._nvml
            while not self._stop.is_set():
                self.samples.append((n.nvmlDeviceGetClockInfo(self._handle, n.NVML_CLOCK_SM),
                                     n.nvmlDeviceGetPowerUsage(self._handle) / 1e3))
                self._stop.wait(self.period)

        self._thread = threading.Thread(target=run, daemon=True) if self._nvml else None
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        clk, pw = zip(*self.samples)
        return {"sm_mhz_mean": sum(clk) / len(clk), "sm_mhz_min": min(clk), "sm_mhz_max": max(clk),
                "power_w_mean": sum(pw) / len(pw), "power_w_max": max(pw), "samples": len(clk)}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main(argv=None) -> None:
    import triton
    from results_io import write_result

    import fgcompile
    from fgcompile import runtime
    from fgcompile.kernels.triton_sparse import sparse_attention_triton
    from e2e_wan import WAN_13B, build, inputs
    from kernel_in_model import kernel_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--density", type=float, default=0.6)
    p.add_argument("--other-dtype", action="store_true", help="also time the lists in the other index dtype")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev, dt = torch.device("cuda"), torch.bfloat16

    def bench(fn):
        return float(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median"))

    model = build(WAN_13B, dev, dt)
    x = inputs(1, 21, 60, 104, 512, WAN_13B["text_dim"], dev, dt)
    cfg = fgcompile.FGAttnConfig(alpha=1e-6, density=args.density, profile_every=1000, block_m=128, min_seq_len=4096,
                                 mask_storage="host_lists")
    model.compile_repeated_blocks(backend=fgcompile.backend(cfg))
    want = f"blocks.{args.layer}.attn1"
    captured = {}
    real_plan = runtime.plan_site

    def plan(handle, q, k, v, key_padding, scale, owner=None, index_cap=None):
        out, packed = real_plan(handle, q, k, v, key_padding, scale, owner, index_cap)
        site = runtime._site(handle, owner)
        if packed is not None and out is None and want in runtime.state_of(model).sites and \
                runtime.state_of(model).sites[want] is site:
            # copies of the whole storages (the compiled graph may reuse its buffers), same layout
            captured.update(q=_same_layout_copy(q), k=_same_layout_copy(k), v=_same_layout_copy(v), scale=scale,
                            in_place=(q, k, v),  # the model's own tensors (their contents may change later)
                            packed=dataclasses.replace(packed, counts=packed.counts.clone(), indices=packed.indices.clone(),
                                                       full_counts=packed.full_counts.clone(),
                                                       full_tiles=packed.full_tiles.clone()))
        return out, packed

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "layer": want, "density": args.density}
    with torch.no_grad():
        model(*x, return_dict=False)  # compile + profiled call
        model(*x, return_dict=False)  # sparse: makes the host lists
        runtime.plan_site = plan
        try:
            model(*x, return_dict=False)  # sparse, captured
        finally:
            runtime.plan_site = real_plan
        torch.cuda.synchronize()
        for storage in ("host_lists", "device"):
            fgcompile.configure(model, mask_storage=storage)
            model(*x, return_dict=False)
            model(*x, return_dict=False)
            with ClockSampler() as clocks:
                model(*x, return_dict=False)
                torch.cuda.synchronize()
            res[f"in_model_{storage}_clocks"] = clocks.summary()
            tab = kernel_table(lambda: model(*x, return_dict=False))
            calls = next((v[2] for k, v in tab.items() if k.startswith("_fg_sparse")), [])
            res[f"in_model_{storage}_ms"] = calls
            if storage == "host_lists":
                top = sorted(tab.items(), key=lambda kv: -kv[1][1])[:20]
                res["in_model_top_kernels"] = {n: [r[0], round(r[1], 3)] for n, r in top}
                for n, r in top:
                    print(f"   {r[0]:4d} x {r[1]:9.3f} ms  {n}", flush=True)
            print(f"in model ({storage}): layer {args.layer} {calls[args.layer]:.3f} ms, mean {sum(calls) / len(calls):.3f} ms,"
                  f" clocks {res[f'in_model_{storage}_clocks']}", flush=True)
        q, k, v, packed, scale = (captured[n] for n in ("q", "k", "v", "packed", "scale"))
        print("captured strides q", q.stride(), "k", k.stride(), "v", v.stride(), "idx", packed.indices.dtype,
              tuple(packed.indices.shape), flush=True)
        res["strides"] = {"q": list(q.stride()), "k": list(k.stride()), "v": list(v.stride())}
        out = torch.empty_like(q)
        cases = {
            "model_tensors_in_place": captured["in_place"],  # where the model's allocator put them
            "captured": (q, k, v),
            "captured_contiguous": tuple(t.contiguous() for t in (q, k, v)),
            "random_same_layout": tuple(torch.randn_like(t) for t in (q, k, v)),
            "captured_scaled_down": tuple(t * 0.25 for t in (q, k)) + (v,),
        }
        lists = {str(packed.indices.dtype).replace("torch.", ""): packed}
        if args.other_dtype:
            other = torch.int32 if packed.indices.dtype == torch.int16 else torch.int16
            lists[str(other).replace("torch.", "")] = dataclasses.replace(packed, indices=packed.indices.to(other))
        for rep in range(2):  # interleaved, twice
            for name, (a, b, c) in cases.items():
                for ld, pk in lists.items():
                    with ClockSampler() as clocks:
                        t = bench(lambda: sparse_attention_triton(a, b, c, pk, scale, out=out))
                    res.setdefault(f"{name}_{ld}_ms", []).append(t)
                    res.setdefault(f"{name}_{ld}_clocks", []).append(clocks.summary())
                    print(f"alone {name:22s} {ld} lists {t:.3f} ms  clocks {clocks.summary()}", flush=True)
        res.update(_in_conditions(lambda: sparse_attention_triton(q, k, v, packed, scale, out=out), kernel_table))
        for name, t in (("q", q), ("k", k), ("v", v)):
            res[f"{name}_abs_mean"] = float(t.float().abs().mean())
            res[f"{name}_abs_max"] = float(t.float().abs().max())
        print({k2: round(v2, 3) for k2, v2 in res.items() if k2.endswith(("abs_mean", "abs_max"))})
    print("wrote", write_result(res, "captured_probe", args.out))


def _in_conditions(run, kernel_table, n: int = 20) -> dict:
    """``run`` (one sparse-kernel launch) alone in the conditions of the model: per-call times by the
    profiler (the in-model figures' clock) with the L2 flushed between calls, after a chain of
    FFN-sized GEMMs (event-timed), and while a 1 GiB pinned host-to-device copy runs on a side stream."""
    dev = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.int8, device=dev)
    a = torch.randn(32760, 1536, device=dev, dtype=torch.bfloat16)
    w = torch.randn(1536, 8960, device=dev, dtype=torch.bfloat16)
    host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    dst = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream()
    res = {}

    def profiled():
        for _ in range(n):
            flush.zero_()
            run()

    tab = kernel_table(profiled)
    calls = next((v[2] for k2, v in tab.items() if k2.startswith("_fg_sparse")), [])
    res["alone_profiler_ms"] = _median(calls) if calls else float("nan")

    def timed(before):
        ts = []
        for _ in range(n):
            flush.zero_()
            before()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            run()
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1))
        return _median(ts)

    def gemms():
        for _ in range(3):
            torch.matmul(a, w)

    def h2d():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dst.copy_(host, non_blocking=True)

    res["alone_events_ms"] = timed(lambda: None)
    with ClockSampler() as clocks:
        res["alone_after_gemms_ms"] = timed(gemms)
    res["alone_after_gemms_clocks"] = clocks.summary()
    res["alone_during_h2d_ms"] = timed(h2d)
    torch.cuda.synchronize()
    for key in ("alone_profiler_ms", "alone_events_ms", "alone_after_gemms_ms", "alone_during_h2d_ms"):
        print(f"{key:24s} {res[key]:.3f} ms", flush=True)
    print("clocks after gemms", res["alone_after_gemms_clocks"], flush=True)
    return res


if __name__ == "__main__":
    main()
