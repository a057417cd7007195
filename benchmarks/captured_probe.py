"""Why the sparse kernel runs ~10% slower inside Wan2.1-1.3B than alone (cuDNN does not:
``kernel_in_model.py``, in model / alone 1.002). Captures one layer's own q, k, v and packed lists
during a sparse forward of the compiled model (480p, density budget 0.6), then times, in one run:

- the layer's kernel in the model (torch.profiler, one sparse forward), with mask_storage "host_lists"
  and "device" (no side-stream copies during the kernel);
- the same kernel alone (do_bench median) on the model's own q, k, v in place (where its allocator
  put them; their contents may have changed since), on copies of them in the same layout, on
  contiguous copies, and on random tensors of the same layout, with the same lists;

so that the slowdown can be told apart between the data, the layout, and the model around it. Each
alone case runs on the lists as the model made them and on a copy in the other index dtype (int32 /
int16): session 11 found int16 lists ~8% slower (results/session11/captured_probe_h200*.json, taken
while compiled models used int16 lists; they use int32 again since).

    python benchmarks/captured_probe.py [--layer 15] [--out OUT.json]
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
            tab = kernel_table(lambda: model(*x, return_dict=False))
            calls = next((v[2] for k, v in tab.items() if k.startswith("_fg_sparse")), [])
            res[f"in_model_{storage}_ms"] = calls
            print(f"in model ({storage}): layer {args.layer} {calls[args.layer]:.3f} ms, mean {sum(calls) / len(calls):.3f} ms",
                  flush=True)
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
        other = torch.int32 if packed.indices.dtype == torch.int16 else torch.int16
        lists = {str(packed.indices.dtype).replace("torch.", ""): packed,
                 str(other).replace("torch.", ""): dataclasses.replace(packed, indices=packed.indices.to(other))}
        for rep in range(2):  # the two list dtypes interleaved, twice
            for name, (a, b, c) in cases.items():
                for ld, pk in lists.items():
                    t = bench(lambda: sparse_attention_triton(a, b, c, pk, scale, out=out))
                    res.setdefault(f"{name}_{ld}_ms", []).append(t)
                    print(f"alone {name:22s} {ld} lists {t:.3f} ms", flush=True)
        for name, t in (("q", q), ("k", k), ("v", v)):
            res[f"{name}_abs_mean"] = float(t.float().abs().mean())
            res[f"{name}_abs_max"] = float(t.float().abs().max())
        print({k2: round(v2, 3) for k2, v2 in res.items() if k2.endswith(("abs_mean", "abs_max"))})
    print("wrote", write_result(res, "captured_probe", args.out))


if __name__ == "__main__":
    main()
