"""Triton kernels for the mask formats of ``fgcompile.kernels.packing``: bitmap -> PackedSlices and
bool keep mask -> bitmap, on the device, with no host synchronisation.

``packed_from_bits_triton(words, n, block_m, block_n, seq_len_kv, full_tile)``: one program per
mask row (b, h, query block) and segment (without full tiles a row may be split into segments of
whole chunks: each program first counts the kept bits before its segment, and the row's last
segment writes its count and zero-fills). It walks its int32 words in chunks of ``CHUNK`` key blocks:
expands the bits, finds the fully kept tiles (``per = full_tile // block_n`` consecutive key
blocks, aligned, inside the sequence: the minimum of the bits of a tile), removes their keys, and
compacts the remaining kept key-block indices with ``tl.cumsum`` (a masked scatter store to
``count + position``, inside the row's ``cap`` columns). Then it zero-fills the rest of the row, so the outputs are exactly the
:class:`~fgcompile.kernels.packing.PackedSlices` contract (``pack_slices`` on the unpacked mask
gives the same tensors). Each row is written once: the cost is the 4 * cap bytes of indices per row
(cap = nKB: 403 MB at Wan 480p), a memory-bandwidth bound.

``pack_bits_triton(keep)``: bool (..., n) -> int32 (..., ceil(n / 32)), bit j % 32 of word j // 32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .triton_common import interpreting, launch, pow2_at_least

__all__ = ["packed_from_bits_triton", "pack_bits_triton", "PACK_CHUNK", "PACK_WARPS", "PACK_PROGRAMS"]

#: key blocks per loop step and warps of the bitmap -> PackedSlices kernel, and the programs the
#: launch aims at without full tiles (rows are split into segments until there are about this
#: many: 4 per row at Wan 480p's 3,072 rows of 64 chunks). Chosen on an H200 by
#: benchmarks/pack_probe.py (results/pack_probe_h200.json, budget masks at Wan 480p): 0.14 ms at
#: density 0.3 and 0.26 ms at 0.6, against 0.31 / 0.76 ms with 2,048-key chunks, one row per program
PACK_CHUNK = 512
PACK_WARPS = 4
PACK_PROGRAMS = 12288


@triton.jit
def _popc(x, HW: tl.constexpr):
    """Set bits of each int32 of ``x`` (int32): the POPC instruction on the GPU (``HW``), a SWAR
    count under the interpreter (which has no libdevice)."""
    if HW:
        return libdevice.popc(x)
    else:
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        return ((u * 0x01010101) >> 24).to(tl.int32, bitcast=True)


@triton.jit
def _packed_from_bits(
    W, COUNTS, IDX, FCOUNTS, FTILES,
    NW, NKB, CAP, NT, NT_COLS, SEG_KEYS,
    CHUNK: tl.constexpr,
    PER: tl.constexpr,
    USE_FULL: tl.constexpr,
    ZBLOCK: tl.constexpr,
    HW_POPC: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)  # the row's segment: key blocks [g * SEG_KEYS, (g + 1) * SEG_KEYS)
    last = g == tl.num_programs(1) - 1
    w_base = W + r * NW
    i_base = IDX + r * CAP
    f_base = FTILES + r * NT_COLS
    WPC: tl.constexpr = CHUNK // 32
    offs_w = tl.arange(0, WPC)
    shifts = tl.arange(0, 32)
    below = (tl.full([32], 1, tl.uint32) << shifts.to(tl.uint32)) - 1  # bits under bit s
    below = below.to(tl.int32, bitcast=True)
    seg_lo = g * SEG_KEYS
    seg_hi = tl.minimum(seg_lo + SEG_KEYS, NKB)
    # the kept key blocks before the segment (whole words, all inside the row: see the launch)
    count = tl.full([], 0, tl.int32)
    for p0 in range(0, seg_lo // 32, WPC):
        pw = tl.load(w_base + p0 + offs_w, mask=p0 + offs_w < seg_lo // 32, other=0)
        count += tl.sum(_popc(pw, HW_POPC), 0)
    fcount = tl.full([], 0, tl.int32)
    # the words of the next chunk are loaded one iteration ahead (loop-carried), so their latency
    # overlaps this chunk's work
    w_next = tl.load(w_base + seg_lo // 32 + offs_w, mask=seg_lo // 32 + offs_w < NW, other=0)
    for c0 in range(seg_lo, seg_hi, CHUNK):
        w = w_next
        widx = (c0 + CHUNK) // 32 + offs_w
        w_next = tl.load(w_base + widx, mask=widx < NW, other=0)
        # bits past NKB (in the last word) are not keys
        n_in = tl.minimum(tl.maximum(NKB - (c0 + offs_w * 32), 0), 32)  # key bits of each word
        w = w & tl.where(n_in == 32, -1, (tl.full([WPC], 1, tl.int32) << tl.minimum(n_in, 31)) - 1)
        if USE_FULL:
            if PER % 32 == 0:
                # whole-word tiles: a tile is full iff its PER // 32 words are all ones (-1)
                WPT: tl.constexpr = PER // 32
                NTC: tl.constexpr = WPC // WPT
                tidx = c0 // PER + tl.arange(0, NTC)
                allw = tl.reshape((w == -1).to(tl.int32), [NTC, WPT])
                full = tl.where(tidx < NT, tl.min(allw, axis=1), 0)
                fw = tl.reshape(tl.broadcast_to(full[:, None], [NTC, WPT]), [WPC])
                w = tl.where(fw != 0, 0, w)
                fpos = tl.cumsum(full, 0)
                tl.store(f_base + (fcount + fpos - 1), tidx, mask=full != 0)
                fcount += tl.sum(full, 0)
            else:
                # sub-word tiles (PER in 1..16): PER consecutive bits of one word
                TPW: tl.constexpr = 32 // PER
                bits = (w[:, None] >> shifts[None, :]) & 1
                t3 = tl.reshape(bits, [WPC * TPW, PER])
                tidx2 = c0 // PER + tl.arange(0, WPC * TPW)
                full2 = tl.where(tidx2 < NT, tl.min(t3, axis=1), 0)
                t3 = tl.where(full2[:, None] != 0, 0, t3)
                # distinct powers of two: their int32 sum is their bitwise or
                w = tl.sum(tl.reshape(t3, [WPC, 32]) << shifts[None, :], axis=1)
                fpos2 = tl.cumsum(full2, 0)
                tl.store(f_base + (fcount + fpos2 - 1), tidx2, mask=full2 != 0)
                fcount += tl.sum(full2, 0)
        # slot of kept bit (word i, bit s): kept bits of the words before i (a scan over the
        # chunk's words) + kept bits of word i under bit s (a popcount)
        wc = _popc(w, HW_POPC)
        first = tl.cumsum(wc, 0) - wc
        kb = c0 + offs_w[:, None] * 32 + shifts[None, :]  # (WPC, 32) key-block index
        kept = ((w[:, None] >> shifts[None, :]) & 1) != 0
        slot = count + first[:, None] + _popc(w[:, None] & below[None, :], HW_POPC)
        tl.store(i_base + slot, kb, mask=kept & (slot < CAP))
        count += tl.sum(wc, 0)
    if last:  # the row's last segment knows its totals (full tiles: one segment per row)
        count = tl.minimum(count, CAP)  # a row over the caller's bound keeps its first CAP (see packing)
        tl.store(COUNTS + r, count)
        tl.store(FCOUNTS + r, fcount)
        zo = tl.arange(0, ZBLOCK)
        for z0 in range((count // ZBLOCK) * ZBLOCK, CAP, ZBLOCK):
            z = z0 + zo
            tl.store(i_base + z, tl.zeros([ZBLOCK], tl.int32), mask=(z >= count) & (z < CAP))
        for z0 in range((fcount // ZBLOCK) * ZBLOCK, NT_COLS, ZBLOCK):
            z = z0 + zo
            tl.store(f_base + z, tl.zeros([ZBLOCK], tl.int32), mask=(z >= fcount) & (z < NT_COLS))


def packed_from_bits_triton(
    words: torch.Tensor,
    n: int,
    block_m: int,
    block_n: int,
    seq_len_kv: int,
    full_tile: int,
    *,
    cap: int | None = None,
    chunk: int | None = None,
    num_warps: int | None = None,
    segments: int | None = None,
    index_dtype: torch.dtype = torch.int32,
):
    """The :class:`~fgcompile.kernels.packing.PackedSlices` of a bitmap (int32 words
    (B, H, nQB, ceil(n / 32)), n = nKB = ceil(seq_len_kv / block_n)), with ``cap`` index columns
    (n by default). ``full_tile`` must be 0 or a power of two multiple of block_n (the callers
    check; ``packing.packed_from_bits`` falls back to torch otherwise). No host synchronisation.
    ``index_dtype``: int32 (the ``PackedSlices`` contract), or int16 (n <= 32,768; half the bytes
    written, for ``benchmarks/pack_probe.py``: the sparse kernel consumes int32 lists; it reads int16
    lists ~8% slower, benchmarks/NOTES.md, session 11).
    ``chunk``, ``num_warps``, ``segments`` (programs per row; 1 with full tiles): launch
    parameters, by default ``PACK_CHUNK``, ``PACK_WARPS`` and enough segments for about
    ``PACK_PROGRAMS`` programs."""
    from .packing import PackedSlices

    B, H, nqb, nw = words.shape
    words = words.contiguous()
    if words.dtype != torch.int32:
        words = words.to(torch.int32)
    dev = words.device
    use_full = full_tile > 0 and full_tile % block_n == 0 and seq_len_kv >= full_tile
    per = full_tile // block_n if use_full else 1
    nt = seq_len_kv // full_tile if use_full else 0
    nt_cols = nt if use_full else 1
    interp = interpreting()
    if chunk is None:
        chunk = 128 if interp else PACK_CHUNK
    if num_warps is None:
        num_warps = 4 if interp else PACK_WARPS
    chunk = max(int(chunk), per, 32)
    chunk = min(chunk, max(pow2_at_least(n), per, 32))
    R = B * H * nqb
    counts = torch.empty((B, H, nqb), device=dev, dtype=torch.int32)
    fcounts = torch.empty((B, H, nqb), device=dev, dtype=torch.int32)
    cap = n if cap is None else max(0, min(int(cap), n))
    if index_dtype not in (torch.int32, torch.int16) or (index_dtype == torch.int16 and n > 2**15):
        raise ValueError(f"index_dtype: expected torch.int32, or torch.int16 for at most 32,768 key blocks "
                         f"(got {index_dtype} for {n})")
    indices = torch.empty((B, H, nqb, cap), device=dev, dtype=index_dtype)
    ftiles = torch.empty((B, H, nqb, nt_cols), device=dev, dtype=torch.int32)
    # segments per row: rows split into runs of whole chunks, each program counting the kept bits
    # before its run (more programs than rows, for short grids); one per row with full tiles
    n_chunks = max(1, -(-n // chunk))
    if segments is None:
        segments = 1 if interp else -(-PACK_PROGRAMS // max(R, 1))
    segments = 1 if use_full else max(1, min(int(segments), n_chunks))
    seg_keys = -(-n_chunks // segments) * chunk
    segments = max(1, -(-n // seg_keys))  # every segment starts inside the row
    if R > 0:
        launch(_packed_from_bits, (R, segments),
            words, counts, indices, fcounts, ftiles,
            nw, n, cap, nt, nt_cols, seg_keys,
            CHUNK=chunk, PER=per, USE_FULL=use_full, ZBLOCK=min(1024, max(32, pow2_at_least(cap))) if not interp else 64,
            HW_POPC=not interp, num_warps=num_warps,
        )
    return PackedSlices(
        counts, indices, fcounts, ftiles, int(block_m), int(block_n), int(seq_len_kv), int(full_tile) if use_full else 0
    )


@triton.jit
def _pack_bits(X, W, N, NW, BLOCK_W: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    wb = tl.program_id(1)
    offs_w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    shifts = tl.arange(0, 32)
    j = offs_w[:, None] * 32 + shifts[None, :]
    x = tl.load(X + r * N + j, mask=(j < N) & (offs_w[:, None] < NW), other=0)
    # distinct powers of two: their int32 sum is their bitwise or (bit 31 is -2**31), no overflow
    w = tl.sum((x != 0).to(tl.int32) << shifts[None, :], axis=1)
    tl.store(W + r * NW + offs_w, w, mask=offs_w < NW)


def pack_bits_triton(keep: torch.Tensor) -> torch.Tensor:
    """bool (..., n) -> int32 words (..., ceil(n / 32)); bit j % 32 of word j // 32 is entry j."""
    n = keep.shape[-1]
    nw = -(-n // 32)
    lead = keep.shape[:-1]
    x = keep.to(torch.bool).contiguous().view(torch.uint8).reshape(-1, n)
    R = x.shape[0]
    out = torch.empty((R, nw), device=keep.device, dtype=torch.int32)
    if R > 0 and nw > 0:
        bw = 128 if not interpreting() else 16
        bw = min(bw, pow2_at_least(nw))
        launch(_pack_bits, (R, triton.cdiv(nw, bw)), x, out, n, nw, BLOCK_W=bw, num_warps=4)
    return out.reshape(lead + (nw,))
