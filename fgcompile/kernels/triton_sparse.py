"""The fine-grained sparse attention kernel (FG-Attn's asynchronous-gather load), in Triton.

One program per (query block i, batch b * head h), a 1-D grid with the query block fastest (the
last, partial wave's blocks may be shared by several programs each: see ``SPLITS`` below). It
keeps the block's BLOCK_M queries in registers and walks the key blocks that ``PackedSlices``
lists for (b, h, i):

1. the fully kept tiles (``full_tiles``: aligned runs of FULL_TILE keys, kept whole) as plain
   contiguous blocks, no index needed;
2. the remaining kept keys in tiles of BLOCK_N keys: the tile's slots of the index list are
   loaded, turned into key rows (``idx * block_n + offset``: with block_n = 1 each index is one
   key; with block_n > 1 each index is a run of block_n consecutive keys, a tile then covers
   BLOCK_N // block_n indices), and the K and V rows are gathered with pointer loads inside the
   loop that feeds ``tl.dot``. Triton's software pipeliner turns these into cp.async copies into
   shared memory (num_stages >= 2), and with num_stages >= 3 pipelines the index loads as well, so
   the irregular access is overlapped with the tensor-core work of earlier tiles.

Both loops run the online softmax in base 2 (log2(e) folded into the scale) and accumulate in
fp32. The gathered loop's last tile has slots past the list's count (and, with block_n > 1, keys
past S_kv). With ``PAD_TAIL`` (the default) every tile runs the same unmasked step: those slots
read the row of the list's last kept key j*, and after the loop their weight (r slots times p*,
j*'s probability from the same dot) is taken off the softmax sum and the accumulator; j* is a kept
key, so the running maximum is unchanged and the sum stays >= 1. Without it the last tile runs a
masked copy of the step, which costs ~0.7 s more of Triton compile at a compiled model's first
call. The loop bounds are read from the count tensors inside the kernel: the launcher never
synchronises with the device. A query block with no kept key writes zeros. The compiled graph's
select (where the 0-d flag ``use_dense`` holds, a dense or profiled call, O gets the schedule
step's dense output) is a second, small kernel (``_copy_dense``) launched after this one: in this
kernel's epilogue it cost ~15% of its Triton compile, which a compiled model's first call waits
for (benchmarks/NOTES.md, session 7). ``OFFS_64`` keeps the K/V row offsets in 64 bits; the
launcher clears it when every row offset of a head fits in int32 (5-8% faster on the H100,
benchmarks/NOTES.md, session 4).

Under a density budget every query block keeps the same number of keys, so the grid runs in
equal waves, and its last wave is usually partial (Wan2.1 480p: 3,072 blocks on 132 SMs, the 24th
wave 27% full). With ``SPLITS`` > 1 (``tail_split``; PAD_TAIL without full tiles) the last wave's
blocks are each shared by SPLITS programs over equal shares of their key tiles; each writes its
partial softmax state (unnormalised fp32 accumulator, running max and sum) and ``_combine_parts``
merges them into O. H200: 1.9% less kernel time at density 0.3, none measurable at 0.6
(benchmarks/NOTES.md, session 11). Index lists are int32: int16 lists ran ~8% slower.

Supports any strides of q/k/v/out, GQA (kv head = h // (H // H_kv)), head dims up to 128 (a dim
that is not a power of two, e.g. 96, is padded to the next one with a mask on D), fp16/bf16/fp32
(fp32 dots run as tf32 on the GPU). ``UPCAST`` computes in fp32 whatever the input type: the CPU
interpreter (TRITON_INTERPRET=1) mishandles bf16 dots, so the launcher sets it there.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import torch
import triton
import triton.language as tl

from .gluon_sparse_sm90 import BLOCK_M as SM90_BLOCK_M
from .gluon_sparse_sm90 import NotServed, launch_sparse_kernel_sm90, sm90_supported
from .packing import PackedSlices
from .triton_common import (
    LOG2E, _block_heads, _online_softmax_step, _out_ptrs, _program_heads, _q_tile, _softmax_state, aot_signature, head_dim_pad,
    interpreting, launch,
)

log = logging.getLogger("fgcompile")


@triton.jit
def _load_index_tile(i_base, start, offs_n, n_keys, KEY_BLOCK: tl.constexpr):
    vpos = start + offs_n
    if KEY_BLOCK == 1:
        return tl.load(i_base + vpos, mask=vpos < n_keys, other=0)
    else:
        return tl.load(i_base + vpos // KEY_BLOCK, mask=vpos < n_keys, other=0)


@triton.jit
def _key_rows(kpos, OFFS_64: tl.constexpr):
    """Key row numbers as the offset type of the K/V addresses: int64 unless every row offset of
    the head fits in int32 (``OFFS_64`` False: 32-bit address arithmetic, fewer registers)."""
    if OFFS_64:
        return kpos.to(tl.int64)
    else:
        return kpos


@triton.jit
def _load_kv(k_base, v_base, kpos, offs_d, d_ok, stride_ks, stride_kd, stride_vs, stride_vd,
             HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, UPCAST: tl.constexpr):
    if HEAD_DIM == HEAD_DIM_PAD:
        k = tl.load(k_base + kpos[:, None] * stride_ks + offs_d[None, :] * stride_kd)
        v = tl.load(v_base + kpos[:, None] * stride_vs + offs_d[None, :] * stride_vd)
    else:
        k = tl.load(k_base + kpos[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + kpos[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _fg_sparse_fwd(
    Q, K, V, O,
    COUNTS, IDX, FCOUNTS, FIDX,
    PART_ACC, PART_ML,
    qk_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_cb, stride_ch, stride_cq,
    stride_ib, stride_ih, stride_iq,
    stride_fcb, stride_fch, stride_fcq,
    stride_fb, stride_fh, stride_fq,
    H, GROUP, S_Q, S_KV, S_KV_BUCKET, N_FULL, NQB,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FULL_N: tl.constexpr,
    KEY_BLOCK: tl.constexpr,
    FULL_TILE: tl.constexpr,
    UPCAST: tl.constexpr,
    OFFS_64: tl.constexpr = True,
    PAD_TAIL: tl.constexpr = True,
    SPLITS: tl.constexpr = 1,
):
    # Program -> (query block, b * H + h): programs 0 .. N_FULL - 1 take blocks 0 .. N_FULL - 1
    # whole (query block fastest); with SPLITS > 1 (``tail_split``) the remaining blocks, the
    # last wave's, are each taken by SPLITS programs over equal shares of its key tiles, whose
    # partial softmax states (PART_ACC, PART_ML) ``_combine_parts`` merges.
    pid = tl.program_id(0)
    if SPLITS > 1:
        split = pid >= N_FULL
        sp = tl.maximum(pid - N_FULL, 0)
        blk = tl.where(split, N_FULL + sp // SPLITS, pid)
        part = tl.where(split, sp % SPLITS, 0)
        n_parts = tl.where(split, SPLITS, 1)
    else:
        blk = pid
    qb, bh, b64, h64, hk64 = _block_heads(blk, NQB, H, GROUP)
    q, offs_m, offs_d, m_ok, d_ok = _q_tile(Q, b64, h64, qb, stride_qb, stride_qh, stride_qs, stride_qd, S_Q,
                                            BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, UPCAST)
    offs_n = tl.arange(0, BLOCK_N)

    k_base = K + b64 * stride_kb + hk64 * stride_kh
    v_base = V + b64 * stride_vb + hk64 * stride_vh

    m_i, l_i, acc = _softmax_state(BLOCK_M, HEAD_DIM_PAD)

    # ---- 1. fully kept tiles: contiguous keys, no per-key index, no key mask. Each tile of
    # FULL_TILE keys is walked in sub-tiles of FN = min(FULL_N, FULL_TILE) keys; the tile number
    # is loaded one iteration ahead (loop-carried), so the K/V copies pipeline like a dense loop.
    if FULL_TILE > 0:
        FN: tl.constexpr = FULL_N if FULL_N < FULL_TILE else FULL_TILE
        R: tl.constexpr = FULL_TILE // FN
        offs_f = tl.arange(0, FN)
        n_full = tl.load(FCOUNTS + b64 * stride_fcb + h64 * stride_fch + qb * stride_fcq)
        n_full_it = n_full * R
        f_base = FIDX + b64 * stride_fb + h64 * stride_fh + qb * stride_fq
        t_next = tl.load(f_base)
        for it in range(0, n_full_it):
            t = t_next
            t_next = tl.load(f_base + (it + 1) // R, mask=it + 1 < n_full_it, other=0)
            kpos = _key_rows(t * FULL_TILE + (it % R) * FN + offs_f, OFFS_64)
            k, v = _load_kv(k_base, v_base, kpos, offs_d, d_ok, stride_ks, stride_kd, stride_vs, stride_vd, HEAD_DIM, HEAD_DIM_PAD, UPCAST)
            acc, m_i, l_i = _online_softmax_step(q, k, v, acc, m_i, l_i, offs_f >= 0, qk_scale, False)

    # ---- 2. the other kept keys: gathered by index, BLOCK_N keys per tile
    count = tl.load(COUNTS + b64 * stride_cb + h64 * stride_ch + qb * stride_cq)
    n_keys = count * KEY_BLOCK  # length of the virtual list of kept keys
    i_base = IDX + b64 * stride_ib + h64 * stride_ih + qb * stride_iq
    # The index tile is loaded one iteration ahead into registers (a loop-carried value): the
    # K/V addresses then do not depend on a load of the same iteration, which lets the pipeliner
    # keep num_stages - 1 tiles of K/V copies in flight (with the index load inside the same
    # iteration it waits for every copy at each step).
    # Every tile but the last is full and in range (indices < nKB; only the last key block can
    # run past S_kv, and it sorts last): those run unmasked; the last tile is padded (PAD_TAIL)
    # or masked.
    n_tiles = tl.cdiv(n_keys, BLOCK_N)
    t0 = 0
    t1 = n_tiles
    if SPLITS > 1:  # this program's share of the tiles (PAD_TAIL, no full tiles: see the launch)
        t0 = part * n_tiles // n_parts
        t1 = (part + 1) * n_tiles // n_parts
    if PAD_TAIL:
        # One loop, every tile unmasked: the slots of the last tile past the list, and with
        # KEY_BLOCK > 1 the positions of the last key block past S_KV, read the row of the last
        # kept key (j_star); their weight is taken off the softmax sums after the loop.
        last = tl.load(i_base + tl.maximum(count - 1, 0), mask=count > 0, other=0)
        if KEY_BLOCK == 1:
            j_star = last
            n_valid = n_keys
        else:
            j_star = tl.minimum(last * KEY_BLOCK + KEY_BLOCK - 1, S_KV - 1)
            n_valid = n_keys - tl.maximum((last + 1) * KEY_BLOCK - S_KV, 0)
        j_next = _load_index_tile(i_base, t0 * BLOCK_N, offs_n, n_keys, KEY_BLOCK)
        for it in range(t0, t1):
            start = it * BLOCK_N
            j = j_next
            j_next = _load_index_tile(i_base, start + BLOCK_N, offs_n, n_keys, KEY_BLOCK)
            vpos = start + offs_n
            if KEY_BLOCK == 1:
                kpos = j
            else:
                kpos = j * KEY_BLOCK + vpos % KEY_BLOCK
            kpos = _key_rows(tl.where((vpos < n_keys) & (kpos < S_KV), kpos, j_star), OFFS_64)
            k, v = _load_kv(k_base, v_base, kpos, offs_d, d_ok, stride_ks, stride_kd, stride_vs, stride_vd, HEAD_DIM, HEAD_DIM_PAD, UPCAST)
            acc, m_i, l_i = _online_softmax_step(q, k, v, acc, m_i, l_i, offs_n >= 0, qk_scale, False)
        # padded slots (none without kept keys; all in the last tile, i.e. the last share's)
        r = tl.where((t1 == n_tiles) & (t1 > t0), n_tiles * BLOCK_N - n_valid, 0)
        if r > 0:
            # the padded slots' scores, by the same dot as in the loop (16 copies of j_star's row)
            spos = _key_rows(j_star + tl.zeros([16], tl.int32), OFFS_64)
            ks, vs = _load_kv(k_base, v_base, spos, offs_d, d_ok, stride_ks, stride_kd, stride_vs, stride_vd, HEAD_DIM, HEAD_DIM_PAD, UPCAST)
            s_star = tl.max(tl.dot(q, tl.trans(ks)), 1)
            p_star = tl.math.exp2(s_star * qk_scale - m_i)
            l_i = l_i - r.to(tl.float32) * p_star
            w = r.to(tl.float32) * p_star.to(vs.dtype).to(tl.float32)
            acc = acc - w[:, None] * tl.max(vs.to(tl.float32), 0)[None, :]
    else:
        n_main = tl.maximum(n_tiles - 1, 0)
        j_next = _load_index_tile(i_base, 0, offs_n, n_keys, KEY_BLOCK)
        for it in range(0, n_main):
            start = it * BLOCK_N
            j = j_next
            j_next = _load_index_tile(i_base, start + BLOCK_N, offs_n, n_keys, KEY_BLOCK)
            if KEY_BLOCK == 1:
                kpos = _key_rows(j, OFFS_64)
            else:
                kpos = _key_rows(j * KEY_BLOCK + (start + offs_n) % KEY_BLOCK, OFFS_64)
            k, v = _load_kv(k_base, v_base, kpos, offs_d, d_ok, stride_ks, stride_kd, stride_vs, stride_vd, HEAD_DIM, HEAD_DIM_PAD, UPCAST)
            acc, m_i, l_i = _online_softmax_step(q, k, v, acc, m_i, l_i, offs_n >= 0, qk_scale, False)
        if n_tiles > 0:
            start = n_main * BLOCK_N
            vpos = start + offs_n
            in_list = vpos < n_keys
            if KEY_BLOCK == 1:
                kpos = j_next
            else:
                kpos = j_next * KEY_BLOCK + vpos % KEY_BLOCK
            valid = in_list & (kpos < S_KV)
            # out-of-range slots read a real row (clamped) and are masked in the scores
            kpos = _key_rows(tl.minimum(kpos, S_KV - 1), OFFS_64)
            k, v = _load_kv(k_base, v_base, kpos, offs_d, d_ok, stride_ks, stride_kd, stride_vs, stride_vd, HEAD_DIM, HEAD_DIM_PAD, UPCAST)
            acc, m_i, l_i = _online_softmax_step(q, k, v, acc, m_i, l_i, valid, qk_scale, True)

    if SPLITS > 1:
        if split:  # the partial state (unnormalised acc, running max and sum) for _combine_parts
            rows = sp.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            tl.store(PART_ACC + rows[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc)
            tl.store(PART_ML + rows * 2, m_i)
            tl.store(PART_ML + rows * 2 + 1, l_i)
            return
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows with nothing kept: acc == 0 -> zeros
    o_ptrs = _out_ptrs(O, b64, h64, offs_m, offs_d, stride_ob, stride_oh, stride_os, stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_parts(
    PART_ACC, PART_ML, O,
    stride_ob, stride_oh, stride_os, stride_od,
    H, S_Q, N_FULL, NQB,
    SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
):
    """O rows of the split blocks (``_fg_sparse_fwd`` with SPLITS > 1): ROWS rows of block
    N_FULL + program_id(0), from its SPLITS partial states (base-2 running max m, sum l,
    unnormalised acc, fp32): m = max m_p, O = sum 2^(m_p - m) acc_p / sum 2^(m_p - m) l_p (zeros
    where nothing was kept). Grid: (number of split blocks, BLOCK_M // ROWS). Loops, not unrolled
    over the shares: its Triton compile is on a compiled model's first call."""
    s = tl.program_id(0)
    qb, bh, b64, h64, hk64 = _block_heads(N_FULL + s, NQB, H, 1)
    offs_r = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    base = s.to(tl.int64) * SPLITS * BLOCK_M + offs_r
    m = tl.full([ROWS], float("-inf"), tl.float32)
    for p in range(SPLITS):
        m = tl.maximum(m, tl.load(PART_ML + (base + p * BLOCK_M) * 2))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_PAD], tl.float32)
    for p in range(SPLITS):
        rows = base + p * BLOCK_M
        w = tl.math.exp2(tl.load(PART_ML + rows * 2) - m_safe)  # 0 for a share with nothing kept
        l += w * tl.load(PART_ML + rows * 2 + 1)
        acc += w[:, None] * tl.load(PART_ACC + rows[:, None] * HEAD_DIM_PAD + offs_d[None, :])
    l_safe = tl.where(l > 0.0, l, 1.0)
    offs_m = qb * BLOCK_M + offs_r
    ok = (offs_m < S_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(_out_ptrs(O, b64, h64, offs_m, offs_d, stride_ob, stride_oh, stride_os, stride_od),
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=ok)


@triton.jit
def _copy_dense(
    USE_DENSE, DENSE, O,
    stride_db, stride_dh, stride_ds, stride_dd,
    stride_ob, stride_oh, stride_os, stride_od,
    H, S_Q,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Where the 0-d flag ``USE_DENSE`` holds (a dense or profiled call, whose output the schedule
    step computed), copy the rows of ``DENSE`` over O (both (B, H, S_q, D), any strides); else
    nothing (DENSE is then never read). Grid: (cdiv(S_q, BLOCK_M), B * H)."""
    if tl.load(USE_DENSE) != 0:
        qb, bh, b64, h64, hk64 = _program_heads(H, 1)
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        ok = (offs_m < S_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
        x = tl.load(_out_ptrs(DENSE, b64, h64, offs_m, offs_d, stride_db, stride_dh, stride_ds, stride_dd), mask=ok)
        tl.store(_out_ptrs(O, b64, h64, offs_m, offs_d, stride_ob, stride_oh, stride_os, stride_od),
                 x.to(O.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- autotuning

#: (BLOCK_N, num_warps, num_stages, FULL_N) tried by the autotuner on a GPU (before pruning).
#: BLOCK_N: keys per gathered tile; FULL_N: keys per sub-tile of the fully kept tiles (8-warp
#: configs walk them 128 keys at a time, which measured 14.5 ms vs 19.4 ms gathered, dense S=32,760).
TUNE_SPACE = [
    (64, 4, 3, 64), (64, 4, 4, 64), (64, 8, 3, 128), (64, 8, 4, 64),
    (128, 8, 2, 128), (128, 8, 3, 128),
    (32, 4, 3, 32), (32, 4, 4, 32),
]

_SMEM_LIMIT = 227 * 1024  # H100/H200 per-block shared memory


def _smem_estimate(cfg: triton.Config, nargs: dict) -> int:
    """Shared memory a config needs, roughly (bytes)."""
    d_pad = nargs["HEAD_DIM_PAD"]
    bm = nargs["BLOCK_M"]
    esize = 2 if nargs["UPCAST"] is False and nargs["Q"].element_size() == 2 else 4
    bn = cfg.kwargs["BLOCK_N"]
    ft = max(bn, cfg.kwargs.get("FULL_N", bn)) if nargs["FULL_TILE"] > 0 else bn
    stages = max(cfg.num_stages, 2)
    # Q tile + pipelined K and V buffers of the larger of the two loops (their lifetimes do not overlap)
    return bm * d_pad * esize + stages * 2 * ft * d_pad * esize


def _fits(c: triton.Config, nargs: dict) -> bool:
    """The pruning predicate: shared memory, warps for the block, tiles that split key blocks."""
    bm = nargs["BLOCK_M"]
    key_block = nargs["KEY_BLOCK"]
    bn = c.kwargs["BLOCK_N"]
    if key_block > 1 and key_block <= 128 and bn % key_block != 0 and key_block % bn != 0:
        return False  # tiles that split key blocks unevenly
    if bm <= 64 and c.num_warps > 4:
        return False  # 8 warps on a 64-row block leaves warps without wgmma rows
    if bm * max(bn, c.kwargs.get("FULL_N", bn)) >= 128 * 128 and c.num_warps < 8:
        return False  # 128 x 128 scores in 4 warps spill
    if bm >= 128 and nargs["HEAD_DIM_PAD"] >= 128 and c.num_warps < 8:
        # 128-row blocks of 128-dim heads: every autotuner pick recorded on the H100
        # (results/kernel_h100.json, lowering_h100.json: S buckets 8,192 to 131,072, with and
        # without full tiles) was BLOCK_N 128, 8 warps, 3 stages; each 4-warp config costs ~2 s of
        # compile at the first call (benchmarks/NOTES.md, compile time). Four configs remain.
        return False
    return _smem_estimate(c, nargs) <= _SMEM_LIMIT


def _prune(configs, nargs, **kwargs):
    nargs = {**nargs, **kwargs}
    out = [c for c in configs if _fits(c, nargs)]
    return out or [configs[-1]]


def _bench_quick(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


_fg_sparse_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "FULL_N": fn}, num_warps=w, num_stages=s) for (bn, w, s, fn) in TUNE_SPACE],
    key=["HEAD_DIM_PAD", "KEY_BLOCK", "BLOCK_M", "FULL_TILE", "S_KV_BUCKET", "UPCAST"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_bench_quick,
)(_fg_sparse_fwd)

#: the configs used without autotuning, best first; the first that fits (``_fits``) is used. The
#: first is every autotuner pick recorded on the H100 for 128-row blocks (results/kernel_h100.json,
#: lowering_h100.json); the others serve blocks and head dims it does not fit.
HEURISTIC_CONFIGS = [
    {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "FULL_N": 128},
    {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "FULL_N": 128},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "FULL_N": 64},
    {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "FULL_N": 32},
]
INTERPRET_CONFIG = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def _triton_config(c: dict) -> triton.Config:
    """A launch config dict ({"BLOCK_N", "num_warps", "num_stages", "FULL_N"}) as a ``triton.Config``
    (what the prune predicate and the shared-memory estimate take)."""
    return triton.Config({"BLOCK_N": c["BLOCK_N"], "FULL_N": c.get("FULL_N", c["BLOCK_N"])},
                         num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 3))


def heuristic_config(q: torch.Tensor, meta: dict) -> dict:
    """The config a launch without autotuning uses: the first of ``HEURISTIC_CONFIGS`` that the
    prune predicate keeps for these constexprs (``meta``) and q's dtype."""
    nargs = dict(meta, Q=q)
    for c in HEURISTIC_CONFIGS:
        if _fits(_triton_config(c), nargs):
            return c
    return HEURISTIC_CONFIGS[-1]


def autotune_wanted(requested: Optional[bool] = None) -> bool:
    """Whether the sparse kernel autotunes: ``FGCOMPILE_AUTOTUNE=1`` always, ``=0`` never;
    otherwise ``requested`` (the backend requests it in ``mode="max-autotune"`` compiles, as
    Inductor autotunes its own templates only there; direct calls request nothing). Autotuning
    compiles every config the prune predicate keeps (~2 s each) and times them at the first call
    of each key; the heuristic config compiles once."""
    env = os.environ.get("FGCOMPILE_AUTOTUNE", "")
    if env in ("0", "1"):
        return env == "1"
    return bool(requested)


def pad_tail_wanted() -> bool:
    """Whether the gather loop pads its last tile (``PAD_TAIL``, the default) instead of running a
    masked copy of the softmax step after the loop (``FGCOMPILE_PAD_TAIL=0``). Padding compiles
    ~0.7 s faster at a compiled model's first call and runs at the same speed (H200, Wan 480p:
    8.34 vs 8.26 ms at density 0.6, 4.25 vs 4.29 ms at 0.3; benchmarks/NOTES.md, session 8)."""
    return os.environ.get("FGCOMPILE_PAD_TAIL", "1") != "0"


def _seq_bucket(s: int) -> int:
    """Sequence lengths bucketed to the next power of two (the autotuning key)."""
    return 1 << max(0, int(s - 1).bit_length())


#: most programs one split block's key tiles are shared among (``tail_split``)
MAX_SPLITS = 8


def tail_split(n_blocks, slots: int) -> tuple:
    """(blocks taken whole, programs per remaining block) of a launch of ``n_blocks`` equal query
    blocks on ``slots`` concurrent programs (multiprocessors x programs per multiprocessor).

    Every block of a density-budget mask has the same kept count, so the grid runs in waves of
    ``slots`` programs and its last, partial wave leaves ``slots - rem`` of them idle for a whole
    block's time (Wan2.1 480p: 3,072 blocks on 132 SMs, the 24th wave 27% full: ~3% of the
    kernel). The last ``rem`` blocks are instead each shared by ``s = slots // rem`` programs (at
    most ``MAX_SPLITS``; at least 2, else no split) over equal shares of its key tiles, so the tail
    takes ~1/s of a block's time. Nothing is split when the blocks fill whole waves, when they fit
    in one wave, or when ``n_blocks`` is symbolic."""
    if not isinstance(n_blocks, int) or slots <= 0 or n_blocks <= slots:
        return n_blocks, 1
    rem = n_blocks % slots
    s = min(MAX_SPLITS, slots // rem) if rem else 1
    if s < 2:
        return n_blocks, 1
    return n_blocks - rem, s


def _schedule_slots(q: torch.Tensor, meta: dict, config: dict) -> int:
    """Programs of this config that run at once on q's GPU: ``config["SLOTS"]`` if given (tests,
    probes), else multiprocessors x programs per multiprocessor (by shared memory, and one for
    8-warp configs, whose ~200 registers per thread fill the register file); 0 off CUDA."""
    if "SLOTS" in config:
        return int(config["SLOTS"])
    if q.device.type != "cuda" or interpreting():
        return 0
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    cfg = _triton_config(config)
    if cfg.num_warps >= 8:
        return sms
    return sms * max(1, (_SMEM_LIMIT + 1024) // (_smem_estimate(cfg, dict(meta, Q=q)) + 1024))


def needs_64bit_offsets(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a key row's offset within its (batch, kv head) can pass int32: the kernel adds
    ``row * stride_s + d * stride_d`` to the head's base pointer. True (64-bit) when a size or
    stride is symbolic (a traced graph must not specialise on it)."""
    limit = 0
    for t in (k, v):
        sizes, strides = t.shape[2:], t.stride()[2:]
        if not all(isinstance(x, int) for x in (*sizes, *strides)):
            return True
        limit = max(limit, sum((n - 1) * abs(st) for n, st in zip(sizes, strides)))
    return limit >= 2**31 - 1


def launch_sparse_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    counts: torch.Tensor,
    indices: torch.Tensor,
    full_counts: torch.Tensor,
    full_tiles: torch.Tensor,
    scale: float,
    block_m: int,
    key_block: int,
    full_tile: int,
    *,
    config: Optional[dict] = None,
    autotune: Optional[bool] = None,
    wrap=None,
    dense_out: Optional[torch.Tensor] = None,
    use_dense: Optional[torch.Tensor] = None,
    sm90: Optional[bool] = None,
    sm90_launch=None,
) -> torch.Tensor:
    """THE launch of the sparse kernel, shared by the direct call (:func:`sparse_attention_triton`)
    and the ``fgcompile::sparse_attention`` triton_op (``fgcompile.lowering.ops``), which passes
    ``wrap=torch.library.wrap_triton`` so that Inductor traces the launch into its program.
    Writes ``out`` (B, H, S_q, D), any strides, and returns it. Sizes may be SymInts when traced.
    No host sync. ``dense_out`` (B, H, S_q, D) and ``use_dense`` (a 0-d bool tensor), together or
    not at all: where ``use_dense`` holds, ``out`` gets ``dense_out`` (copied by ``_copy_dense``
    after the sparse kernel, whatever the lists hold), else the sparse result (``dense_out`` is
    not read).
    ``config``: {"BLOCK_N", "num_warps", "num_stages", "FULL_N"} (and optionally "maxnreg", a
    register cap per thread, and "OFFS_64", else
    :func:`needs_64bit_offsets`); None: the autotuner if
    ``autotune`` (None: ``autotune_wanted()``, the environment), else ``heuristic_config``.
    ``sm90`` None: a launch :func:`sm90_serves` accepts (no ``config`` or autotuning, a Hopper GPU,
    128-row blocks, single keys, no full tiles; ``FGCOMPILE_SM90_KERNEL=0`` turns it off) runs the
    warp-specialised Gluon sm_90 kernel instead; True / False: the caller chose (the lowered op: its
    lowering pass asked ``sm90_serves``), True still only where ``sm90_supported``. The Gluon launch
    goes through ``sm90_launch(q, k, v, out, counts, indices, scale)`` if given (the lowering's
    opaque op: Inductor does not trace a Gluon launch), else directly."""
    B, H, S_q, D = q.shape
    H_kv, S_kv = k.shape[1], k.shape[2]
    upcast = interpreting() and q.dtype != torch.float32
    n_qb = triton.cdiv(S_q, block_m)
    c, ix, fc, fx = counts, indices, full_counts, full_tiles
    has_dense = dense_out is not None
    if has_dense != (use_dense is not None):
        raise ValueError("dense_out and use_dense: expected both or neither")
    # S_KV_BUCKET is only the triton.autotune key (unused by the kernel body); a symbolic S_kv is
    # passed as is (bucketing it would specialise the traced graph on its value).
    bucket = _seq_bucket(S_kv) if isinstance(S_kv, int) else S_kv
    meta = dict(
        HEAD_DIM=D,
        HEAD_DIM_PAD=head_dim_pad(D),
        BLOCK_M=block_m,
        KEY_BLOCK=key_block,
        FULL_TILE=full_tile,
        UPCAST=upcast,
        OFFS_64=needs_64bit_offsets(k, v) if config is None or "OFFS_64" not in config else bool(config["OFFS_64"]),
        PAD_TAIL=pad_tail_wanted() if config is None or "PAD_TAIL" not in config else bool(config["PAD_TAIL"]),
    )
    if wrap is None:  # a direct launch (a background precompile may collect it: triton_common.launch)
        go = launch
    else:  # traced into Inductor's graph
        def go(kernel, grid, *a, **kw):
            wrap(kernel)[grid](*a, **kw)
    if sm90 is None:
        sm90 = sm90_serves(q, k, v, out, block_m, key_block, full_tile, config=config, autotune=autotune)
    elif sm90:  # the caller's choice, still only where the kernel can take the launch (symbolic
        # sizes while Inductor traces the op: launch_sm90 decides on the real tensors)
        sm90 = sm90_supported(q, k, v, out, block_m, key_block, full_tile, symbolic=True)
    if sm90:
        (sm90_launch or launch_sm90)(q, k, v, out, c, ix, scale)
        if has_dense:
            _launch_copy_dense(go, use_dense, dense_out, out)
        return out
    if config is None and interpreting():
        config = INTERPRET_CONFIG
    elif config is None and not (autotune_wanted() if autotune is None else autotune):
        config = heuristic_config(q, meta)
    n_blocks = n_qb * B * H
    n_full, splits = n_blocks, 1
    if config is not None and meta["PAD_TAIL"] and full_tile == 0:
        n_full, splits = tail_split(n_blocks, _schedule_slots(q, meta, config))
    n_split = n_blocks - n_full
    # partial softmax states of the split blocks' shares (fp32; a stand-in when nothing is split)
    part_acc = q.new_empty((max(n_split * splits * block_m, 1), head_dim_pad(D)), dtype=torch.float32)
    part_ml = q.new_empty((max(n_split * splits * block_m, 1), 2), dtype=torch.float32)
    grid = (n_full + n_split * splits,)
    args = (
        q, k, v, out, c, ix, fc, fx, part_acc, part_ml,
        float(scale) * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *c.stride(), *ix.stride()[:3], *fc.stride(), *fx.stride()[:3],
        H, H // H_kv, S_q, S_kv, bucket, n_full, n_qb,
    )
    if config is None:
        go(_fg_sparse_fwd_tuned, grid, *args, **meta, SPLITS=1)  # every constexpr passed (Inductor needs them)
    else:
        go(
            _fg_sparse_fwd, grid,
            *args,
            **meta,
            BLOCK_N=config["BLOCK_N"],
            FULL_N=config.get("FULL_N", config["BLOCK_N"]),
            num_warps=config.get("num_warps", 4),
            num_stages=config.get("num_stages", 3),
            SPLITS=splits,
            **({"maxnreg": config["maxnreg"]} if config.get("maxnreg") else {}),
        )
    if splits > 1:
        rows = min(32, block_m)
        go(
            _combine_parts, (n_split, block_m // rows),
            part_acc, part_ml, out, *out.stride(), H, S_q, n_full, n_qb,
            SPLITS=splits, HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D), BLOCK_M=block_m, ROWS=rows, num_warps=4,
        )
    if has_dense:
        _launch_copy_dense(go, use_dense, dense_out, out)
    return out


def _launch_copy_dense(go, use_dense: torch.Tensor, dense_out: torch.Tensor, out: torch.Tensor) -> None:
    """``_copy_dense`` over ``out`` (B, H, S_q, D) through the launcher ``go``."""
    B, H, S_q, D = out.shape
    copy_m = 64
    go(
        _copy_dense, (triton.cdiv(S_q, copy_m), B * H),
        use_dense, dense_out, out, *dense_out.stride(), *out.stride(), H, S_q,
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D), BLOCK_M=copy_m, num_warps=4,
    )


def sm90_serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, block_m: int, key_block: int,
                full_tile: int, *, config: Optional[dict] = None, autotune: Optional[bool] = None,
                symbolic: bool = False) -> bool:
    """Whether :func:`launch_sparse_kernel` runs this launch on the Gluon sm_90 kernel
    (``gluon_sparse_sm90``, warp-specialised): no ``config`` given, no autotuning, not the
    interpreter, ``sm90_kernel_wanted()`` and ``sm90_supported`` (a Hopper GPU, fp16/bf16, head dim
    64 or 128, static sizes, 128-row blocks, single keys, no full tiles). ``symbolic``: the
    lowering's question on a graph's tensors, whose sizes may be symbolic (``sm90_supported``)."""
    return (
        config is None
        and not interpreting()
        and not (autotune_wanted() if autotune is None else autotune)
        and sm90_kernel_wanted()
        and sm90_supported(q, k, v, out, block_m, key_block, full_tile, symbolic=symbolic)
    )


# (device, dtype, head dim) -> why the Gluon kernel failed there; those launches run the Triton kernel
_SM90_FAILED: dict = {}
_SM90_LOCK = threading.Lock()


def launch_sm90(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, counts: torch.Tensor,
                indices: torch.Tensor, scale: float) -> torch.Tensor:
    """The Gluon sm_90 kernel (``launch_sparse_kernel_sm90``: q (B, H, S_q, D), k/v (B, H_kv, S_kv, D),
    out like q, counts (B, H, nQB) and indices (B, H, nQB, cap) int32 of 128-row blocks of single
    keys, no full tiles), or the Triton kernel on the same lists where the tensors do not fit the
    Gluon kernel (``sm90_supported``: a graph of symbolic sizes chose it at compile time) or its
    launch raises (it fails to build with this triton, too little shared memory): one warning
    per (device, dtype, head dim), after which launches of that kind go straight to the Triton
    kernel. Errors the GPU reports later (asynchronously) are not caught. Returns ``out``. The
    body of the lowered op ``fgcompile::sparse_attention_sm90`` and of direct launches."""
    key = (str(q.device), q.dtype, q.shape[-1])
    if key not in _SM90_FAILED:
        try:
            return launch_sparse_kernel_sm90(q, k, v, out, counts, indices, scale)
        except NotServed:
            # a launch of a graph with symbolic sizes, sent here on what the compile knew: its real
            # tensors do not fit the kernel (e.g. misaligned rows); this launch alone takes the Triton kernel
            pass
        except Exception as e:  # noqa: BLE001 - any failure to build or launch: the Triton kernel serves
            why = f"{type(e).__name__}: {e}"
            with _SM90_LOCK:  # one warning, also when the background precompile's thread fails too
                first = _SM90_FAILED.setdefault(key, why) is why
            if first:
                log.warning("fgcompile: the Gluon sm_90 kernel failed for %s %s head dim %d (%s); "
                            "the Triton kernel runs these launches instead", *key, why)
    no_full = counts.new_zeros(counts.shape)  # full_tile 0: no full tiles, one stand-in column
    return launch_sparse_kernel(q, k, v, out, counts, indices, no_full, no_full.unsqueeze(-1), scale,
                                SM90_BLOCK_M, 1, 0, sm90=False)


def sm90_failures() -> dict:
    """(device, dtype, head dim) -> the error that made :func:`launch_sm90` fall back to the Triton
    kernel there, in this process (a copy)."""
    return dict(_SM90_FAILED)


def sm90_kernel_wanted() -> bool:
    """Whether launches the Gluon sm_90 kernel can serve take it (default); ``FGCOMPILE_SM90_KERNEL=0``
    keeps the Triton kernel (comparisons, and an escape hatch)."""
    return os.environ.get("FGCOMPILE_SM90_KERNEL", "1") != "0"


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packed: PackedSlices,
    scale: float,
    *,
    config: Optional[dict] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the kernel. q (B, H, S_q, D), k/v (B, H_kv, S_kv, D), any strides; ``packed`` from
    ``pack_slices`` for block_m = packed.block_m. Inputs are assumed validated
    (``fgcompile.attention.sparse_attention`` does it). Returns (B, H, S_q, D) in q.dtype.
    ``config``: {"BLOCK_N", "num_warps", "num_stages"}; None: ``heuristic_config``, or the
    autotuner with ``FGCOMPILE_AUTOTUNE=1`` (``autotune_wanted``). No host sync."""
    B, H, S_q, D = q.shape
    if out is None:
        out = torch.empty((B, H, S_q, D), device=q.device, dtype=q.dtype)
    return launch_sparse_kernel(
        q, k, v, out, packed.counts, packed.indices, packed.full_counts, packed.full_tiles,
        scale, packed.block_m, packed.block_n, packed.full_tile, config=config,
    )


def best_config() -> dict:
    """The autotuner's choices so far: {key: str(config)}."""
    return {str(k): str(v) for k, v in getattr(_fg_sparse_fwd_tuned, "cache", {}).items()}


def compile_for_target(
    arch: int = 90,
    *,
    dtype: str = "bf16",
    head_dim: int = 128,
    block_m: int = 128,
    key_block: int = 1,
    full_tile: int = 128,
    block_n: int = 128,
    num_warps: int = 8,
    num_stages: int = 3,
    offs_64: bool = True,
    pad_tail: bool = True,
    splits: int = 1,
):
    """Compile the sparse kernel ahead of time for ``sm_<arch>`` (no GPU needed; not under the
    interpreter) and return Triton's compiled kernel (``.asm`` holds ttgir, ptx, cubin...)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _fg_sparse_fwd
    ptr_args = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "O": f"*{dtype}",
                "COUNTS": "*i32", "IDX": "*i32", "FCOUNTS": "*i32", "FIDX": "*i32",
                "PART_ACC": "*fp32", "PART_ML": "*fp32"}
    consts = {
        "HEAD_DIM": head_dim, "HEAD_DIM_PAD": head_dim_pad(head_dim), "BLOCK_M": block_m, "BLOCK_N": block_n,
        "KEY_BLOCK": key_block, "FULL_TILE": full_tile, "UPCAST": False, "FULL_N": block_n,
        "OFFS_64": offs_64, "PAD_TAIL": pad_tail, "SPLITS": splits,
    }
    # mimic the JIT's specialisation for contiguous (B, H, S, D) tensors
    ones = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_cq", "stride_fcq"}
    sig, consts, attrs = aot_signature(fn.arg_names, ptr_args, consts, ones)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})
