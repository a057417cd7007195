"""The sparse kernel on the masks Wan2.1-1.3B really makes, in the model and alone.

e2e_wan.py measures the kernel at ~5.1 ms per layer inside the model (480p, density budget 0.3)
where kernel_bench.py measures 4.5 ms on a random mask of the same density. This script:

1. compiles diffusers' Wan 1.3B (random weights, bf16, 480p, ``compile_repeated_blocks``) with
   fgattn at the density budget (0.3, then 0.6), runs the profiled call and one sparse call, and
   lists the device kernels of that sparse forward (the per-call times of ``_fg_sparse_fwd``, the
   packing, the rest);
2. takes the cached masks of three layers and reports their shape: density, the share of kept
   keys that lie in fully kept 128-key tiles, and the runs of kept keys;
3. times the kernel alone (do_bench median, q/k/v in diffusers' permuted layout) on those masks
   and on a random mask of the same per-row count, for: the packing with full tiles (what the
   model runs) and without, 32- and 64-bit key offsets, and a few tile configs; plus cuDNN SDPA;
4. (``--cudnn-in-model``, on by default) the same forward compiled by the default backend: the
   per-layer times of its self-attention kernel (cuDNN), so that the slowdown of the sparse kernel
   in the model against alone can be told apart from what the model does to any attention kernel
   (clocks under the model's power draw, L2 contents, the side stream's copies).

    python benchmarks/kernel_in_model.py [--out OUT.json]   # H100: benchmarks/results/kernel_in_model_<device>.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    "default": None,  # the launcher's choice (heuristic config, offsets by needs_64bit_offsets)
    "offs64": {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "FULL_N": 128, "OFFS_64": True},
    "offs32": {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "FULL_N": 128, "OFFS_64": False},
    "n128_s2": {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "FULL_N": 128},
    "n64_s3": {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "FULL_N": 128},
    "n64_s4": {"BLOCK_N": 64, "num_warps": 8, "num_stages": 4, "FULL_N": 64},
}


def kernel_table(fn) -> dict:
    """{kernel name: [count, total ms, per-call ms list]} of one call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or not getattr(e, "device_time", 0):
            continue
        rec = out.setdefault(e.name[:80], [0, 0.0, []])
        rec[0] += 1
        rec[1] += e.device_time / 1e3
        rec[2].append(round(e.device_time / 1e3, 4))
    return out


