"""Is FlexAttention's output right on the tile BlockMasks the benchmarks build? (GPU or CPU)

The benchmarks time FlexAttention on BlockMasks given by their kept 128 x 128 tiles
(``BlockMask.from_kv_blocks``, the tiles as full blocks). This checks each construction's output
against the tile-sparse float32 reference (``flex_masks.tile_reference``: block_m = block_n =
128) on fresh random inputs, at a length that is a multiple of 128 and at one that is not (Wan
480p: 32,760), and times it:

- full: the kept tiles as full blocks, no mask_mod, indices as ``packing._compact`` gives them (a
  strided view: rows n + 1 apart; kernel_bench's construction up to session 18);
- full_contig: the same with contiguous indices (``flex_masks.tile_block_mask`` without mask_mod:
  kernel_bench and sm90_probe now);
- full+mod: ``flex_masks.tile_block_mask``, full blocks with contiguous indices and a mask_mod
  reading the tile mask (equal_error_bench);
- partial: the kept tiles as partial blocks, with that mask_mod (strided indices);
- created: ``create_block_mask`` of that mask_mod (FlexAttention's own construction).

    python benchmarks/flex_check.py [--seqs 32768,32760] [--heads 12] [--density 0.75]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fgcompile.kernels import packing  # noqa: E402
from fgcompile.testing.metrics import rel_err  # noqa: E402
from flex_masks import tile_block_mask, tile_mask_mod, tile_reference  # noqa: E402
from results_io import write_result  # noqa: E402

BM = 128


def masks(keep: torch.Tensor, S: int, names) -> Iterator[tuple[str, Callable]]:
    """(name, builder of its BlockMask) of the (B, H, nQB, nKB) tile mask ``keep``, for the
    constructions in ``names`` only (``create_block_mask`` evaluates the mask_mod at every
    query/key pair)."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    cnt, idx = packing._compact(keep)
    z, zi = torch.zeros_like(cnt), torch.zeros_like(idx)
    mod = tile_mask_mod(keep, BM)
    B, H = keep.shape[:2]
    build = {
        "full": lambda: BlockMask.from_kv_blocks(z, zi, cnt, idx, BLOCK_SIZE=BM, seq_lengths=(S, S)),
        "full_contig": lambda: tile_block_mask(keep, BM, S, mask_mod=False),  # kernel_bench, sm90_probe
        "full+mod": lambda: tile_block_mask(keep, BM, S),  # what equal_error_bench times
        "partial": lambda: BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=BM, mask_mod=mod, seq_lengths=(S, S)),
        # compiled: eager evaluation materialises every query/key pair (96 GiB at S = 32,768)
        "created": lambda: torch.compile(create_block_mask)(mod, B, H, S, S, device=keep.device, BLOCK_SIZE=BM),
    }
    for n in build:  # one at a time, as they are used: a construction may fail (out of memory)
        if n in names:
            yield n, build[n]




def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="32768,32760")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--density", type=float, default=0.75)
    ap.add_argument("--check-heads", type=int, default=2, help="heads compared with the reference")
    ap.add_argument("--suite", action="store_true",
                    help="also the synthetic video suite's q/k/v (21 x 30 x 52 tokens; on CPU: 4 x 8 x 16)")
    ap.add_argument("--masks", default="full,full_contig,full+mod,partial,created", help="which constructions to run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from torch.nn.attention.flex_attention import flex_attention

    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    flex = torch.compile(flex_attention, dynamic=False)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    inputs = [("randn", int(s)) for s in args.seqs.split(",")]
    if args.suite:
        inputs.append(("suite", 21 * 30 * 52 if cuda else 4 * 8 * 16))
    for source, S in inputs:
        H, D = args.heads, args.head_dim
        if source == "suite":
            from fgcompile.testing.synthetic import make_attention_inputs

            q, k, v = make_attention_inputs(*((21, 30, 52) if cuda else (4, 8, 16)), heads=H, head_dim=D,
                                            dtype=dtype, device=dev)
        else:
            q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=dtype, generator=gen) for _ in range(3))
        n = -(-S // BM)
        keep = torch.rand(1, H, n, n, device=dev, generator=gen) < args.density
        keep |= torch.eye(n, device=dev, dtype=torch.bool)
        hs = slice(0, args.check_heads)
        ref = tile_reference(q, k, v, keep, BM, D ** -0.5, heads=args.check_heads)
        for name, build in masks(keep, S, args.masks.split(",")):
            row = {"inputs": source, "S": S, "mask": name, "tile_density": float(keep.float().mean())}
            try:
                bm = build()
                out = flex(q, k, v, block_mask=bm, scale=D ** -0.5)
                row["rel_err"] = rel_err(out[:, hs], ref)
                if cuda:
                    from triton.testing import do_bench

                    row["ms"] = float(do_bench(lambda: flex(q, k, v, block_mask=bm, scale=D ** -0.5),
                                               warmup=25, rep=100, return_mode="median"))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            rows.append(row)
            print(row, flush=True)
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "shape": {"B": 1, "H": args.heads, "D": args.head_dim, "dtype": str(dtype)}, "rows": rows}
    write_result(res, "flex_check", args.out)
    return res


if __name__ == "__main__":
    main()
