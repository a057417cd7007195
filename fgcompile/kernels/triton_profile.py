"""The profiling kernel for the "profiled masks" predictor, in Triton.

Dense attention that also returns, for each query block (``block_m`` consecutive queries) and
each key, the largest softmax probability over the block's queries:

    probs[b, h, i, j] = max_{t in block i} softmax_j(q_t . k_j * scale)

computed in two passes so that no S_q x S_kv matrix is ever stored:

1. ``_profile_fwd``: flash attention (online softmax, exp2, fp32 accumulation) over all (real)
   keys, writing ``out`` and the per-row log-sum-exp in base 2, ``lse2 = m + log2(l)``; with
   ``FGCOMPILE_PROFILE_FORWARD=sdpa`` and no key padding, PyTorch's fused attention gives both
   instead where it passes its check (``fgcompile.kernels.sdpa_forward``: no Triton compile);
2. ``_profile_probs``: per (query block, batch*head), recompute the scores tile by tile and store
   the column max of ``exp2(s * scale * log2(e) - lse2)`` over the block's rows: (B, H, nQB, S_kv)
   float32.

``key_padding`` (B, S_kv) bool, True = a real key: padded keys are left out of the softmax and get
probability 0. A query row with no real key gets a zero output. GQA: kv head = h // (H // H_kv).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .sdpa_forward import dense_forward_lse
from .sdpa_forward import wanted as sdpa_wanted
from .triton_common import (
    LOG2E, _online_softmax_step, _out_ptrs, _program_heads, _q_tile, _softmax_state, head_dim_pad, interpreting, launch,
)


@triton.jit
def _profile_fwd(
    Q, K, V, O, LSE, KP,
    qk_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_kpb,
    H, GROUP, S_Q, S_KV,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KP: tl.constexpr,
    UPCAST: tl.constexpr,
):
    mb, bh, b64, h64, hk64 = _program_heads(H, GROUP)
    q, offs_m, offs_d, m_ok, d_ok = _q_tile(Q, b64, h64, mb, stride_qb, stride_qh, stride_qs, stride_qd, S_Q,
                                            BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, UPCAST)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = K + b64 * stride_kb + hk64 * stride_kh
    v_base = V + b64 * stride_vb + hk64 * stride_vh
    m_i, l_i, acc = _softmax_state(BLOCK_M, HEAD_DIM_PAD)
    for start in range(0, S_KV, BLOCK_N):
        kpos = start + offs_n
        valid = kpos < S_KV
        if HAS_KP:
            real = tl.load(KP + b64 * stride_kpb + kpos, mask=valid, other=0)
            valid = valid & (real != 0)
        kpos64 = kpos.to(tl.int64)
        k = tl.load(k_base + kpos64[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=(kpos < S_KV)[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + kpos64[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=(kpos < S_KV)[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        acc, m_i, l_i = _online_softmax_step(q, k, v, acc, m_i, l_i, valid, qk_scale, True)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = _out_ptrs(O, b64, h64, offs_m, offs_d, stride_ob, stride_oh, stride_os, stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse2 = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("inf"))  # +inf: every prob is 0
    tl.store(LSE + bh.to(tl.int64) * S_Q + offs_m, lse2, mask=m_ok)


@triton.jit
def _profile_probs(
    Q, K, LSE, P, KP, THR, BITS, CNT,
    qk_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_kpb,
    H, GROUP, S_Q, S_KV, NQB, NW,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KP: tl.constexpr,
    UPCAST: tl.constexpr,
    WRITE_BITS: tl.constexpr,
):
    qb, bh, b64, h64, hk64 = _program_heads(H, GROUP)
    q, offs_m, offs_d, m_ok, d_ok = _q_tile(Q, b64, h64, qb, stride_qb, stride_qh, stride_qs, stride_qd, S_Q,
                                            BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, UPCAST)
    offs_n = tl.arange(0, BLOCK_N)
    lse2 = tl.load(LSE + bh.to(tl.int64) * S_Q + offs_m, mask=m_ok, other=float("inf"))
    k_base = K + b64 * stride_kb + hk64 * stride_kh
    row = bh.to(tl.int64) * NQB + qb
    p_base = P + row * S_KV
    if WRITE_BITS:
        thr = tl.load(THR + b64)  # log2(alpha / real keys of batch b), float32; +inf: keep nothing
        shifts = tl.arange(0, 32)
        offs_w = tl.arange(0, BLOCK_N // 32)
        kept = tl.full([], 0, tl.int32)
    for start in range(0, S_KV, BLOCK_N):
        kpos = start + offs_n
        in_seq = kpos < S_KV
        valid = in_seq
        if HAS_KP:
            real = tl.load(KP + b64 * stride_kpb + kpos, mask=in_seq, other=0)
            valid = valid & (real != 0)
        k = tl.load(
            k_base + kpos.to(tl.int64)[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            mask=in_seq[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if WRITE_BITS:
            # bit j % 32 of word j // 32 of the row: block max > thr, i.e. (exp2 is monotone)
            # max over rows of (s - lse2) > log2(thr): no exponential on the block's scores.
            x = tl.where(m_ok[:, None] & valid[None, :], s - lse2[:, None], float("-inf"))
            kb = (tl.max(x, 0) > thr).to(tl.int32)
            kept += tl.sum(kb, 0)
            words = tl.sum(tl.reshape(kb, [BLOCK_N // 32, 32]) << shifts[None, :], axis=1)
            widx = start // 32 + offs_w
            tl.store(BITS + row * NW + widx, words, mask=widx < NW)
        else:
            p = tl.math.exp2(s - lse2[:, None])
            p = tl.where(m_ok[:, None] & valid[None, :], p, 0.0)
            tl.store(p_base + kpos, tl.max(p, 0), mask=in_seq)
    if WRITE_BITS:
        tl.store(CNT + row, kept)


def profile_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_m: int,
    scale: float,
    key_padding: Optional[torch.Tensor] = None,
    *,
    thresholds: Optional[torch.Tensor] = None,
):
    """(out (B, H, S_q, D) in q.dtype, block_max_probs float32 (B, H, ceil(S_q / block_m), S_kv)).
    Inputs are assumed validated (``fgcompile.attention.profile_attention``). No host sync.

    With ``thresholds`` (float32 (B,), the keep threshold of each batch element, e.g.
    alpha / real keys) the second pass writes the keep bitmap instead of the probabilities:
    returns (out, bits int32 (B, H, nQB, ceil(S_kv / 32)) with bit j % 32 of word j // 32 set iff
    block_max_probs[b, h, i, j] > thresholds[b], kept int32 (B, H, nQB) = set bits per row):
    12.6 MB written at Wan 480p instead of 403 MB of probabilities. The comparison is made on the
    base-2 log scale (max over the block's rows of s * scale * log2(e) - lse2 > log2(threshold)),
    which skips the exponentials of the probability pass; it can differ from thresholding the
    float32 probabilities only where exp2's rounding straddles the threshold (a few ulps)."""
    B, H, S_q, D = q.shape
    H_kv, S_kv = k.shape[1], k.shape[2]
    dev = q.device
    out = torch.empty((B, H, S_q, D), device=dev, dtype=q.dtype)
    lse = torch.empty((B, H, S_q), device=dev, dtype=torch.float32)
    nqb = triton.cdiv(S_q, block_m)
    write_bits = thresholds is not None
    nw = triton.cdiv(S_kv, 32)
    if write_bits:
        bits = torch.empty((B, H, nqb, nw), device=dev, dtype=torch.int32)
        kept = torch.empty((B, H, nqb), device=dev, dtype=torch.int32)
        thr = torch.log2(thresholds.to(device=dev, dtype=torch.float32)).contiguous()
        probs = lse  # never written
    else:
        probs = torch.empty((B, H, nqb, S_kv), device=dev, dtype=torch.float32)
        bits = kept = thr = lse  # never read or written
    interp = interpreting()
    upcast = interp and q.dtype != torch.float32
    if key_padding is not None:
        kp = key_padding.to(torch.bool).contiguous().view(torch.uint8)
        kp_stride, has_kp = kp.stride(0), True
    else:
        kp, kp_stride, has_kp = lse, 0, False  # any tensor: never read
    dpad = head_dim_pad(D)
    qk_scale = float(scale) * LOG2E
    if interp:
        fwd_m, fwd_n, warps, stages, prob_n = 32, 16, 4, 1, 32
    else:
        fwd_m, fwd_n, warps, stages, prob_n = 128, 64, 8, 3, 64
    fused = dense_forward_lse(q, k, v, scale) if (not has_kp and sdpa_wanted()) else None
    if fused is not None:  # PyTorch's fused attention gave out and lse2: no forward kernel to compile
        out.copy_(fused[0])
        lse.copy_(fused[1])
    else:
        launch(_profile_fwd, (triton.cdiv(S_q, fwd_m), B * H),
            q, k, v, out, lse, kp, qk_scale,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), kp_stride,
            H, H // H_kv, S_q, S_kv,
            HEAD_DIM=D, HEAD_DIM_PAD=dpad, BLOCK_M=fwd_m, BLOCK_N=fwd_n, HAS_KP=has_kp, UPCAST=upcast,
            num_warps=warps, num_stages=stages,
        )
    launch(_profile_probs, (nqb, B * H),
        q, k, lse, probs, kp, thr, bits, kept, qk_scale,
        *q.stride(), *k.stride(), kp_stride,
        H, H // H_kv, S_q, S_kv, nqb, nw,
        HEAD_DIM=D, HEAD_DIM_PAD=dpad, BLOCK_M=block_m, BLOCK_N=prob_n, HAS_KP=has_kp, UPCAST=upcast,
        WRITE_BITS=write_bits,
        num_warps=8 if (block_m >= 128 and not interp) else 4, num_stages=stages,
    )
    if write_bits:
        return out, bits, kept
    return out, probs
