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


@triton.jit
def _online_softmax_step(q, k, v, acc, m_i, l_i, valid, qk_scale, MASKED: tl.constexpr):
    """One key tile of the online softmax (base 2): scores q k^T * qk_scale, running max ``m_i``
    and sum ``l_i`` (BLOCK_M,), accumulator ``acc`` (BLOCK_M, D) rescaled and updated with p v.
    ``MASKED``: keys where ``valid`` (BLOCK_N,) is False get no weight (rows with no valid key
    so far keep m = -inf and produce no NaN); else every key of the tile counts."""
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _out_ptrs(O, b64, h64, offs_m, offs_d, stride_ob, stride_oh, stride_os, stride_od):
    """Pointers of the output tile (BLOCK_M, HEAD_DIM_PAD) of (b, h) at rows ``offs_m``."""
    return O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :] * stride_od


def aot_signature(arg_names, ptrs: dict, consts: dict, ones=()) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for compiling a kernel ahead of time (``triton.compile`` of
    an ``ASTSource``, no GPU) as the JIT would specialise it for contiguous (B, H, S, D) tensors:
    ``ptrs`` {name: "*bf16"...} 16-byte aligned, ``consts`` constexprs, ``ones`` unit strides
    (constants), ``qk_scale`` fp32, other arguments i32 (q/k/v/o strides multiples of 16)."""
    consts = dict(consts)
    sig, attrs = {}, {}
    for i, name in enumerate(arg_names):
        if name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in consts:
            sig[name] = "constexpr"
        elif name in ones:
            sig[name] = "constexpr"
            consts[name] = 1
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name[:8] in ("stride_q", "stride_k", "stride_v", "stride_o"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs
