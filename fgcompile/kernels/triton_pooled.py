"""The pooled top-CDF predictor in Triton: query pooling, and the selection (logits -> keep bitmap).

``predictors.pooled_bits`` runs, on CUDA:

1. ``pool_queries_triton`` (``_pool_queries``, one program per query block (b, h, i), ONE read of
   q): the block's mean query ``qbar`` (written pre-multiplied by the softmax scale, in q's dtype)
   and its self-similarity ``sim = mean_t cos(q_t, qbar)``, as the flag ``sim < gamma``;
2. the pooled logits (B, H, n_qb, n_kb): one matrix product (cuBLAS, tensor cores: the pooled
   queries of all blocks of a kv head against all keys; at Wan 480p 3,072 x 128 x 32,760);
3. ``pooled_select_bits_triton`` (``_pooled_select``): the rest of ``predictors.top_cdf`` + the
   gamma fallback + ``pack_bits`` for one row (b, h, i) per program:

    valid[j] = j < n_kb and key block j has a real key
    e = exp(logit - max logit) (0 where not valid); Z = sum e; n = count of valid
    lo = log((1 - tau) / n) + log Z; hi = 1; target = tau * Z
    STEPS times: mid = (lo + hi) / 2; if sum(e where e >= exp(mid)) >= target: lo = mid else hi = mid
      (ARITY > 1: w = (hi - lo) / (ARITY + 1), the ARITY sums at lo + j * w, j = 1..ARITY, in one
      pass; the bracket moves to [lo + j* w, lo + (j* + 1) w] around the largest feasible j*)
    keep = (e >= exp(lo)) and Z > 0;  keep = valid where the block is dissimilar or tau >= 1
    bits of keep -> int32 words (bit j % 32 of word j // 32)

Rows of up to ``ROW_REG_MAX`` keys are held in registers for the whole search (one read of the
logits per row; the STEPS passes run on registers). Longer rows loop over tiles of the row in every
pass (they re-read the logits, from L2: slower, see benchmarks/NOTES.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import interpreting, launch, pow2_at_least

__all__ = ["pool_queries_triton", "pooled_select_bits_triton", "ROW_REG_MAX"]

#: longest row (power of two) kept in registers
ROW_REG_MAX = 32768
_TILE = 8192


@triton.jit
def _pool_queries(
    Q, QBAR, DIS,
    stride_qb, stride_qh, stride_qs,
    H, S_q, n_qb, gamma, scale,
    BLOCK_M: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)  # query block: the long axis on grid axis 0 (axis 1 stops at 65,535)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < S_q
    ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qs + cols[None, :]
    x = tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < D), other=0.0).to(tl.float32)
    cnt = tl.sum(row_ok.to(tl.float32), 0)
    qbar = tl.sum(x, 0) / cnt  # (BLOCK_D,)
    qbar_n = qbar / tl.maximum(tl.sqrt(tl.sum(qbar * qbar, 0)), 1e-12)
    norms = tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)  # (BLOCK_M,)
    cos = tl.sum(x * qbar_n[None, :], 1) / norms
    sim = tl.sum(tl.where(row_ok, cos, 0.0), 0) / cnt
    r = bh * n_qb + i
    tl.store(QBAR + r * D + cols, (qbar * scale).to(QBAR.dtype.element_ty), mask=cols < D)
    tl.store(DIS + r, (sim < gamma).to(tl.int8))


def pool_queries_triton(q: torch.Tensor, block_m: int, gamma: float, scale: float, out_dtype: torch.dtype,
                        *, num_warps: int | None = None):
    """Query pooling + self-similarity in one pass over q.

    q: (B, H, S_q, D) fp16/bf16/fp32, last axis contiguous. Returns ``(qbar_scaled, dissimilar)``:
    ``qbar_scaled`` (B, H, n_qb, D) in ``out_dtype``, the mean query of each block of ``block_m``
    rows (the last block may be shorter) times ``scale``; ``dissimilar`` bool (B, H, n_qb), the
    blocks whose mean cosine similarity of each query to the block mean is below ``gamma``. Sums in
    float32. ``block_m`` a power of two; D at most 256. ``num_warps``: None is 4. No host
    sync.
    """
    B, H, S_q, D = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    n_qb = -(-S_q // block_m)
    qbar = torch.empty((B, H, n_qb, D), device=q.device, dtype=out_dtype)
    dis = torch.empty((B, H, n_qb), device=q.device, dtype=torch.int8)
    if B * H * n_qb == 0:
        return qbar, dis.bool()
    block_d = max(16, pow2_at_least(D))
    # 4 warps: 0.060 ms vs 0.069 with 8 at Wan 480p on an H200 (variant_probe_h200.json)
    warps = 4 if num_warps is None else num_warps
    launch(_pool_queries, (n_qb, B * H),
        q, qbar, dis, q.stride(0), q.stride(1), q.stride(2),
        H, S_q, n_qb, float(gamma), float(scale),
        BLOCK_M=block_m, D=D, BLOCK_D=block_d, num_warps=warps,
    )
    return qbar, dis.view(torch.bool)


@triton.jit
def _row_logits(l_base, v_base, j, NKB, HAS_VALID: tl.constexpr):
    """The logits of keys ``j`` of one row, float32, -inf where a key is out of range or not
    valid; and the valid mask."""
    ok = j < NKB
    lg = tl.load(l_base + j, mask=ok, other=float("-inf")).to(tl.float32)
    if HAS_VALID:
        valid = ok & (tl.load(v_base + j, mask=ok, other=0) != 0)
        lg = tl.where(valid, lg, float("-inf"))
    else:  # out of range is -inf already (the load's fill): no select (7% of the selection, H100)
        valid = ok
    return lg, valid


@triton.jit
def _store_bits(w_base, keep, word0, NW, TILE: tl.constexpr):
    """Store ``keep`` (TILE,) as TILE // 32 int32 words from word ``word0`` of the row."""
    shifts = tl.arange(0, 32)
    words = tl.sum(tl.reshape(keep.to(tl.int32), [TILE // 32, 32]) << shifts[None, :], axis=1)
    widx = word0 + tl.arange(0, TILE // 32)
    tl.store(w_base + widx, words, mask=widx < NW)


@triton.jit
def _search_start(z, n, tau, one_minus_tau):
    """The threshold search's first bracket [lo, hi] (log-weights, relative to the row max) and its
    target mass, for a row of normaliser ``z`` over ``n`` valid keys: a key of weight below
    (1 - tau) Z / n is never needed (all such keys together hold at most 1 - tau of the mass)."""
    lo = tl.log(one_minus_tau / n) + tl.log(tl.maximum(z, 1.1754943508222875e-38))
    return lo, tl.full([], 1.0, tl.float32), tau * z


@triton.jit
def _bisect_bracket(mass, target, mid, lo, hi):
    """The new bracket of a bisection pass: [mid, hi] where the mass at or above exp(mid) reaches
    target (mid keeps enough), else [lo, mid] (``predictors.top_cdf``, the same arithmetic)."""
    good = mass >= target
    return tl.where(good, mid, lo), tl.where(good, hi, mid)


@triton.jit
def _kary_masses(acc, e, lo, w, ARITY: tl.constexpr, AP: tl.constexpr):
    """acc (AP,) += the mass of ``e`` at or above each of the ARITY thresholds exp(lo + j * w),
    j = 1..ARITY, in lane j - 1 (independent reductions: their latencies overlap)."""
    lanes = tl.arange(0, AP)
    for j in tl.static_range(1, ARITY + 1):
        s = tl.sum(tl.where(e >= tl.exp(lo + j * w), e, 0.0), 0)
        acc += tl.where(lanes == j - 1, s, 0.0)
    return acc


@triton.jit
def _kary_bracket(acc, target, lo, hi, w, ARITY: tl.constexpr, AP: tl.constexpr):
    """The new bracket of a k-ary pass: around the largest threshold whose mass reaches target
    (``predictors.top_cdf`` with arity > 1, the same arithmetic)."""
    lanes = tl.arange(0, AP)
    best = tl.max(tl.where((acc >= target) & (lanes < ARITY), (lanes + 1).to(tl.float32), 0.0), 0)
    hi = tl.where(best < ARITY, lo + (best + 1.0) * w, hi)
    return lo + best * w, hi


@triton.jit
def _pooled_select(
    L, VALID, DIS, BITS,
    tau, one_minus_tau, HQ, NKB, NW, stride_vb,
    HAS_VALID: tl.constexpr,
    TAU_ONE: tl.constexpr,
    STEPS: tl.constexpr,
    TILE: tl.constexpr,
    IN_REG: tl.constexpr,
    ARITY: tl.constexpr,
    AP: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    b = r // HQ
    l_base = L + r * NKB
    v_base = VALID + b * stride_vb
    w_base = BITS + r * NW
    offs = tl.arange(0, TILE)
    dis = tl.load(DIS + r) != 0
    if TAU_ONE:
        search = False
    else:
        search = dis == 0
    if IN_REG:
        lg, valid = _row_logits(l_base, v_base, offs, NKB, HAS_VALID)
        m = tl.max(lg, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(lg - m)  # 0 where not valid
        z = tl.sum(e, 0)
        if HAS_VALID:
            n = tl.maximum(tl.sum(valid.to(tl.float32), 0), 1.0)
        else:  # every key block of the row is valid: no reduction needed
            n = tl.maximum(NKB, 1).to(tl.float32)
        lo, hi, target = _search_start(z, n, tau, one_minus_tau)
        if search:
            for _ in range(STEPS):
                if ARITY == 1:
                    mid = 0.5 * (lo + hi)
                    lo, hi = _bisect_bracket(tl.sum(tl.where(e >= tl.exp(mid), e, 0.0), 0), target, mid, lo, hi)
                else:
                    w = (hi - lo) / (ARITY + 1)
                    acc = _kary_masses(tl.zeros([AP], tl.float32), e, lo, w, ARITY, AP)
                    lo, hi = _kary_bracket(acc, target, lo, hi, w, ARITY, AP)
        keep = (e >= tl.exp(lo)) & (e > 0.0)  # e > 0 only if Z > 0
        _store_bits(w_base, tl.where(search, keep, valid), 0, NW, TILE)
    else:
        # pass 1: max, normaliser (online) and the count of valid keys
        m = tl.full([], float("-inf"), tl.float32)
        z = tl.full([], 0.0, tl.float32)
        n = tl.full([], 0.0, tl.float32)
        for start in range(0, NKB, TILE):
            lg, valid = _row_logits(l_base, v_base, start + offs, NKB, HAS_VALID)
            m_new = tl.maximum(m, tl.max(lg, 0))
            m_s = tl.where(m_new == float("-inf"), 0.0, m_new)
            z = z * tl.exp(m - m_s) + tl.sum(tl.exp(lg - m_s), 0)
            m = m_new
            n += tl.sum(valid.to(tl.float32), 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        n = tl.maximum(n, 1.0)
        lo, hi, target = _search_start(z, n, tau, one_minus_tau)
        if search:
            for _ in range(STEPS):
                if ARITY == 1:
                    mid = 0.5 * (lo + hi)
                    t = tl.exp(mid)
                    mass = tl.full([], 0.0, tl.float32)
                    for start in range(0, NKB, TILE):
                        lg, valid = _row_logits(l_base, v_base, start + offs, NKB, HAS_VALID)
                        e = tl.where(valid, tl.exp(lg - m), 0.0)
                        mass += tl.sum(tl.where(e >= t, e, 0.0), 0)
                    lo, hi = _bisect_bracket(mass, target, mid, lo, hi)
                else:
                    w = (hi - lo) / (ARITY + 1)
                    acc = tl.zeros([AP], tl.float32)
                    for start in range(0, NKB, TILE):
                        lg, valid = _row_logits(l_base, v_base, start + offs, NKB, HAS_VALID)
                        e = tl.where(valid, tl.exp(lg - m), 0.0)
                        acc = _kary_masses(acc, e, lo, w, ARITY, AP)
                    lo, hi = _kary_bracket(acc, target, lo, hi, w, ARITY, AP)
        t = tl.exp(lo)
        for start in range(0, NKB, TILE):
            lg, valid = _row_logits(l_base, v_base, start + offs, NKB, HAS_VALID)
            e = tl.where(valid, tl.exp(lg - m), 0.0)
            keep = (e >= t) & (e > 0.0)
            _store_bits(w_base, tl.where(search, keep, valid), start // 32, NW, TILE)



def pooled_select_bits_triton(
    logits: torch.Tensor,
    valid: torch.Tensor | None,
    dissimilar: torch.Tensor,
    tau: float,
    steps: int,
    *,
    row_reg_max: int | None = None,
    tile: int | None = None,
    num_warps: int | None = None,
    arity: int = 1,
) -> torch.Tensor:
    """Top-CDF selection + gamma fallback + bit packing.

    logits: float (B, H, n_qb, n_kb) (any float dtype; the last axis contiguous after
    ``.contiguous()``), NOT masked: ``valid`` (bool (B, n_kb) or None = all valid) says which key
    blocks may be kept; dissimilar: bool (B, H, n_qb), rows that keep every valid key block; tau in
    (0, 1] (>= 1: every valid key block). ``steps`` search passes of ``arity`` thresholds each
    (``predictors.top_cdf``'s arithmetic). Returns int32 (B, H, n_qb, ceil(n_kb / 32)). No host
    sync.
    """
    if not isinstance(arity, int) or isinstance(arity, bool) or arity < 1:
        raise ValueError(f"arity: expected an int >= 1, got {arity!r}")
    B, H, nqb, nkb = logits.shape
    logits = logits.contiguous()
    dev = logits.device
    nw = -(-nkb // 32)
    out = torch.empty((B, H, nqb, nw), device=dev, dtype=torch.int32)
    R = B * H * nqb
    if R == 0:
        return out
    dis = dissimilar.to(torch.bool).contiguous().view(torch.uint8)
    if valid is not None:
        v = valid.to(torch.bool).contiguous().view(torch.uint8)
        stride_vb, has_valid = v.stride(0), True
    else:
        v, stride_vb, has_valid = dis, 0, False
    interp = interpreting()
    row = max(32, pow2_at_least(nkb))
    reg_max = row_reg_max if row_reg_max is not None else (ROW_REG_MAX if not interp else 1024)
    in_reg = row <= reg_max
    if in_reg:
        t = row
    else:
        t = min(tile if tile is not None else (_TILE if not interp else 64), row)
    warps = num_warps if num_warps is not None else (4 if interp else max(4, min(16, t // 2048)))
    launch(_pooled_select, (R,),
        logits, v, dis, out,
        float(tau), float(1.0 - tau), H * nqb, nkb, nw, stride_vb,
        HAS_VALID=has_valid, TAU_ONE=bool(tau >= 1), STEPS=int(steps), TILE=t, IN_REG=in_reg,
        ARITY=int(arity), AP=pow2_at_least(arity), num_warps=warps,
    )
    return out
