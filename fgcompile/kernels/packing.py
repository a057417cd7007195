"""Packed forms of a keep mask: per-query-block index lists for the kernel, bitmaps for storage.

The keep mask (docs/DESIGN.md) is a bool tensor ``keep`` of shape (B, H, nQB, nKB) with
``nQB = ceil(S_q / block_m)`` and ``nKB = ceil(S_kv / block_n)``: ``keep[b, h, i, j]`` means the
queries ``i*block_m .. (i+1)*block_m - 1`` of head ``h`` attend to the keys
``j*block_n .. (j+1)*block_n - 1``.

Two packed forms:

``PackedSlices`` (what the Triton kernel consumes, built by :func:`pack_slices` on the mask's device
with no host synchronisation: a cumulative sum and a scatter, no ``.item()``, ``.nonzero()`` or
boolean indexing; so it can be captured in a CUDA graph and traced by torch.compile):

- ``counts``  int32 (B, H, nQB): how many key blocks query block i keeps (outside full tiles);
- ``indices`` int32 (B, H, nQB, cap): the kept key-block indices j, ascending, in the first
  ``counts[b, h, i]`` entries; the rest is 0 (never read as a key: the kernel masks by count).
  ``cap = nKB`` by default (the largest possible count: knowing the real maximum needs a host
  sync); a caller that knows a bound on every row's count without a sync passes it as ``cap``
  (the density budget: ``predictors.density_budget(nKB, density)``, a quarter of the bytes at
  density 0.25). A row that keeps more than ``cap`` key blocks outside full tiles is a caller
  error; the packing then keeps its first ``cap`` (never writes out of bounds). The tensor may be
  a view with a last stride of 1 and a row stride of ``cap + 1``.
- ``full_counts`` int32 (B, H, nQB) and ``full_tiles`` int32 (B, H, nQB, nKB // (full_tile // block_n)):
  the "fully kept tiles" fast path. A full tile is an aligned run of ``full_tile`` keys
  ``[t*full_tile, (t+1)*full_tile)`` that lies inside the sequence and is kept whole; the kernel
  loads it as one contiguous block (no index load, no gather). Keys in full tiles are removed from
  ``indices``. ``full_tile = 0`` disables the split (``full_counts`` is then all 0 and
  ``full_tiles`` has one column).
- ``block_m``, ``block_n``, ``seq_len_kv``, ``full_tile``: ints.

Memory per call (int32): ``4 * B*H*nQB*(cap + 1)`` bytes of indices; Wan-1.3B 480p (B=1, H=12,
nQB=256, S_kv=32,760, block_n=1) is 403 MB per layer at cap = nKB, 121 MB under a 0.3 budget. That is a working buffer for one call,
rebuilt from the mask; it is not the form to keep 30 layers of masks in.

``SliceBitmap`` / :func:`pack_bits` / :func:`unpack_bits` (the storage form): the last axis of
``keep`` packed into 32-bit words, bit ``j % 32`` of word ``j // 32`` (little-endian within the
word), int32 words (B, H, nQB, ceil(nKB / 32)). Memory per layer: ``4 * B*H*nQB*ceil(nKB/32)``
bytes; Wan-1.3B 480p: 12 heads x 256 query blocks x 1,024 words x 4 B = 12.6 MB (12.0 MiB) per
layer, 30 layers = 377 MB (360 MiB), inside 1 GiB whatever the density (int32 index lists of all
30 layers at density 0.4 would take 4.8 GB). :func:`bitmap_memory_bytes` computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = [
    "PackedSlices",
    "pack_slices",
    "unpack_slices",
    "SliceBitmap",
    "pack_bits",
    "unpack_bits",
    "bitmap_memory_bytes",
    "packed_from_bits",
    "real_key_lists",
    "kept_per_head",
    "popcount_rows",
    "DEFAULT_FULL_TILE",
    "MODEL_FULL_TILE",
    "model_full_tile",
]

#: keys per "full tile" (the contiguous fast path) of ``pack_slices`` / ``packed_from_bits`` unless
#: told otherwise.
DEFAULT_FULL_TILE = 128

#: the full tile of the compiled model's packings (``model_full_tile``): none. On the H100 the fast
#: path gains nothing measurable (every key kept at S = 32,760: 14.33 ms with or without it; at
#: 75,600: 85.9 ms with it, 75.8 ms without), the density-budget masks of Wan2.1 have no fully
#: kept tile at all (``benchmarks/results/kernel_in_model_h100.json``), and the kernel without its
#: full-tile loop compiles faster (0.9 s instead of 1.3-1.6 s for sm_90 on a 2-core CPU), which
#: is on the critical path of a model's compile.
MODEL_FULL_TILE = 0


def model_full_tile(block_n: int) -> int:
    """The full-tile size of a compiled model's site with key blocks of ``block_n`` keys
    (``MODEL_FULL_TILE`` where it divides into key blocks, else 0): what its run-time packing
    uses and what its lowered kernel is specialised for."""
    return MODEL_FULL_TILE if MODEL_FULL_TILE and MODEL_FULL_TILE % block_n == 0 else 0


@dataclass(frozen=True)
class PackedSlices:
    """Per-query-block kept key lists (see the module docstring for the layout).

    counts: int32 (B, H, nQB); indices: int32 (B, H, nQB, cap), last stride 1, ascending in the first
    counts entries; full_counts: int32 (B, H, nQB); full_tiles: int32 (B, H, nQB, nT), ascending in the
    first full_counts entries; block_m, block_n, seq_len_kv, full_tile: ints.
    """

    counts: torch.Tensor
    indices: torch.Tensor
    full_counts: torch.Tensor
    full_tiles: torch.Tensor
    block_m: int
    block_n: int
    seq_len_kv: int
    full_tile: int = 0

    @property
    def shape(self) -> tuple:
        """(B, H, nQB, nKB): the shape of the keep mask this packs."""
        b, h, nqb = self.counts.shape
        return (b, h, nqb, -(-self.seq_len_kv // self.block_n))

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def to(self, device) -> "PackedSlices":
        return PackedSlices(
            self.counts.to(device),
            self.indices.to(device),
            self.full_counts.to(device),
            self.full_tiles.to(device),
            self.block_m,
            self.block_n,
            self.seq_len_kv,
            self.full_tile,
        )

    def memory_bytes(self) -> int:
        ts = (self.counts, self.indices, self.full_counts, self.full_tiles)
        return sum(t.numel() * t.element_size() for t in ts)


def _compact(keep: torch.Tensor, cap: Optional[int] = None, chunk_elems: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """counts (...,) int32 and ascending indices (..., cap) int32 (cap = n by default) of the True
    entries of the last axis (the first ``cap`` of them), with a cumulative sum and a scatter (no
    host synchronisation). Works on chunks of rows so that the int64 scatter index stays small."""
    lead, n = keep.shape[:-1], keep.shape[-1]
    cap = n if cap is None else min(int(cap), n)
    rows = keep.reshape(-1, n)
    r = rows.shape[0]
    counts = torch.zeros((r,), device=keep.device, dtype=torch.int32)
    out = torch.zeros((r, cap + 1), device=keep.device, dtype=torch.int32)
    if n == 0 or r == 0:
        return counts.reshape(lead), out[:, :cap].reshape(lead + (cap,))
    step = max(1, chunk_elems // n)
    src = torch.arange(n, device=keep.device, dtype=torch.int32)
    for r0 in range(0, r, step):
        kc = rows[r0 : r0 + step]
        pos = torch.cumsum(kc.to(torch.int32), dim=-1, dtype=torch.int32)
        counts[r0 : r0 + step] = pos[:, -1].clamp_max(cap)
        # kept entry j goes to slot pos[j] - 1; the others (and slots past cap) to a spill column
        # cap, cut off below.
        slot = torch.where(kc & (pos <= cap), pos - 1, cap).to(torch.int64)
        out[r0 : r0 + step].scatter_(-1, slot, src.expand_as(pos))
    return counts.reshape(lead), out[:, :cap].reshape(lead + (cap,))


def pack_slices(
    keep: torch.Tensor,
    block_m: int,
    block_n: int,
    seq_len_kv: int,
    full_tile: int = DEFAULT_FULL_TILE,
    cap: Optional[int] = None,
) -> PackedSlices:
    """Pack a bool keep mask (B, H, nQB, nKB) into a :class:`PackedSlices` on its device, with no
    host synchronisation. ``seq_len_kv`` is S_kv (nKB must equal ceil(S_kv / block_n)).
    ``full_tile``: keys per full tile of the contiguous fast path (a multiple of block_n, a
    power of two >= 16), or 0 to gather every key. ``cap``: columns of ``indices`` (a bound on
    every row's count that the caller guarantees; nKB by default). Inputs are not validated here
    (see ``fgcompile.attention.pack_slices``)."""
    B, H, nqb, nkb = keep.shape
    keep = keep.to(torch.bool)
    use_full = full_tile > 0 and full_tile % block_n == 0 and seq_len_kv >= full_tile
    if use_full:
        per = full_tile // block_n  # key blocks per full tile
        nt = seq_len_kv // full_tile  # complete tiles inside the sequence
        tiled = keep[..., : nt * per].reshape(B, H, nqb, nt, per)
        full = tiled.all(dim=-1)  # (B, H, nQB, nT)
        full_counts, full_tiles = _compact(full)
        rest = keep.clone()
        rest[..., : nt * per] &= ~full.repeat_interleave(per, dim=-1)
        counts, indices = _compact(rest, cap)
    else:
        counts, indices = _compact(keep, cap)
        full_counts = torch.zeros_like(counts)
        full_tiles = torch.zeros((B, H, nqb, 1), device=keep.device, dtype=torch.int32)
        full_tile = 0
    return PackedSlices(counts, indices, full_counts, full_tiles, int(block_m), int(block_n), int(seq_len_kv), int(full_tile))


def unpack_slices(packed: PackedSlices) -> torch.Tensor:
    """The bool keep mask (B, H, nQB, nKB) that ``packed`` holds (on its device, no host sync)."""
    B, H, nqb, nkb = packed.shape
    dev = packed.device
    keep = torch.zeros((B, H, nqb, nkb + 1), dtype=torch.bool, device=dev)
    cap = packed.indices.shape[-1]
    valid = torch.arange(cap, device=dev) < packed.counts[..., None]
    slot = torch.where(valid, packed.indices.to(torch.int64), torch.full_like(packed.indices, nkb, dtype=torch.int64))
    keep.scatter_(-1, slot, valid)
    keep = keep[..., :nkb].clone()
    if packed.full_tile > 0:
        per = packed.full_tile // packed.block_n
        nt = packed.full_tiles.shape[-1]
        fvalid = torch.arange(nt, device=dev) < packed.full_counts[..., None]
        full = torch.zeros((B, H, nqb, nt + 1), dtype=torch.bool, device=dev)
        fslot = torch.where(fvalid, packed.full_tiles.to(torch.int64), torch.full_like(packed.full_tiles, nt, dtype=torch.int64))
        full.scatter_(-1, fslot, fvalid)
        keep[..., : nt * per] |= full[..., :nt].repeat_interleave(per, dim=-1)
    return keep


# ----------------------------------------------------------------------------- bitmaps


@dataclass(frozen=True)
class SliceBitmap:
    """A keep mask stored as bits: ``words`` int32 (..., ceil(n / 32)), bit ``j % 32`` of word
    ``j // 32`` is entry j of the last axis; ``shape`` is the mask's shape (last entry n);
    ``block_m``/``block_n`` the tile sizes the mask was made for."""

    words: torch.Tensor
    shape: tuple
    block_m: int = 128
    block_n: int = 1

    @classmethod
    def from_keep(cls, keep: torch.Tensor, block_m: int = 128, block_n: int = 1) -> "SliceBitmap":
        return cls(pack_bits(keep), tuple(keep.shape), block_m, block_n)

    def to_keep(self) -> torch.Tensor:
        return unpack_bits(self.words, self.shape[-1]).reshape(self.shape)

    def memory_bytes(self) -> int:
        return self.words.numel() * self.words.element_size()


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(32, device=device, dtype=torch.int64)


def _is_fake(t: torch.Tensor) -> bool:
    from ..lowering.torch_private import is_fake_tensor

    return is_fake_tensor(t)


def _use_triton(t: torch.Tensor, impl: str) -> bool:
    """impl "auto": the Triton kernels on CUDA tensors; "triton": also on the CPU (under
    TRITON_INTERPRET=1, for tests); "torch": never."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl: expected 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "torch" or _is_fake(t):
        return False
    return t.is_cuda or impl == "triton"


def _bit_weights(device: torch.device) -> torch.Tensor:
    # 1, 2, 4, ..., 2**30, -2**31 as int32: the sum of any subset is the subset's bitwise or
    return torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32, device=device)


