"""FlexAttention BlockMasks for the benchmarks' FlexAttention baselines, built from fgcompile masks.

Two constructions, both with ``BlockMask.from_kv_blocks`` (FlexAttention's KV-block format):

- :func:`tile_block_mask`: a (B, H, nQB, nKB) bool mask of kept ``block`` x ``block`` tiles; every
  kept tile is a full block (the compiled kernel computes it without the mask_mod). The mask_mod
  reads the tile mask, so that paths which apply it densely (eager, CPU) give the same result.
- :func:`slice_covering_block_mask`: a (B, H, nQB, S) bool mask of kept 128 x 1 slices, covered by
  128 x 128 blocks; a block is full where all its 128 keys are kept, partial (mask_mod applied)
  where some are.

The block index tensors are made contiguous. ``packing._compact`` returns a strided view (rows
n + 1 apart), and FlexAttention's kernel template says "KV_IDX and KV_NUM_BLKS are always
contiguous"; ``flex_check.py`` checks FlexAttention's output per construction.
"""

from __future__ import annotations

import torch

from fgcompile.kernels import packing, reference


def kv_blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts (..., nQB) int32, indices (..., nQB, nKB) int32, contiguous) of a (..., nQB, nKB)
    bool block mask, kept indices first in ascending order."""
    counts, idx = packing._compact(mask)
    return counts, idx.contiguous()


def tile_mask_mod(keep: torch.Tensor, block: int):
    """The mask_mod of the (B, H, nQB, nKB) tile mask ``keep`` with ``block`` x ``block`` tiles."""

    def tile_mod(b, h, q_idx, kv_idx):
        return keep[b, h, q_idx // block, kv_idx // block]

    return tile_mod


def tile_block_mask(keep: torch.Tensor, block: int, S: int, *, mask_mod: bool = True):
    """The BlockMask (BLOCK_SIZE ``block``, seq_lengths (S, S)) whose full blocks are the kept tiles
    of ``keep``: (B, H, ceil(S / block), ceil(S / block)) bool. The last, incomplete tile counts as
    full too: FlexAttention bounds it by seq_lengths."""
    from torch.nn.attention.flex_attention import BlockMask

    cnt, idx = kv_blocks(keep)
    return BlockMask.from_kv_blocks(torch.zeros_like(cnt), torch.zeros_like(idx), cnt, idx, BLOCK_SIZE=block,
                                    mask_mod=tile_mask_mod(keep, block) if mask_mod else None, seq_lengths=(S, S))


def tile_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, block: int, scale: float,
                   heads: int = 2) -> torch.Tensor:
    """What a BlockMask of the (B, H, nQB, nKB) tile mask ``keep`` (``block`` x ``block`` tiles) must
    give on heads [0, ``heads``): the tile-sparse reference (B, heads, S, D), float32, for
    ``rel_err(flex_out[:, :heads], ...)``."""
    hs = slice(0, heads)
    return reference.sparse_attention_reference(q[:, hs].float(), k[:, hs].float(), v[:, hs].float(), keep[:, hs],
                                                block, block, scale)


def slice_covering_block_mask(keep: torch.Tensor, S: int):
    """(BlockMask, tile density): the 128 x 128 BlockMask covering a (B, H, nQB, S) mask of kept
    128 x 1 slices, exact through its mask_mod on the partial blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    Bq, Hq, nqb, _ = keep.shape
    nkt = -(-S // 128)
    padded = torch.zeros(Bq, Hq, nqb, nkt * 128, dtype=torch.bool, device=keep.device)
    padded[..., :S] = keep
    tiles = padded.reshape(Bq, Hq, nqb, nkt, 128)
    anyk = tiles.any(-1)
    full = tiles.all(-1)
    full[..., -1] &= S % 128 == 0  # the last, incomplete tile is never "full"
    pc, pi = kv_blocks(anyk & ~full)
    fc, fi = kv_blocks(full)

    def slice_mod(b, h, q_idx, kv_idx):
        return padded[b, h, q_idx // 128, kv_idx]

    bm = BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=128, mask_mod=slice_mod, seq_lengths=(S, S))
    return bm, anyk.float().mean().item()
