"""Why is the sparse kernel slower inside Wan than in kernel_bench.py? One candidate: the layout.

diffusers' Wan attention hands SDPA q/k/v as (B, S, H, D) tensors permuted to (B, H, S, D) (head
stride D, sequence stride H * D), while kernel_bench.py times contiguous (B, H, S, D) tensors.
This script times, at Wan 480p's attention shape (B=1, H=12, S=32,760, D=128, bf16), one random
fine-grained mask at density 0.3 (the kernel's heuristic config):

- the kernel on contiguous q/k/v;
- the kernel on the permuted (B, S, H, D) layout;
- the permuted layout made contiguous first (the three copies timed with the kernel);
- cuDNN SDPA on both layouts, for reference.

    python benchmarks/layout_probe.py [OUT.json]    # default benchmarks/results/layout_<device>.json
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fgcompile.attention import pack_slices
    from fgcompile.kernels.triton_sparse import sparse_attention_triton

    B, H, S, D, density = 1, 12, 32760, 128, 0.3
    torch.manual_seed(0)
    bshd = [torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    perm = [t.transpose(1, 2) for t in bshd]  # (B, H, S, D) views, sequence stride H * D
    cont = [t.contiguous() for t in perm]
    keep = torch.rand(B, H, -(-S // 128), S, device="cuda") < density
    p = pack_slices(keep, block_n=1, seq_len_kv=S, block_m=128)
    scale = D ** -0.5
    ref = sparse_attention_triton(*cont, p, scale)
    same = torch.equal(sparse_attention_triton(*perm, p, scale), ref)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    rows = {
        "kernel_contiguous_ms": bench(lambda: sparse_attention_triton(*cont, p, scale)),
        "kernel_permuted_ms": bench(lambda: sparse_attention_triton(*perm, p, scale)),
        "kernel_permuted_plus_copies_ms": bench(lambda: sparse_attention_triton(*[t.contiguous() for t in perm], p, scale)),
        "cudnn_contiguous_ms": bench(lambda: cudnn(*cont)),
        "cudnn_permuted_ms": bench(lambda: cudnn(*perm)),
    }
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "shape": dict(B=B, H=H, S=S, D=D, dtype="bf16", density=density, block_m=128, block_n=1),
        "outputs_equal_across_layouts": same, **rows,
        "permuted_over_contiguous": rows["kernel_permuted_ms"] / rows["kernel_contiguous_ms"],
    }
    from results_io import write_result

    write_result(result, "layout", sys.argv[1] if len(sys.argv) > 1 else None)
    for k, v in result.items():
        print(f"{k:36s} {v}")


if __name__ == "__main__":
    main()