def mask_shape(bits: torch.Tensor, n_kb: int, full_tile: int = 128) -> dict:
    """Density, share of kept keys in fully kept aligned tiles, mean run length of kept keys."""
    from fgcompile.kernels.packing import unpack_bits

    keep = unpack_bits(bits, n_kb)  # (B, H, nQB, nKB) bool
    kept = keep.sum().item()
    usable = (n_kb // full_tile) * full_tile
    tiles = keep[..., :usable].reshape(*keep.shape[:3], -1, full_tile)
    in_full = tiles.all(-1).sum().item() * full_tile
    starts = (keep[..., 1:] & ~keep[..., :-1]).sum().item() + keep[..., 0].sum().item()
    per_row = keep.sum(-1).float()
    return {
        "density": kept / keep.numel(),
        "share_in_full_tiles": in_full / max(kept, 1),
        "mean_run": kept / max(starts, 1),
        "row_count_min": per_row.min().item(), "row_count_max": per_row.max().item(),
    }


def main(argv=None) -> None:
    import triton
    from results_io import write_result

    import fgcompile
    from fgcompile.kernels.packing import pack_slices, packed_from_bits
    from fgcompile.kernels.triton_sparse import sparse_attention_triton
    from fgcompile.runtime import state_of
    from e2e_wan import WAN_13B, build, inputs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--layers", default="0,15,29")
    p.add_argument("--cudnn-in-model", action=argparse.BooleanOptionalAction, default=True,
                   help="also profile the default compile's self-attention kernel per layer")
    args = p.parse_args(argv)
    dev, dt = torch.device("cuda"), torch.bfloat16

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")

    model = build(WAN_13B, dev, dt)
    x = inputs(1, 21, 60, 104, 512, WAN_13B["text_dim"], dev, dt)
    cfg = fgcompile.FGAttnConfig(alpha=1e-6, density=0.3, profile_every=10, block_m=128, min_seq_len=4096)
    model.compile_repeated_blocks(backend=fgcompile.backend(cfg))
    layers = [int(s) for s in args.layers.split(",")]
    B, S, H, D = 1, 32760, 12, 128
    n_kb = S
    g = torch.Generator(device="cuda").manual_seed(0)
    bshd = [torch.randn(B, S, H, D, device=dev, dtype=dt, generator=g) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in bshd)  # diffusers' layout
    scale = D ** -0.5
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "shape": dict(B=B, H=H, S=S, D=D, dtype="bf16", block_m=128, block_n=1), "densities": {}}
    with torch.no_grad():
        result["cudnn_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale))
        model(*x, return_dict=False)  # compiles (the state exists from here on)
        for density in (0.3, 0.6):
            fgcompile.configure(model, density=density)
            fgcompile.reset(model)
            model(*x, return_dict=False)  # profiled (and the first call compiles)
            model(*x, return_dict=False)  # sparse
            torch.cuda.synchronize()
            table = kernel_table(lambda: model(*x, return_dict=False))
            top = sorted(table.items(), key=lambda kv: -kv[1][1])[:25]
            sparse_calls = next((r[2] for n, r in table.items() if "_fg_sparse_fwd" in n), [])
            entry = {
                "in_model_sparse_kernel_ms": sparse_calls,
                "in_model_sparse_kernel_mean_ms": sum(sparse_calls) / max(len(sparse_calls), 1),
                "in_model_top_kernels": {n: [r[0], round(r[1], 3)] for n, r in top},
                "layers": {},
            }
            sites = state_of(model).sites
            self_sites = sorted((n for n, s in sites.items() if s.mask is not None),
                                key=lambda n: int(n.split(".")[1]) if n.split(".")[1].isdigit() else 0)
            for li in layers:
                name = next((n for n in self_sites if n.startswith(f"blocks.{li}.")), None)
                if name is None:
                    continue
                bits = sites[name].host_mask().to(dev)
                shape = mask_shape(bits, n_kb)
                cap = int(shape["row_count_max"]) + 1
                packs = {ft: packed_from_bits(bits, n_kb, 128, 1, S, ft, cap=min(cap, n_kb)) for ft in (128, 0)}
                times = {}
                ref = sparse_attention_triton(q, k, v, packs[128], scale)
                for ft, pk in packs.items():
                    for cname, c in CONFIGS.items():
                        if ft == 0 and cname not in ("default", "offs64"):
                            continue
                        o = torch.full_like(ref, float("nan"))
                        try:
                            sparse_attention_triton(q, k, v, pk, scale, config=c, out=o)
                        except Exception as e:  # a config that does not fit (shared memory)
                            times[f"full{ft}_{cname}"] = {"ms": float("nan"), "error": str(e)[:120]}
                            continue
                        same = torch.allclose(o.float(), ref.float(), atol=2e-2, rtol=2e-2) and not o.isnan().any().item()
                        times[f"full{ft}_{cname}"] = {"ms": bench(lambda: sparse_attention_triton(q, k, v, pk, scale, config=c)),
                                                      "matches_default": bool(same)}
                times["pack_full128_ms"] = bench(lambda: packed_from_bits(bits, n_kb, 128, 1, S, 128, cap=min(cap, n_kb)))
                times["pack_full0_ms"] = bench(lambda: packed_from_bits(bits, n_kb, 128, 1, S, 0, cap=min(cap, n_kb)))
                # a random mask with the same count in every row
                per_row = int(round(shape["density"] * n_kb))
                scores = torch.rand(B, H, -(-S // 128), n_kb, device=dev, generator=g)
                keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(per_row, -1).indices, True)
                rnd = pack_slices(keep, 128, 1, S)
                del scores, keep
                for cname in ("default", "offs64", "n64_s3"):
                    times[f"random_{cname}"] = {"ms": bench(lambda: sparse_attention_triton(q, k, v, rnd, scale, config=CONFIGS[cname]))}
                entry["layers"][name] = {"mask": shape, "times": times}
                print(f"d{density} {name}: {shape}", flush=True)
                for t, r in times.items():
                    print(f"   {t:24s} {r['ms'] if isinstance(r, dict) else r:8.3f} ms"
                          f"{'' if not isinstance(r, dict) or r.get('matches_default', True) else '  MISMATCH'}", flush=True)
            result["densities"][str(density)] = entry
            print(f"d{density}: in-model sparse kernel mean {entry['in_model_sparse_kernel_mean_ms']:.3f} ms "
                  f"over {len(sparse_calls)} calls; cuDNN alone {result['cudnn_ms']:.3f} ms", flush=True)
            for n, r in list(entry["in_model_top_kernels"].items())[:12]:
                print(f"   {r[0]:4d} x {r[1]:9.3f} ms  {n}", flush=True)
        if args.cudnn_in_model:
            result["cudnn_in_model"] = cudnn_in_model(build, WAN_13B, x, dev, dt, result["cudnn_ms"])
    write_result(result, "kernel_in_model", args.out)


#: substrings of the names of fused attention kernels (cuDNN, flash)
_ATTN_KERNELS = ("cudnn", "sdpa", "flash", "fmha")


def cudnn_in_model(build, config: dict, x: tuple, dev: torch.device, dt: torch.dtype, alone_ms: float) -> dict:
    """Per-call times of the self-attention kernel in one forward of the model compiled by the
    default backend (calls of at least 1 ms: the 512-key cross-attention takes ~0.2 ms), and their
    mean against the same kernel alone (``alone_ms``)."""
    default = build(config, dev, dt)
    default.compile_repeated_blocks()
    for _ in range(2):
        default(*x, return_dict=False)
    torch.cuda.synchronize()
    table = kernel_table(lambda: default(*x, return_dict=False))
    calls = [t for n, r in table.items() if any(s in n.lower() for s in _ATTN_KERNELS) for t in r[2] if t >= 1.0]
    mean = sum(calls) / max(len(calls), 1)
    del default
    torch.cuda.empty_cache()
    print(f"cuDNN in the default compile: mean {mean:.3f} ms over {len(calls)} calls; alone {alone_ms:.3f} ms "
          f"(in model / alone {mean / alone_ms:.3f})", flush=True)
    return {"calls_ms": calls, "mean_ms": mean, "in_model_over_alone": mean / alone_ms}


if __name__ == "__main__":
    main()
