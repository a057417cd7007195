"""What the Triton kernels of ``fgcompile.kernels`` share: host helpers (the interpreter switch,
tile sizes) and the jitted pieces of the two attention kernels (the sparse kernel,
``triton_sparse``, and the profiling kernel, ``triton_profile``): the program's (batch, head)
coordinates, the query tile, the online-softmax step and the output store.

Layouts: q / out (B, H, S_q, D), k / v (B, H_kv, S_kv, D), any strides; a program handles the
BLOCK_M queries of one query block of one (b, h); GQA maps head h to kv head h // GROUP. Scores are
in base 2: ``qk_scale`` is the softmax scale times log2(e) (``LOG2E``), and the softmax uses exp2.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Any, Callable, Iterator

import triton
import triton.language as tl

__all__ = ["LOG2E", "interpreting", "pow2_at_least", "head_dim_pad", "launch", "collect_compiles"]

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pow2_at_least(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1): tile sizes of the helper kernels."""
    return 1 << max(0, int(x) - 1).bit_length()


def head_dim_pad(d: int) -> int:
    """The head dim a kernel tile uses: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (int(d) - 1).bit_length())


_COLLECT = threading.local()  # .thunks: the compile thunks of this thread's launches, or None


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``; inside ``collect_compiles()`` on this thread, no launch:
    a thunk that compiles the binary this launch would need (``JITFunction.warmup``, the same
    specialisation and cache entry) is recorded instead, and the launch's outputs stay unwritten."""
    thunks = getattr(_COLLECT, "thunks", None)
    if thunks is None:
        kernel[grid](*args, **kwargs)
    else:
        thunks.append(functools.partial(kernel.warmup, *args, grid=grid, **kwargs))


@contextlib.contextmanager
def collect_compiles() -> Iterator[list[Callable[[], Any]]]:
    """Within it, this thread's ``launch`` calls record compile thunks instead of launching: the
    yielded list holds them, one per launch, to be run later, e.g. in parallel threads
    (``fgcompile.lowering.warmup``). Kernels launched otherwise run (and compile) as usual."""
    prev = getattr(_COLLECT, "thunks", None)
    _COLLECT.thunks = thunks = []
    try:
        yield thunks
    finally:
        _COLLECT.thunks = prev


@triton.jit
def _heads(qb, bh, H, GROUP):
    """(query block, b * H + h, b, h, kv head), the last three as int64 for the base-pointer
    arithmetic."""
    b = bh // H
    h = bh % H
    hk = h // GROUP
    return qb, bh, b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)


@triton.jit
def _program_heads(H, GROUP):
    """``_heads`` of this program of a grid (n query blocks, B * H)."""
    return _heads(tl.program_id(0), tl.program_id(1), H, GROUP)


