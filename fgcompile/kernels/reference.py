"""Plain-torch references of every kernel (any device; float32 arithmetic, float64 for float64
inputs; q.dtype results).

They work on chunks of query blocks so that no S_q x S_kv matrix is materialised at once (about
``_CHUNK_ELEMS`` scores per chunk), which keeps S = 32K usable on a GPU.

Layouts: q (B, H, S_q, D); k, v (B, H_kv, S_kv, D) with H % H_kv == 0 (query head h reads kv head
h // (H // H_kv)); keep bool (B, H, ceil(S_q / block_m), ceil(S_kv / block_n)) (docs/DESIGN.md);
key_padding bool (B, S_kv), True = a real key.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["sparse_attention_reference", "block_max_probs_reference", "dense_attention_reference"]

_CHUNK_ELEMS = 1 << 26  # scores per chunk (256 MB in float32)


def _acc(x: torch.Tensor) -> torch.dtype:
    """Arithmetic type: float32, or float64 for float64 inputs (tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand_kv(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, H_kv, S, D) -> float32 (B, H, S, D) with head h reading kv head h // (H // H_kv)."""
    h_kv = x.shape[1]
    x = x.to(_acc(x))
    if h_kv != h:
        x = x.repeat_interleave(h // h_kv, dim=1)
    return x


def _rows_per_chunk(b: int, h: int, s_kv: int, block_m: int) -> int:
    rows = max(1, _CHUNK_ELEMS // max(1, b * h * s_kv))
    return max(block_m, (rows // block_m) * block_m)


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    block_m: int,
    block_n: int,
    scale: float,
) -> torch.Tensor:
    """Sparse attention by the definition: for each query block i of head h, softmax of
    ``q k^T * scale`` over the keys of the kept key blocks, times v; zeros for a query block that
    keeps nothing. Computed in float32, returned in q.dtype, shape (B, H, S_q, D)."""
    B, H, S_q, D = q.shape
    S_kv = k.shape[2]
    kf, vf = _expand_kv(k, H), _expand_kv(v, H)
    out = torch.empty((B, H, S_q, v.shape[-1]), device=q.device, dtype=q.dtype)
    key_block = torch.arange(S_kv, device=q.device) // block_n  # (S_kv,)
    step = _rows_per_chunk(B, H, S_kv, block_m)
    for r0 in range(0, S_q, step):
        r1 = min(S_q, r0 + step)
        qf = q[:, :, r0:r1].to(_acc(q))
        s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, H, r, S_kv)
        qblock = torch.arange(r0, r1, device=q.device) // block_m  # (r,)
        m = keep[:, :, qblock][..., key_block].to(torch.bool)  # (B, H, r, S_kv)
        s = s.masked_fill(~m, float("-inf"))
        any_kept = m.any(dim=-1, keepdim=True)
        s = torch.where(any_kept, s, torch.zeros_like(s))
        p = torch.softmax(s, dim=-1)
        p = torch.where(any_kept, p, torch.zeros_like(p))
        out[:, :, r0:r1] = torch.matmul(p, vf).to(q.dtype)
    return out


def _padded_softmax(s: torch.Tensor, key_padding: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax over the last axis of scores s (B, H, rows, S_kv) over the real keys only: padded
    keys (key_padding (B, S_kv) False) get probability 0; a batch element with no real key gets 0
    everywhere."""
    if key_padding is None:
        return torch.softmax(s, dim=-1)
    kp = key_padding[:, None, None, :].to(torch.bool)
    any_real = kp.any(dim=-1, keepdim=True)
    s = torch.where(any_real, s.masked_fill(~kp, float("-inf")), torch.zeros_like(s))
    return torch.where(any_real & kp, torch.softmax(s, dim=-1), torch.zeros_like(s))


def dense_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_padding: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense attention softmax(q k^T * scale) v in float32, returned in q.dtype. Padded keys
    (key_padding False) are excluded; a query with no real key gets zeros."""
    B, H, S_q, D = q.shape
    S_kv = k.shape[2]
    kf, vf = _expand_kv(k, H), _expand_kv(v, H)
    out = torch.empty((B, H, S_q, v.shape[-1]), device=q.device, dtype=q.dtype)
    step = _rows_per_chunk(B, H, S_kv, 1)
    for r0 in range(0, S_q, step):
        r1 = min(S_q, r0 + step)
        s = torch.matmul(q[:, :, r0:r1].to(_acc(q)), kf.transpose(-1, -2)) * scale
        p = _padded_softmax(s, key_padding)
        out[:, :, r0:r1] = torch.matmul(p, vf).to(q.dtype)
    return out


def block_max_probs_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    block_m: int,
    scale: float,
    key_padding: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """float32 (B, H, ceil(S_q / block_m), S_kv): for each query block and key, the largest
    softmax(q k^T * scale) probability (softmax over keys, per query) among the block's queries.
    Padded keys (key_padding False) are left out of the softmax and get 0."""
    B, H, S_q, D = q.shape
    S_kv = k.shape[2]
    kf = _expand_kv(k, H)
    nqb = -(-S_q // block_m)
    res = torch.empty((B, H, nqb, S_kv), device=q.device, dtype=torch.float32)
    step = _rows_per_chunk(B, H, S_kv, block_m)
    for r0 in range(0, S_q, step):
        r1 = min(S_q, r0 + step)
        s = torch.matmul(q[:, :, r0:r1].to(_acc(q)), kf.transpose(-1, -2)) * scale
        p = _padded_softmax(s, key_padding)
        r = r1 - r0
        pad = (-r) % block_m
        if pad:
            p = torch.nn.functional.pad(p, (0, 0, 0, pad))  # zero rows: never the max of probs >= 0
        p = p.reshape(B, H, (r + pad) // block_m, block_m, S_kv).amax(dim=3)
        res[:, :, r0 // block_m : r0 // block_m + p.shape[2]] = p
    return res
