"""Public entry points of the kernels: ``sparse_attention``, ``pack_slices``, ``profile_attention``.

They validate their arguments (a bad one raises ValueError naming it and what was expected) and
dispatch to the Triton kernels (``fgcompile.kernels.triton_sparse`` / ``triton_profile``) or to the
plain-torch references (``fgcompile.kernels.reference``). None of them synchronises with the
device: all checks read shapes, dtypes and devices only.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch

from .config import TRITON_BLOCK_M
from .kernels import packing
from .kernels.packing import PackedSlices

__all__ = ["sparse_attention", "pack_slices", "profile_attention", "profile_attention_bits", "PackedSlices"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_IMPLS = ("auto", "triton", "reference")
_TRITON_MAX_D = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_int(name: str, value, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
    return value


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name}: expected a 4-D tensor ({'B, H, S_q, D' if name == 'q' else 'B, H_kv, S_kv, D'}), "
                f"got shape {tuple(t.shape)}"
            )
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: expected dtype float16, bfloat16 or float32, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype} and v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k, v: expected the device of q ({q.device}), got k on {k.device} and v on {v.device}")
    B, H, S_q, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"k: expected batch size {B} (that of q), got {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"k: expected head dim {D} (that of q), got {k.shape[3]}")
    H_kv = k.shape[1]
    if H_kv < 1 or H % H_kv != 0:
        raise ValueError(f"k: expected a number of kv heads dividing H = {H} (GQA), got {H_kv}")
    if D < 1 or S_q < 1 or k.shape[2] < 1 or B < 1:
        raise ValueError(f"q, k: expected non-empty tensors, got q {tuple(q.shape)} and k {tuple(k.shape)}")


def _resolve_impl(impl, device: torch.device, name: str = "impl") -> str:
    if impl not in _IMPLS:
        raise ValueError(f"{name}: expected one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if impl == "triton" and device.type != "cuda":
        if device.type != "cpu" or not _interpreting():
            raise ValueError(
                f"{name}: 'triton' needs CUDA tensors (got {device.type}); on the CPU it runs only under "
                "Triton's interpreter (set TRITON_INTERPRET=1 before importing fgcompile), else use "
                "impl='reference' or 'auto'"
            )
    return impl


def _check_triton_shapes(D: int, block_m: int) -> None:
    if D > _TRITON_MAX_D or D % 8 != 0:
        raise ValueError(
            f"q: impl='triton' supports head dims that are multiples of 8 up to {_TRITON_MAX_D} "
            f"(64, 96, 128, ...), got {D}; use impl='reference'"
        )
    if block_m not in TRITON_BLOCK_M:
        raise ValueError(f"block_m: impl='triton' supports {TRITON_BLOCK_M}, got {block_m}")


def _resolve_scale(scale, D: int) -> float:
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a finite float > 0 or None, got {scale!r}")
    return float(scale)


def _prologue(q, k, v, impl, scale, block_m) -> tuple[int, int, int, int, int, str, float, int]:
    """The argument checks shared by the entry points: (B, H, S_q, D, S_kv, impl, scale, block_m),
    impl resolved for q's device, scale defaulted to D ** -0.5."""
    _check_qkv(q, k, v)
    B, H, S_q, D = q.shape
    return B, H, S_q, D, k.shape[2], _resolve_impl(impl, q.device), _resolve_scale(scale, D), _check_int("block_m", block_m)


def _check_key_padding(key_padding, B: int, S_kv: int, device) -> None:
    if key_padding is None:
        return
    if not isinstance(key_padding, torch.Tensor) or key_padding.dtype != torch.bool:
        got = getattr(key_padding, "dtype", type(key_padding).__name__)
        raise ValueError(f"key_padding: expected a bool tensor (B, S_kv) or None, got {got}")
    if tuple(key_padding.shape) != (B, S_kv):
        raise ValueError(f"key_padding: expected shape (B, S_kv) = {(B, S_kv)}, got {tuple(key_padding.shape)}")
    if key_padding.device != device:
        raise ValueError(f"key_padding: expected the device of q ({device}), got {key_padding.device}")


