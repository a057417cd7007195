"""The two FG-Attn sparsity predictors, as pure functions, and the density budget.

Every function here returns (or consumes) the keep mask of ``docs/DESIGN.md``: a bool tensor
``keep`` of shape (B, H, ceil(S_q / block_m), ceil(S_kv / block_n)); ``keep[b, h, i, j]`` means
queries ``i*block_m .. (i+1)*block_m - 1`` of head h attend to keys ``j*block_n .. (j+1)*block_n - 1``.

Inputs everywhere: ``q`` (B, H, S_q, D), ``k`` (B, H_kv, S_kv, D) with H % H_kv == 0 (GQA: query head
h reads key head ``h // (H // H_kv)``), floating point; ``key_padding`` None or a bool (B, S_kv)
tensor, True = a real key; ``scale`` None (= 1 / sqrt(D)) or a positive float.

- ``profile_slices`` (the "profiled" predictor): keep tile (i, j) iff the largest softmax probability
  (softmax over all real keys of ``q k^T * scale``) of any query of block i on any key of key block j
  exceeds ``alpha / S_kv`` (S_kv = the number of real keys of that batch element).
- ``pooled_slices`` (the SpargeAttn-style pooled top-CDF predictor): mean-pool every query block
  (and every key block when block_n > 1), softmax of the pooled scores over key blocks, keep the most
  probable key blocks until their cumulative probability reaches ``tau``; a query block whose queries
  are not self-similar (mean cosine similarity to their mean below ``gamma``) keeps every key block.
- ``apply_density``: keep at most ``ceil(density * n_key_blocks)`` of the strongest kept tiles per
  query block (both predictors' ``density=`` argument).
- ``profile_scores`` / ``keep_from_block_max``: the two halves of ``profile_slices`` (the runtime
  gets the block maxima from the profiling attention kernel and only needs the second half).

Nothing here synchronises with the host (no ``.item()``, ``.nonzero()``, boolean indexing or
``.cpu()`` on data): the functions run inside compiled models and CUDA graphs. Python control flow
depends on shapes and Python arguments only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "profile_slices",
    "profile_scores",
    "keep_from_block_max",
    "pooled_slices",
    "pooled_bits",
    "profile_bits",
    "apply_density",
    "top_cdf",
    "CDF_STEPS",
    "CDF_ARITY",
    "density_budget",
]

# Bisection steps of the top-CDF threshold search (see ``top_cdf``). The search interval is at most
# 1 + ln(n / (1 - tau)) nats wide (about 14 nats for n = 32,760, tau = 0.9), so 8 steps pin the
# threshold to about 0.055 nats: the kept set is the exact top-CDF set plus, at most, keys whose
# probability is within a relative 5.7% of the exact threshold (at n = 75,600, tau = 0.99: 5.9%).
# Each step is one block-wide reduction of the selection kernel (its cost is linear in the steps):
# on an H200 at Wan 480p, 8 steps select in 0.40 ms and keep 1.0% more keys than 12 steps
# (0.2338 vs 0.2315 of them), which took 0.47 ms (benchmarks/results/variant_probe_h200.json).
CDF_STEPS = 8
# Thresholds tried per search pass: 1 is bisection. With arity A each pass splits the bracket into
# A + 1 equal parts with A independent reductions (whose latencies overlap in the kernel), so
# (A + 1) ** passes = 2 ** CDF_STEPS gives the same precision in fewer dependent passes: A = 3 in
# 4, A = 15 in 2 (``CDF_PLANS``). They measured slower than bisection on the H100 (more reductions
# per pass; benchmarks/NOTES.md, session 4): benchmarks/overhead_bench.py times them.
CDF_ARITY = 1
#: (arity, passes) of equal precision (a 2 ** CDF_STEPS = 256-point grid)
CDF_PLANS = ((1, 8), (3, 4), (15, 2))


# ----------------------------------------------------------------------------- validation
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_m,
    block_n,
    scale,
    key_padding: Optional[torch.Tensor],
    density,
) -> float:
    """Validate the common arguments; returns the softmax scale."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or not q.is_floating_point():
        raise ValueError(
            f"q: expected a floating-point tensor of shape (B, H, S_q, D), got "
            f"{_describe(q)}"
        )
    if not isinstance(k, torch.Tensor) or k.dim() != 4 or not k.is_floating_point():
        raise ValueError(
            f"k: expected a floating-point tensor of shape (B, H_kv, S_kv, D), got {_describe(k)}"
        )
    B, H, S_q, D = q.shape
    Bk, H_kv, S_kv, Dk = k.shape
    if k.device != q.device:
        raise ValueError(f"k: expected a tensor on q's device {q.device}, got one on {k.device}")
    if Bk != B or Dk != D:
        raise ValueError(
            f"k: expected shape ({B}, H_kv, S_kv, {D}) to match q {tuple(q.shape)} in batch and head "
            f"dim, got {tuple(k.shape)}"
        )
    if H_kv < 1 or H % H_kv:
        raise ValueError(
            f"k: expected a number of key heads that divides q's {H} heads (GQA), got {H_kv}"
        )
    if S_q < 1 or S_kv < 1 or D < 1:
        raise ValueError(f"q, k: expected non-empty sequences and head dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not _is_int(block_m) or block_m < 1:
        raise ValueError(f"block_m: expected an int >= 1, got {block_m!r}")
    if not _is_int(block_n) or block_n < 1:
        raise ValueError(f"block_n: expected an int >= 1, got {block_n!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not _is_real(scale) or scale <= 0:
        raise ValueError(f"scale: expected None or a finite number > 0, got {scale!r}")
    _check_padding(key_padding, B, S_kv, q.device)
    _check_density(density)
    return float(scale)


def _check_padding(key_padding, B: int, S_kv: int, device) -> None:
    if key_padding is None:
        return
    if (
        not isinstance(key_padding, torch.Tensor)
        or key_padding.dtype != torch.bool
        or tuple(key_padding.shape) != (B, S_kv)
    ):
        raise ValueError(
            f"key_padding: expected None or a bool tensor of shape ({B}, {S_kv}) (True = a real key), "
            f"got {_describe(key_padding)}"
        )
    if key_padding.device != device:
        raise ValueError(f"key_padding: expected a tensor on {device}, got one on {key_padding.device}")


def _check_tau_gamma(tau, gamma) -> None:
    if not _is_real(tau) or not 0 < tau <= 1:
        raise ValueError(f"tau: expected a number in (0, 1], got {tau!r}")
    if not _is_real(gamma) or not -1 <= gamma <= 1:
        raise ValueError(f"gamma: expected a number in [-1, 1], got {gamma!r}")


def _check_density(density) -> None:
    if density is not None and (not _is_real(density) or not 0 < density <= 1):
        raise ValueError(f"density: expected None or a number in (0, 1], got {density!r}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- profile predictor
def profile_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_m: int = 128,
    scale: Optional[float] = None,
    key_padding: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Block-max softmax probabilities, the statistic the profiled predictor thresholds.

    Returns ``s``, float32 of shape (B, H, ceil(S_q / block_m), S_kv)::

        P = softmax(q k^T * scale) over the real keys (padded keys get probability 0)
        s[b, h, i, j] = max over queries t of block i of P[b, h, t, j]

    On CUDA (fp16/bf16/fp32, the head dims and block sizes the Triton kernels support) this runs the
    profiling kernel (``fgcompile.kernels.triton_profile``), which never stores an S_q x S_kv
    matrix; elsewhere the chunked plain-torch ``fgcompile.kernels.reference.block_max_probs_reference``
    (float32 arithmetic). A batch element whose keys are all padded gets all-zero scores.
    """
    scale = _check_qk(q, k, block_m=block_m, block_n=1, scale=scale, key_padding=key_padding, density=None)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.dtype == q.dtype:
        out = _triton_block_max(q, k, block_m, scale, key_padding)
        if out is not None:
            return out
    from .kernels.reference import block_max_probs_reference

    return block_max_probs_reference(q, k, block_m, scale, key_padding)


def _triton_block_max(q, k, block_m, scale, key_padding) -> Optional[torch.Tensor]:
    """The profiling kernel's block maxima, or None when the kernel does not support the shapes."""
    from .kernels import triton_profile

    fn = getattr(triton_profile, "block_max_probs_triton", None)  # a block-max-only entry point
    if fn is not None:
        return fn(q, k, block_m, scale, key_padding)
    from . import attention

    try:
        # The profiling attention kernel with v = k: the output is discarded (wasted P @ V work).
        return attention.profile_attention(
            q, k, k, block_m=block_m, scale=scale, key_padding=key_padding, impl="triton"
        )[1]
    except ValueError:  # inputs are validated: only the kernel's shape limits (head dim, block_m)
        return None


def keep_from_block_max(
    block_max: torch.Tensor,
    *,
    alpha: float = 0.5,
    block_n: int = 1,
    key_padding: Optional[torch.Tensor] = None,
    density: Optional[float] = None,
) -> torch.Tensor:
    """The profiled predictor's rule applied to block-max probabilities.

    ``block_max``: (B, H, n_qb, S_kv) float, ``block_max[b, h, i, j]`` = the largest softmax
    probability of any query of block i on key j (``profile_scores`` or the profiling attention
    kernel). Returns keep, bool (B, H, n_qb, ceil(S_kv / block_n))::

        tile_max[b, h, i, j] = max of block_max[b, h, i, j*block_n : (j+1)*block_n] over real keys
        keep[b, h, i, j] = tile_max[b, h, i, j] > alpha / S_real[b]

    S_real[b] = the number of real keys of batch element b (S_kv without ``key_padding``). Padded
    keys never count, so a tile of padded keys only is never kept. ``density``: see
    ``apply_density`` (the strongest tiles by ``tile_max``).
    """
    if not isinstance(block_max, torch.Tensor) or block_max.dim() != 4 or not block_max.is_floating_point():
        raise ValueError(
            f"block_max: expected a floating-point tensor of shape (B, H, n_qb, S_kv), got {_describe(block_max)}"
        )
    if not _is_real(alpha) or alpha <= 0:
        raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")
    if not _is_int(block_n) or block_n < 1:
        raise ValueError(f"block_n: expected an int >= 1, got {block_n!r}")
    B, _, _, S_kv = block_max.shape
    _check_padding(key_padding, B, S_kv, block_max.device)
    _check_density(density)

    scores = block_max
    if key_padding is not None:
        scores = scores.masked_fill(~key_padding[:, None, None, :], 0.0)
        n_real = key_padding.sum(-1).to(scores.dtype)  # (B,), on the device
        # No real key: an infinite threshold keeps nothing.
        thr = torch.where(n_real > 0, alpha / n_real.clamp_min(1), torch.full_like(n_real, float("inf")))
        thr = thr[:, None, None, None]
    else:
        thr = alpha / S_kv
    if block_n > 1:
        n_kb = _cdiv(S_kv, block_n)
        if n_kb * block_n != S_kv:  # probabilities are >= 0: zero padding is neutral for the max
            scores = F.pad(scores, (0, n_kb * block_n - S_kv))
        scores = scores.unflatten(-1, (n_kb, block_n)).amax(-1)
    keep = scores > thr
    if density is not None:
        keep = apply_density(keep, scores, density)
    return keep


def profile_slices(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    alpha: float = 0.5,
    block_m: int = 128,
    block_n: int = 1,
    scale: Optional[float] = None,
    key_padding: Optional[torch.Tensor] = None,
    density: Optional[float] = None,
) -> torch.Tensor:
    """The profiled (FG-Attn "cached") predictor: which M x N tiles to compute.

    q (B, H, S_q, D), k (B, H_kv, S_kv, D) floating point; key_padding None or bool (B, S_kv),
    True = a real key. Returns keep, bool (B, H, ceil(S_q / block_m), ceil(S_kv / block_n))::

        P = softmax(q k^T * scale) over all real keys (scale defaults to 1 / sqrt(D))
        keep[b, h, i, j] = max over queries t of block i and real keys s of key block j of
                           P[b, h, t, s]  >  alpha / S_real[b]

    S_real[b] = number of real keys (S_kv without key_padding). FG-Attn uses alpha = 0.5 (and 0.6),
    block_m = 128, block_n = 1; a smaller alpha keeps more. Padded keys are never kept.
    ``density``: keep at most ``ceil(density * n_key_blocks)`` of the strongest kept tiles per query
    block (``apply_density``).
    """
    if not _is_real(alpha) or alpha <= 0:
        raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")
    _check_qk(q, k, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding, density=density)
    block_max = profile_scores(q, k, block_m=block_m, scale=scale, key_padding=key_padding)
    return keep_from_block_max(block_max, alpha=alpha, block_n=block_n, key_padding=key_padding, density=density)


def profile_bits(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alpha: float = 0.5,
    block_m: int = 128,
    block_n: int = 1,
    scale: Optional[float] = None,
    key_padding: Optional[torch.Tensor] = None,
    density: Optional[float] = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A profiled call: exact dense attention plus the profiled predictor's keep mask as a bitmap.

    Returns ``(out, bits, density_per_head)``: out (B, H, S_q, D) in q.dtype (dense attention);
    bits int32 (B, H, n_qb, ceil(n_kb / 32)) = ``pack_bits(keep_from_block_max(block_max,
    alpha=alpha, block_n=block_n, key_padding=key_padding, density=density))`` with block_max from
    ``attention.profile_attention`` (n_kb = ceil(S_kv / block_n)); density_per_head float32 (H,):
    the kept fraction of (query block, key block) tiles per head, averaged over batch and query
    blocks. ``impl`` as for ``attention.profile_attention``.

    At block_n == 1 without a density budget, when the Triton kernel runs (CUDA, or impl="triton"
    under TRITON_INTERPRET=1), the profiling kernel thresholds in its second pass and writes the
    bitmap directly (``attention.profile_attention_bits``: 12.6 MB at Wan 480p instead of 403 MB of
    float32 probabilities plus a 100 MB bool mask). Otherwise the probabilities are computed,
    thresholded and packed. No host sync.
    """
    from . import attention
    from .kernels.packing import pack_bits

    if not _is_real(alpha) or alpha <= 0:
        raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")
    _check_qk(q, k, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding, density=density)
    n_kb = _cdiv(k.shape[2], block_n)
    fused = block_n == 1 and density is None and attention._resolve_impl(impl, q.device) == "triton"
    if fused:
        out, bits, kept = attention.profile_attention_bits(
            q, k, v, alpha=alpha, block_m=block_m, scale=scale, key_padding=key_padding, impl=impl
        )
        return out, bits, kept.to(torch.float32).mean(dim=(0, 2)) / n_kb
    out, block_max = attention.profile_attention(q, k, v, block_m=block_m, scale=scale, key_padding=key_padding, impl=impl)
    keep = keep_from_block_max(block_max, alpha=alpha, block_n=block_n, key_padding=key_padding, density=density)
    return out, pack_bits(keep), keep.float().mean(dim=(0, 2, 3))


# ----------------------------------------------------------------------------- pooled predictor
def _pool_rows(x: torch.Tensor, block: int, ct: torch.dtype) -> torch.Tensor:
    """Sum of x (..., S, D) over consecutive blocks of ``block`` rows -> (..., ceil(S/block), D) in
    ``ct``, without a full-size copy of x."""
    S = x.shape[-2]
    full = S // block
    parts = []
    if full:
        parts.append(x[..., : full * block, :].unflatten(-2, (full, block)).sum(-2, dtype=ct))
    if full * block != S:
        parts.append(x[..., full * block :, :].sum(-2, keepdim=True, dtype=ct))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def _block_counts(S: int, block: int, device) -> torch.Tensor:
    n = _cdiv(S, block)
    counts = torch.full((n,), float(block), device=device)
    counts[-1] = S - (n - 1) * block
    return counts


def top_cdf(logits: torch.Tensor, tau: float, *, steps: int = CDF_STEPS, arity: int = CDF_ARITY) -> torch.Tensor:
    """Top-CDF selection along the last dim, sort-free and without host synchronisation.

    ``logits`` (..., n) float, ``-inf`` for entries that cannot be kept. With
    ``p = softmax(logits, -1)``, returns a bool mask that keeps the most probable entries until their
    cumulative probability reaches ``tau`` (at least one), i.e. ``p >= t`` for the largest t whose
    kept mass is ``>= tau``. The threshold is found by ``steps`` bisection steps on log p, from a
    bracket that always holds a feasible end (entries with p < (1 - tau) / n together hold less than
    1 - tau), so the kept mass is always >= tau; the mask is the exact top-CDF set plus, at most,
    entries within ``(1 + ln(n / (1 - tau))) / 2**steps`` nats of the exact threshold. ``tau >= 1``
    keeps every entry whose logit is finite. A row with no finite logit keeps nothing.

    ``arity`` > 1: each of the ``steps`` passes tries ``arity`` thresholds ``lo + j * w``,
    ``w = (hi - lo) / (arity + 1)``, and keeps the bracket around the largest feasible one (the
    precision is then the bracket / (arity + 1) ** steps). The Triton selection kernel runs the
    same arithmetic (``fgcompile.kernels.triton_pooled``).
    """
    valid = logits > float("-inf")
    if tau >= 1:
        return valid
    m = logits.amax(-1, keepdim=True)
    m = torch.where(m > float("-inf"), m, torch.zeros_like(m))
    e = (logits - m).exp_()  # unnormalised probabilities in [0, 1]; 0 where invalid
    Z = e.sum(-1, keepdim=True)  # >= 1 where any entry is valid, 0 otherwise
    n = valid.sum(-1, keepdim=True).clamp_min(1).to(e.dtype)
    log_z = Z.clamp_min(torch.finfo(e.dtype).tiny).log()
    lo = torch.log((1.0 - tau) / n) + log_z  # log threshold (on e): feasible
    hi = torch.ones_like(lo)  # e <= 1 < exp(1): keeps nothing, infeasible
    target = tau * Z
    zero = torch.zeros((), dtype=e.dtype, device=e.device)
    if not isinstance(arity, int) or isinstance(arity, bool) or arity < 1:
        raise ValueError(f"arity: expected an int >= 1, got {arity!r}")
    for _ in range(steps):
        if arity == 1:
            mid = 0.5 * (lo + hi)
            mass = torch.where(e >= mid.exp(), e, zero).sum(-1, keepdim=True)
            ok = mass >= target
            lo = torch.where(ok, mid, lo)
            hi = torch.where(ok, hi, mid)
            continue
        w = (hi - lo) / (arity + 1)
        best = torch.zeros_like(lo)  # the largest j whose threshold keeps enough mass (0: none)
        for j in range(1, arity + 1):
            mass = torch.where(e >= (lo + j * w).exp(), e, zero).sum(-1, keepdim=True)
            best = torch.where(mass >= target, torch.full_like(best, float(j)), best)
        hi = torch.where(best < arity, lo + (best + 1.0) * w, hi)
        lo = lo + best * w
    return (e >= lo.exp()) & valid & (Z > 0)


def pooled_slices(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    tau: float = 0.9,
    gamma: float = 0.5,
    block_m: int = 128,
    block_n: int = 1,
    scale: Optional[float] = None,
    key_padding: Optional[torch.Tensor] = None,
    density: Optional[float] = None,
) -> torch.Tensor:
    """The pooled top-CDF predictor (SpargeAttn-style): which M x N tiles to compute.

    q (B, H, S_q, D), k (B, H_kv, S_kv, D) floating point; key_padding None or bool (B, S_kv),
    True = a real key. Returns keep, bool (B, H, ceil(S_q / block_m), ceil(S_kv / block_n))::

        qbar[i] = mean of the queries of block i
        kbar[j] = mean of the real keys of key block j (the key itself when block_n == 1);
                  a key block with no real key is never kept
        p[i, :] = softmax over key blocks of qbar[i] . kbar[j] * scale
        keep[i, j] = j is among the most probable key blocks whose cumulative p first reaches tau
                     (at least one; ties at the threshold are all kept; see ``top_cdf``)
        sim[i] = mean over queries t of block i of cos(q_t, qbar[i])
        if sim[i] < gamma: keep[i, j] = True for every key block j with a real key

    tau in (0, 1] (1 keeps every real key block), gamma in [-1, 1] (-1 never falls back).
    ``density``: keep at most ``ceil(density * n_key_blocks)`` tiles per query block, the most
    probable (``apply_density``). Computed in float32 (float64 for float64 inputs); about
    2 + ``CDF_STEPS`` passes over the (B, H, n_qb, n_kb) pooled scores.
    """
    _check_tau_gamma(tau, gamma)
    scale = _check_qk(q, k, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding, density=density)
    logits, dissimilar, valid_kb = _pooled_parts(q, k, gamma=gamma, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding)
    if valid_kb is not None:
        logits = logits.masked_fill_(~valid_kb[:, None, None, :], float("-inf"))

    keep = top_cdf(logits, tau)
    all_real = torch.ones_like(keep) if valid_kb is None else valid_kb[:, None, None, :].expand_as(keep)
    keep = torch.where(dissimilar[..., None], all_real, keep)
    if density is not None:
        keep = apply_density(keep, logits, density)
    return keep


def _pooled_queries(q, *, gamma, block_m, scale, ct, out_dtype, kernel: bool):
    """(scale * qbar (B, H, n_qb, D) in ``out_dtype``, dissimilar bool (B, H, n_qb)) of the pooled
    predictor. ``kernel``: one Triton pass over q (``triton_pooled.pool_queries_triton``, sums in
    float32); else torch ops in ``ct``."""
    if kernel:
        from .kernels.triton_pooled import pool_queries_triton

        return pool_queries_triton(q, block_m, gamma, scale, out_dtype)
    S_q = q.shape[2]
    qsum = _pool_rows(q, block_m, ct)  # (B, H, n_qb, D)
    qbar = qsum / _block_counts(S_q, block_m, q.device).to(ct)[:, None]
    qbar_n = qbar / torch.linalg.vector_norm(qbar, dim=-1, keepdim=True).clamp_min(1e-12)
    q_norm = torch.linalg.vector_norm(q, dim=-1, dtype=ct).clamp_min(1e-12)  # (B, H, S_q)
    # sum_t cos(q_t, qbar) = sum_t (q_t / |q_t|) . qbar_n: per block, a (1 x m) @ (m x D) product.
    full = S_q // block_m
    sims = []
    if full:
        qb = q[:, :, : full * block_m].unflatten(2, (full, block_m))  # (B, H, full, m, D)
        dots = torch.matmul(qb, qbar_n[:, :, :full, :, None].to(q.dtype)).squeeze(-1).to(ct)
        sims.append((dots / q_norm[:, :, : full * block_m].unflatten(2, (full, block_m))).sum(-1))
    if full * block_m != S_q:
        qt = q[:, :, full * block_m :]
        dots = torch.matmul(qt, qbar_n[:, :, full:, :].transpose(-1, -2).to(q.dtype)).squeeze(-1).to(ct)
        sims.append((dots / q_norm[:, :, full * block_m :]).sum(-1, keepdim=True))
    sim = (sims[0] if len(sims) == 1 else torch.cat(sims, dim=-1)) / _block_counts(S_q, block_m, q.device).to(ct)
    return (qbar * scale).to(out_dtype), sim < gamma


def _pooled_parts(q, k, *, gamma, block_m, block_n, scale, key_padding, keep_lowp: bool = False, pool_kernel: bool = False):
    """The pooled predictor's inputs to the selection: (logits (B, H, n_qb, n_kb) in the compute
    dtype, NOT masked; dissimilar bool (B, H, n_qb); valid_kb bool (B, n_kb) or None = all valid).
    ``keep_lowp``: leave half-precision logits (half keys, block_n == 1) in their dtype (the same
    values: the float32 copy is exact). ``pool_kernel``: pool the queries with the Triton kernel."""
    B, H, S_q, D = q.shape
    H_kv, S_kv = k.shape[1], k.shape[2]
    rep = H // H_kv
    n_qb, n_kb = _cdiv(S_q, block_m), _cdiv(S_kv, block_n)
    ct = _compute_dtype(q)

    # Pooled keys (real keys only) and the key blocks that hold a real key.
    if key_padding is not None:
        real = key_padding.to(ct)  # (B, S_kv)
        if block_n == 1:
            kbar = k
            valid_kb = key_padding  # (B, n_kb)
        else:
            ksum = _pool_rows(k * real[:, None, :, None].to(k.dtype), block_n, ct)
            cnt = _pool_rows(real[:, None, :, None], block_n, ct)[:, :, :, 0]  # (B, 1, n_kb)
            kbar = ksum / cnt.clamp_min(1)[..., None]
            valid_kb = cnt[:, 0] > 0
    else:
        valid_kb = None
        kbar = k if block_n == 1 else _pool_rows(k, block_n, ct) / _block_counts(S_kv, block_n, k.device).to(ct)[:, None]

    # Pooled queries (times the scale: the small side of the product) and their self-similarity;
    # the product runs in the keys' dtype (half-precision keys at block_n == 1: no copy of k).
    qg, dissimilar = _pooled_queries(q, gamma=gamma, block_m=block_m, scale=scale, ct=ct, out_dtype=kbar.dtype, kernel=pool_kernel)
    # Pooled scores (B, H_kv, rep * n_qb, n_kb) -> (B, H, n_qb, n_kb).
    logits = torch.matmul(qg.reshape(B, H_kv, rep * n_qb, D), kbar.transpose(-1, -2))
    if logits.dtype != ct and not keep_lowp:
        logits = logits.to(ct)
    return logits.view(B, H, n_qb, n_kb), dissimilar, valid_kb


def pooled_bits(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    tau: float = 0.9,
    gamma: float = 0.5,
    block_m: int = 128,
    block_n: int = 1,
    scale: Optional[float] = None,
    key_padding: Optional[torch.Tensor] = None,
    density: Optional[float] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``pack_bits(pooled_slices(...))`` (same arguments): the pooled predictor's keep mask as an
    int32 bitmap (B, H, n_qb, ceil(n_kb / 32)), bit j % 32 of word j // 32.

    With ``impl="auto"`` on CUDA (or ``impl="triton"``, also on the CPU under TRITON_INTERPRET=1)
    and no ``density`` budget, the top-CDF selection, the gamma fallback and the packing run in one
    Triton kernel (``fgcompile.kernels.triton_pooled``) on the pooled logits, which stay in the
    product's dtype (bf16 for bf16 keys at block_n == 1: half the bytes): the kept set satisfies
    the same guarantee as ``top_cdf`` (the exact top-CDF set plus, at most, entries within the
    bisection's precision of the threshold). Otherwise (``impl="torch"``, float64 inputs, a
    density budget) the torch definition. No host sync.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl: expected 'auto', 'triton' or 'torch', got {impl!r}")
    use_kernel = (
        density is None
        and impl != "torch"
        and isinstance(q, torch.Tensor)
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and (q.is_cuda or (impl == "triton" and q.device.type == "cpu"))
    )
    if not use_kernel:
        from .kernels.packing import pack_bits

        keep = pooled_slices(
            q, k, tau=tau, gamma=gamma, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding, density=density
        )
        return pack_bits(keep)
    _check_tau_gamma(tau, gamma)
    scale = _check_qk(q, k, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding, density=density)
    from .kernels.triton_pooled import pooled_select_bits_triton

    logits, dissimilar, valid_kb = _pooled_parts(
        q, k, gamma=gamma, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding, keep_lowp=True,
        pool_kernel=block_m & (block_m - 1) == 0 and block_m * max(16, q.shape[-1]) <= 128 * 256,
    )
    return pooled_select_bits_triton(logits, valid_kb, dissimilar, float(tau), CDF_STEPS, arity=CDF_ARITY)


# ----------------------------------------------------------------------------- density budget
def density_budget(n_kb: int, density: Optional[float]) -> int:
    """Key blocks a query block keeps at most under the ``density`` budget (``apply_density``):
    ``min(n_kb, max(1, ceil(density * n_kb)))``; ``n_kb`` when density is None. A bound on every
    row of a budgeted mask, known without looking at the mask (the packing's index capacity)."""
    if density is None:
        return int(n_kb)
    return min(int(n_kb), max(1, math.ceil(density * n_kb - 1e-9)))


def apply_density(keep: torch.Tensor, scores: torch.Tensor, density: Optional[float]) -> torch.Tensor:
    """Keep at most ``ceil(density * n_kb)`` of the kept tiles of every query block, the ones with
    the largest ``scores``.

    keep: bool (B, H, n_qb, n_kb); scores: float, same shape (any monotone strength: block-max
    probabilities, logits); density: None (returns keep unchanged) or a number in (0, 1]. Returns a
    bool tensor of keep's shape, a subset of keep. Ties are broken by ``torch.topk``.
    """
    _check_density(density)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 4:
        raise ValueError(f"keep: expected a bool tensor of shape (B, H, n_qb, n_kb), got {_describe(keep)}")
    if not isinstance(scores, torch.Tensor) or scores.shape != keep.shape or not scores.is_floating_point():
        raise ValueError(
            f"scores: expected a floating-point tensor of keep's shape {tuple(keep.shape)}, got {_describe(scores)}"
        )
    if density is None:
        return keep
    n_kb = keep.shape[-1]
    budget = density_budget(n_kb, density)
    if budget >= n_kb:
        return keep
    masked = scores.masked_fill(~keep, float("-inf"))
    idx = masked.topk(budget, dim=-1, sorted=False).indices
    chosen = torch.zeros_like(keep).scatter_(-1, idx, True)
    return keep & chosen