@triton.jit
def _block_heads(blk, NQB, H, GROUP):
    """``_heads`` of block ``blk`` of a 1-D grid over (query block fastest, then b * H + h)."""
    return _heads(blk % NQB, blk // NQB, H, GROUP)


@triton.jit
def _q_tile(Q, b64, h64, qb, stride_qb, stride_qh, stride_qs, stride_qd, S_Q,
            BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, UPCAST: tl.constexpr):
    """The query tile (BLOCK_M, HEAD_DIM_PAD) of block ``qb`` (zeros past S_Q and HEAD_DIM; fp32
    with ``UPCAST``) and its offsets and masks: (q, offs_m, offs_d, m_ok, d_ok)."""
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < S_Q
    q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q, offs_m, offs_d, m_ok, d_ok


@triton.jit
def _softmax_state(BLOCK_M: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """The online softmax's start: running max -inf, sum 0, accumulator 0 (fp32)."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    return m_i, l_i, acc


def _exp2_mixed_asm(poly: int, pack: int = 8) -> str:
    """PTX for ``_exp2_mixed``: ``pack`` fp32 exponents in ($pack .. $2pack-1), their powers of two
    out ($0 .. $pack-1); the last ``poly`` of each pack by a degree-3 polynomial on the FMA pipe
    (2**x = 2**round(x) * p(x - round(x)), p a relative minimax fit on [-0.5, 0.5], error < 7.5e-5;
    round(x) by the 1.5 * 2**23 trick, added to the exponent bits; x clamped at -126, where the
    result is below 2**-125), the others by the MUFU (ex2.approx.ftz)."""
    lines = ["{", ".reg .f32 %pt, %pj, %pf, %pr;", ".reg .b32 %pb, %pe;"]
    for e in range(pack):
        x, y = f"${pack + e}", f"${e}"
        if e < pack - poly:
            lines.append(f"ex2.approx.ftz.f32 {y}, {x};")
        else:
            lines += [
                f"max.f32 %pt, {x}, 0fC2FC0000;",  # -126
                "add.rn.f32 %pj, %pt, 0f4B400000;",  # 1.5 * 2**23: round(x) in the low mantissa bits
                "sub.rn.f32 %pf, %pj, 0f4B400000;",
                "sub.rn.f32 %pf, %pt, %pf;",  # x - round(x), in [-0.5, 0.5]
                "fma.rn.f32 %pr, %pf, 0f3D61FBB0, 0f3E786F0E;",
                "fma.rn.f32 %pr, %pr, %pf, 0f3F31798D;",
                "fma.rn.f32 %pr, %pr, %pf, 0f3F7FFB49;",
                "mov.b32 %pe, %pj;",
                "shl.b32 %pe, %pe, 23;",  # round(x) << 23: the exponent increment
                "mov.b32 %pb, %pr;",
                "add.s32 %pb, %pb, %pe;",
                f"mov.b32 {y}, %pb;",
            ]
    lines.append("}")
    return "\n".join(lines)


_EXP2_POLY1 = tl.constexpr(_exp2_mixed_asm(1))
_EXP2_POLY2 = tl.constexpr(_exp2_mixed_asm(2))
_EXP2_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 8))


@triton.jit
def _exp2_mixed(x, POLY: tl.constexpr):
    """2**x (fp32, x <= 0, any shape with a multiple of 8 elements per thread): ``POLY`` of every 8
    of a thread's elements (0, 1 or 2) by a polynomial on the FMA pipe, the rest by the MUFU, whose
    16 results per clock per SM bound the softmax phase of a 128 x 128 tile (FlashAttention-4's
    exp2 emulation). ``POLY`` 0: ``tl.math.exp2`` (also what the interpreter runs)."""
    if POLY == 0:
        return tl.math.exp2(x)
    elif POLY == 1:
        return tl.inline_asm_elementwise(_EXP2_POLY1, _EXP2_CONSTRAINTS, [x], dtype=tl.float32, is_pure=True, pack=8)
    else:
        return tl.inline_asm_elementwise(_EXP2_POLY2, _EXP2_CONSTRAINTS, [x], dtype=tl.float32, is_pure=True, pack=8)


@triton.jit
def _online_softmax_step(q, k, v, acc, m_i, l_i, valid, qk_scale, MASKED: tl.constexpr, POLY: tl.constexpr = 0):
    """One key tile of the online softmax (base 2): scores q k^T * qk_scale, running max ``m_i``
    and sum ``l_i`` (BLOCK_M,), accumulator ``acc`` (BLOCK_M, D) rescaled and updated with p v.
    ``MASKED``: keys where ``valid`` (BLOCK_N,) is False get no weight (rows with no valid key
    so far keep m = -inf and produce no NaN); else every key of the tile counts, and ``POLY``
    (unmasked steps) picks how p's exp2 is split between the MUFU and the FMA pipe
    (``_exp2_mixed``)."""
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = _exp2_mixed(qk * qk_scale - m_new[:, None], POLY)
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _out_ptrs(O, b64, h64, offs_m, offs_d, stride_ob, stride_oh, stride_os, stride_od):
    """Pointers of the output tile (BLOCK_M, HEAD_DIM_PAD) of (b, h) at rows ``offs_m``."""
    return O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :] * stride_od