def pack_slices(
    keep: torch.Tensor,
    *,
    block_n: int = 1,
    seq_len_kv: Optional[int] = None,
    block_m: int = 128,
    full_tile: int = packing.DEFAULT_FULL_TILE,
) -> PackedSlices:
    """Pack a bool keep mask (B, H, nQB, nKB) for repeated use by ``sparse_attention``.

    Built on the mask's device with no host synchronisation (cumulative sum + scatter). Returns a
    :class:`~fgcompile.kernels.packing.PackedSlices`: per query block the count of kept key blocks
    and their indices (ascending, int32 (B, H, nQB, nKB)), plus the list of fully kept aligned
    tiles of ``full_tile`` keys that the kernel loads as contiguous blocks (0 disables that).
    ``seq_len_kv`` defaults to nKB * block_n and must satisfy ceil(seq_len_kv / block_n) == nKB.
    Memory: 4 * B*H*nQB*(nKB + 1) bytes of indices (403 MB for Wan-1.3B 480p, one layer); masks
    meant to be kept (30 layers) are better stored as bitmaps (``packing.pack_bits``: 12.6 MB a
    layer at 480p).
    """
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 4:
        got = f"{keep.dtype} tensor of shape {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"keep: expected a bool tensor (B, H, nQB, nKB), got {got}")
    block_n = _check_int("block_n", block_n)
    block_m = _check_int("block_m", block_m)
    nkb = keep.shape[-1]
    if seq_len_kv is None:
        seq_len_kv = nkb * block_n
    seq_len_kv = _check_int("seq_len_kv", seq_len_kv)
    if -(-seq_len_kv // block_n) != nkb:
        raise ValueError(
            f"seq_len_kv: expected ceil(seq_len_kv / block_n) == keep.shape[-1] = {nkb} (block_n={block_n}), got {seq_len_kv}"
        )
    if not isinstance(full_tile, int) or full_tile < 0 or (full_tile and (full_tile < 16 or full_tile & (full_tile - 1))):
        raise ValueError(f"full_tile: expected 0 or a power of two >= 16, got {full_tile!r}")
    if full_tile and full_tile > 128:
        raise ValueError(f"full_tile: expected at most 128 keys, got {full_tile}")
    return packing.pack_slices(keep, block_m, block_n, seq_len_kv, full_tile=full_tile)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: Union[torch.Tensor, PackedSlices],
    *,
    block_m: int = 128,
    block_n: int = 1,
    scale: Optional[float] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Fine-grained sparse attention: each block of ``block_m`` queries attends only to the key
    blocks of ``block_n`` keys that ``keep`` marks (block_n = 1: M x 1 slices, FG-Attn).

    q: (B, H, S_q, D); k, v: (B, H_kv, S_kv, D), H a multiple of H_kv (GQA), any strides;
    float16, bfloat16 or float32 (fp32 runs its dots as tf32 in the Triton kernel).
    keep: bool (B, H, ceil(S_q / block_m), ceil(S_kv / block_n)), or a ``PackedSlices`` from
    :func:`pack_slices` (its block sizes are used; block_m/block_n, if not the defaults, must match).
    scale: defaults to D ** -0.5. impl: "triton" (CUDA, or CPU under TRITON_INTERPRET=1),
    "reference" (plain torch, any device) or "auto" (Triton on CUDA, reference elsewhere).
    Triton supports head dims that are multiples of 8 up to 128 (64, 96, 128, ...) and
    block_m in (16, 32, 64, 128). Returns (B, H, S_q, D) in q.dtype, contiguous.

    The result, in pseudocode::

        for b, h, i:
            rows = range(i*block_m, min((i+1)*block_m, S_q))
            cols = [t for j in range(nKB) if keep[b, h, i, j] for t in range(j*block_n, min((j+1)*block_n, S_kv))]
            s = q[b, h, rows] @ k[b, h // (H // H_kv), cols].T * scale
            out[b, h, rows] = softmax(s, -1) @ v[b, h // (H // H_kv), cols]   # zeros if cols is empty

    No host synchronisation: with a bool ``keep`` the Triton path packs it on the device first.
    """
    B, H, S_q, D, S_kv, impl, scale, block_m = _prologue(q, k, v, impl, scale, block_m)
    block_n = _check_int("block_n", block_n)
    if isinstance(keep, PackedSlices):
        if (block_m != 128 and block_m != keep.block_m) or (block_n != 1 and block_n != keep.block_n):
            raise ValueError(
                f"block_m, block_n: keep is packed for block_m={keep.block_m}, block_n={keep.block_n}; "
                f"got block_m={block_m}, block_n={block_n}"
            )
        block_m, block_n = keep.block_m, keep.block_n
        expected = (B, H, -(-S_q // block_m), -(-S_kv // block_n))
        if tuple(keep.counts.shape) != expected[:3] or keep.seq_len_kv != S_kv:
            raise ValueError(
                f"keep: PackedSlices for counts {tuple(keep.counts.shape)} and seq_len_kv {keep.seq_len_kv}; "
                f"expected counts {expected[:3]} and seq_len_kv {S_kv}"
            )
        if keep.device != q.device:
            raise ValueError(f"keep: expected the device of q ({q.device}), got {keep.device}")
    else:
        if not isinstance(keep, torch.Tensor):
            raise ValueError(f"keep: expected a bool tensor or PackedSlices, got {type(keep).__name__}")
        expected = (B, H, -(-S_q // block_m), -(-S_kv // block_n))
        if keep.dtype != torch.bool:
            raise ValueError(f"keep: expected dtype torch.bool, got {keep.dtype}")
        if tuple(keep.shape) != expected:
            raise ValueError(
                f"keep: expected shape (B, H, ceil(S_q / block_m), ceil(S_kv / block_n)) = {expected} "
                f"(block_m={block_m}, block_n={block_n}), got {tuple(keep.shape)}"
            )
        if keep.device != q.device:
            raise ValueError(f"keep: expected the device of q ({q.device}), got {keep.device}")

    if impl == "reference":
        from .kernels.reference import sparse_attention_reference

        mask = packing.unpack_slices(keep) if isinstance(keep, PackedSlices) else keep
        return sparse_attention_reference(q, k, v, mask, block_m, block_n, scale)

    _check_triton_shapes(D, block_m)
    from .kernels.triton_sparse import sparse_attention_triton

    packed = keep if isinstance(keep, PackedSlices) else packing.pack_slices(keep, block_m, block_n, S_kv)
    return sparse_attention_triton(q, k, v, packed, scale)


def profile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_m: int = 128,
    scale: Optional[float] = None,
    key_padding: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention plus, per (query block, key), the largest softmax probability over the
    block's queries. Returns ``(out, block_max_probs)``: out (B, H, S_q, D) in q.dtype, the exact
    dense attention; block_max_probs float32 (B, H, ceil(S_q / block_m), S_kv)::

        p = softmax(q[b, h] @ k[b, h // (H // H_kv)].T * scale, -1)    # padded keys excluded
        block_max_probs[b, h, i, j] = max(p[i*block_m : (i+1)*block_m, j])   # 0 for a padded key

    key_padding: optional bool (B, S_kv), True = a real key. The Triton kernel never materialises
    S_q x S_kv (two passes: row log-sum-exp, then probabilities). Same dtypes, shapes and impl
    rules as :func:`sparse_attention`.
    """
    B, H, S_q, D, S_kv, impl, scale, block_m = _prologue(q, k, v, impl, scale, block_m)
    _check_key_padding(key_padding, B, S_kv, q.device)
    if impl == "reference":
        from .kernels.reference import block_max_probs_reference, dense_attention_reference

        out = dense_attention_reference(q, k, v, scale, key_padding)
        return out, block_max_probs_reference(q, k, block_m, scale, key_padding)
    _check_triton_shapes(D, block_m)
    from .kernels.triton_profile import profile_attention_triton

    return profile_attention_triton(q, k, v, block_m, scale, key_padding)


def profile_thresholds(
    alpha: float, B: int, S_kv: int, key_padding: Optional[torch.Tensor], device
) -> torch.Tensor:
    """float32 (B,): the profiled predictor's threshold ``alpha / S_real[b]`` (S_real = real keys;
    +inf when a batch element has none), computed as ``predictors.keep_from_block_max`` does
    (float32), on the device, no host sync."""
    if key_padding is None:
        return torch.full((B,), alpha / S_kv, device=device, dtype=torch.float32)
    n_real = key_padding.sum(-1).to(torch.float32)
    return torch.where(n_real > 0, alpha / n_real.clamp_min(1), torch.full_like(n_real, float("inf")))


def profile_attention_bits(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alpha: float,
    block_m: int = 128,
    scale: Optional[float] = None,
    key_padding: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`profile_attention` fused with the profiled predictor's threshold at M x 1 slices:
    returns ``(out, bits, kept)``:

    - out (B, H, S_q, D) in q.dtype: the exact dense attention;
    - bits int32 (B, H, ceil(S_q / block_m), ceil(S_kv / 32)): the keep mask as a bitmap
      (``packing.pack_bits`` layout), bit j % 32 of word j // 32 set iff
      ``block_max_probs[b, h, i, j] > alpha / S_real[b]`` (``profile_thresholds``), i.e.
      ``pack_bits(keep_from_block_max(block_max_probs, alpha=alpha, key_padding=key_padding))``
      except for probabilities within a few ulps of the threshold (the kernel compares
      log2-scores with log2(threshold), see ``triton_profile.profile_attention_triton``);
    - kept int32 (B, H, ceil(S_q / block_m)): set bits per row.

    The Triton kernel writes the bitmap from its second pass (12.6 MB at Wan 480p instead of
    403 MB of float32 probabilities, thresholded afterwards). impl="reference" computes the
    probabilities with the plain-torch reference and thresholds them. Same argument rules as
    :func:`profile_attention`; alpha a finite number > 0.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")
    B, H, S_q, D, S_kv, r_impl, r_scale, block_m = _prologue(q, k, v, impl, scale, block_m)
    _check_key_padding(key_padding, B, S_kv, q.device)
    if r_impl == "reference":
        out, probs = profile_attention(q, k, v, block_m=block_m, scale=scale, key_padding=key_padding, impl=impl)
        thr = profile_thresholds(float(alpha), B, S_kv, key_padding, q.device)
        keep = probs > thr[:, None, None, None]
        bits = packing.pack_bits(keep)
        return out, bits, keep.sum(-1, dtype=torch.int32)
    scale = r_scale
    _check_triton_shapes(D, block_m)
    from .kernels.triton_profile import profile_attention_triton

    thr = profile_thresholds(float(alpha), B, S_kv, key_padding, q.device)
    return profile_attention_triton(q, k, v, block_m, scale, key_padding, thresholds=thr)