def pack_bits(keep: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Pack the last axis of a bool tensor (..., n) into int32 words (..., ceil(n / 32)); bit
    ``j % 32`` of word ``j // 32`` holds entry j. On the tensor's device, no host sync. On CUDA a
    Triton kernel (``triton_pack.pack_bits_triton``); elsewhere (and ``impl="torch"``) bytes times
    an int32 power-of-two table, summed in int32 (4 bytes per entry of temporary, no int64)."""
    if _use_triton(keep, impl):
        from .triton_pack import pack_bits_triton

        return pack_bits_triton(keep)
    n = keep.shape[-1]
    nw = -(-n // 32)
    pad = nw * 32 - n
    x = keep.to(torch.bool)
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.reshape(keep.shape[:-1] + (nw, 32))
    return (x.to(torch.int32) * _bit_weights(keep.device)).sum(-1, dtype=torch.int32)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words (..., ceil(n / 32)) -> bool (..., n)."""
    if words.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"words: expected an int32 tensor, got {words.dtype}")
    w = words.to(torch.int64) & 0xFFFFFFFF
    bits = (w[..., None] >> _shifts(words.device)) & 1
    return bits.reshape(words.shape[:-1] + (words.shape[-1] * 32,))[..., :n].to(torch.bool)


def bitmap_memory_bytes(shape: Sequence[int]) -> int:
    """Bytes a :class:`SliceBitmap` of a mask of this shape takes (int32 words)."""
    *lead, n = shape
    count = 1
    for s in lead:
        count *= int(s)
    return 4 * count * (-(-int(n) // 32))


def packed_from_bits(
    words: torch.Tensor,
    n: int,
    block_m: int,
    block_n: int,
    seq_len_kv: int,
    full_tile: int = DEFAULT_FULL_TILE,
    *,
    cap: Optional[int] = None,
    impl: str = "auto",
) -> PackedSlices:
    """A :class:`PackedSlices` straight from a stored bitmap (int32 words (B, H, nQB, ceil(n/32)),
    n = nKB): what the run time does at every sparse call with a cached mask. No host sync.

    The same tensors as ``pack_slices(unpack_bits(words, n), ...)``. On CUDA (``impl="auto"``) one
    Triton kernel (``triton_pack.packed_from_bits_triton``: one program per mask row, reads the
    words once, writes every output once); ``impl="triton"`` also runs it on the CPU under
    TRITON_INTERPRET=1; ``impl="torch"`` (and meta/fake tensors) the torch ops. ``cap``: columns
    of ``indices`` (see :class:`PackedSlices`; nKB by default)."""
    full_ok = full_tile == 0 or (full_tile & (full_tile - 1) == 0 and full_tile <= 1024)
    if full_ok and _use_triton(words, impl):
        from .triton_pack import packed_from_bits_triton

        return packed_from_bits_triton(words, n, block_m, block_n, seq_len_kv, full_tile, cap=cap)
    return pack_slices(unpack_bits(words, n), block_m, block_n, seq_len_kv, full_tile, cap)


def real_key_lists(key_padding: torch.Tensor, heads: int, seq_len_q: int, block_m: int) -> PackedSlices:
    """The :class:`PackedSlices` of dense attention over the real keys of a key-padding mask:
    every head and query block of batch item b keeps key j iff ``key_padding[b, j]`` (bool
    (B, S_kv), True = a real key); single keys (block_n 1), no full tiles. The lists are made once
    per batch item, (B, 1, 1, S_kv) int32, and expanded (stride 0) over the ``heads`` and the
    ceil(seq_len_q / block_m) query blocks: B * S_kv * 4 bytes whatever H and S_q. The sparse
    kernels read the lists through their strides; a compiled graph's buffers need contiguous
    lists, so these serve direct launches. No host sync."""
    B, S = key_padding.shape
    nqb = -(-seq_len_q // block_m)
    p = packed_from_bits(pack_bits(key_padding.to(torch.bool))[:, None, None, :], S, block_m, 1, S, 0, cap=S)
    return PackedSlices(
        p.counts.expand(B, heads, nqb), p.indices.expand(B, heads, nqb, S), p.full_counts.expand(B, heads, nqb),
        p.full_tiles.expand(B, heads, nqb, p.full_tiles.shape[-1]), block_m, 1, S, 0,
    )


def popcount_rows(words: torch.Tensor) -> torch.Tensor:
    """Set bits per row of int32 words (..., nw) -> int32 (...,), torch ops (SWAR), no host sync."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = (x * 0x01010101 & 0xFFFFFFFF) >> 24
    return x.sum(-1).to(torch.int32)


def kept_per_head(packed: PackedSlices) -> torch.Tensor:
    """Fraction of (query block, key block) slices kept, per head, averaged over batch and query
    blocks: float32 (H,), on the device, no host sync."""
    B, H, nqb, nkb = packed.shape
    kept = packed.counts.to(torch.float32)
    if packed.full_tile > 0:
        kept = kept + packed.full_counts.to(torch.float32) * (packed.full_tile // packed.block_n)
    return kept.mean(dim=(0, 2)) / nkb
