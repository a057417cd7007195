"""The Hopper (sm_90) sparse attention kernel in Gluon: what compiled models run on an H100/H200.

``triton_sparse.launch_sparse_kernel`` sends a launch here where ``triton_sparse.sm90_serves``
accepts it (a Hopper GPU, fp16/bf16, head dim 64 or 128, static sizes, 128-row query blocks,
single-key slices, no full tiles, no autotuning; ``FGCOMPILE_SM90_KERNEL=0`` keeps the Triton
kernel); the lowered graph calls it through the opaque op ``fgcompile::sparse_attention_sm90``.
Checked against float64 by ``benchmarks/sm90_probe.py`` and ``tests/test_kernels_gpu.py``. Wan
480p on the H100 (session 16, ``results/session16/sm90_probe_h100_call2.json``): 6.97 ms at
density 0.6 and 3.60 ms at 0.3 against the Triton kernel's 8.00-8.05 / 4.13-4.21 in the same run
(cuDNN dense 11.36 ms).

Same contract as ``triton_sparse._fg_sparse_fwd`` for the case compiled models use most: one
program per (query block i of BLOCK_M = 128 rows, batch b * head h), the query block fastest, that
walks the kept keys ``PackedSlices`` lists for (b, h, i) (``block_n == 1``, no full tiles) in tiles
of BLOCK_N keys and gathers their K and V rows with ``cp.async`` into 128-byte-swizzled
shared-memory tiles (NVMMASharedLayout), the packed tiles the tensor cores read.

Why Gluon: Triton 3.6/3.7 waits for every ``q k^T`` wgmma right after issuing it, so the softmax
of a tile never overlaps tensor-core work (benchmarks/NOTES.md, sessions 11 and 13), and its
warp specialisation does not apply to this loop. Gluon exposes the asynchronous ``warpgroup_mma``
and its wait counts, mbarriers and warp partitions, so the program is FlashAttention-3's
warp-specialised ping-pong (arXiv 2407.08608, 3.1-3.2), in three partitions of 4 warps:

- a producer warpgroup (``_ws_producer``, 40 registers per thread) that, for each tile t, waits
  until buffer t % STAGES is empty, gathers the tile's K rows and then its V rows into it with
  ``cp.async`` and arrives on its full mbarrier with ``cp.async.mbarrier.arrive.noinc`` (each
  producer thread arrives once its own copies have landed). Slots past the list are zero-filled
  (a false predicate reads nothing);
- two consumer warpgroups (``_ws_consumer``, 232 registers), 64 of the block's 128 query rows
  each, with the intra-warpgroup overlap (algorithm 2):

      for t in 1 .. n_tiles - 1:                # P_{t-1}: the previous tile's weights
          wait K_t full, V_{t-1} full; fence; wait for my turn
          S_t = Q K_t^T              (async)
          O  += P_{t-1} V_{t-1}      (async)
          the other warpgroup's turn
          wait for S_t only; release K_t; softmax(S_t) -> P_t    # overlaps the P V wgmma
          wait for O; release V_{t-1}; O *= 2^(m_old - m_new)

  Each release is one arrival per warpgroup on the buffer's empty mbarrier (count 2). The turns
  (one mbarrier per warpgroup) order the two warpgroups' wgmmas, so one's softmax runs while the
  other's wgmmas do. The last tile's scores past the list are masked to -inf; a query block with
  nothing kept writes zeros.

Layouts: q/k/v/out (B, H, S, D) with any strides whose last is 1 and rows 16-byte aligned;
D in (64, 128); fp16 or bf16; GQA through ``GROUP`` (kv head = h // GROUP); ``COUNTS`` (B, H,
nQB) and ``IDX`` (B, H, nQB, cap) int32, as ``fgcompile.kernels.packing.PackedSlices`` holds
them. Accumulation in fp32, softmax in base 2 with log2(e) folded into ``qk_scale``.
``sm90_supported`` says whether a launch fits these limits. Gluon is Triton's experimental layer:
its import is feature-detected here; the kernel compiles with triton 3.6 and 3.7.

An earlier form without warp specialisation (8 warps issuing their own copies, a CTA barrier per
tile, the intra-warpgroup overlap only) was 9-15% slower than the Triton kernel (sessions 15-16);
it is in git history (commit 9d7df44).
"""

from __future__ import annotations

import torch
import triton

try:  # Gluon (triton.experimental.gluon) is experimental: present in triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait
    HAVE_GLUON = True
except Exception:  # pragma: no cover - older triton
    HAVE_GLUON = False

BLOCK_M = 128
BLOCK_N = 128
STAGES = 3
#: a producer warpgroup and two consumer warpgroups (the default partition is the first); their
#: registers per thread (setmaxnreg) under the kernel's ``maxnreg``: 3 warpgroups x WS_MAXNREG =
#: the default partition's + WS_CONSUMER_REGS + WS_PRODUCER_REGS
WS_PRODUCER_WARPS = 4
WS_CONSUMER_REGS = 232
WS_PRODUCER_REGS = 40
WS_MAXNREG = 168


if HAVE_GLUON:

    @gluon.jit
    def _issue_rows(buf, stage, base, kpos, ok, offs_d, stride_s):
        """cp.async of the rows ``kpos`` of one K or V head (slots where ``ok`` is false are
        zero-filled, nothing read) into ``stage`` of ``buf``; the caller commits the group."""
        rows = (kpos * stride_s)[:, None] + offs_d[None, :]
        async_copy.async_copy_global_to_shared(buf.index(stage), base + rows, mask=ok[:, None] & (offs_d >= 0)[None, :])

    @gluon.jit
    def _tile_slots(i_base, t, n_keys, offs_n):
        """Index tile t of the kept-key list: (key rows, in-list flags); rows past the list are 0."""
        vpos = t * offs_n.shape[0] + offs_n
        ok = vpos < n_keys
        return gl.load(i_base + vpos, mask=ok, other=0), ok

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, qk_scale, valid_cols, last):
        """One tile's online-softmax update in base 2: (p, m_new, l_new, alpha); the columns of the
        ``last`` tile (a runtime flag) outside ``valid_cols`` are masked. Rows whose running max is
        still -inf (nothing kept so far) get p = 0."""
        if last:
            s = gl.where(valid_cols[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * qk_scale - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
        l_new = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_new, alpha

    @gluon.jit
    def _ws_producer(k_smem, v_smem, k_full, v_full, k_empty, v_empty, k_base, v_base, i_base, count,
                     stride_ks, stride_vs,
                     HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr):
        """Gathers tile t's K rows into ``k_smem[t % STAGES]`` and its V rows into ``v_smem[...]``
        once the consumers released that buffer, for every tile of the kept-key list."""
        ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[256 // HEAD_DIM, HEAD_DIM // 8],
                                                   warps_per_cta=[WARPS, 1], order=[1, 0])
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
        n_tiles = gl.maximum(gl.cdiv(count, BLOCK_N), 1)
        for t in range(n_tiles):
            st = t % STAGES
            ph = (t // STAGES) & 1
            kv, ok = _tile_slots(i_base, t, count, offs_n)
            mbarrier.wait(k_empty.index(st), ph ^ 1)
            _issue_rows(k_smem, st, k_base, kv, ok, offs_d, stride_ks)
            async_copy.mbarrier_arrive(k_full.index(st), increment_count=False)
            mbarrier.wait(v_empty.index(st), ph ^ 1)
            _issue_rows(v_smem, st, v_base, kv, ok, offs_d, stride_vs)
            async_copy.mbarrier_arrive(v_full.index(st), increment_count=False)

    @gluon.jit
    def _ws_consumer(q_smem, k_smem, v_smem, k_full, v_full, k_empty, v_empty, turn_mine, turn_other,
                     o_base, stride_os, row0, S_Q, count, qk_scale,
                     HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, FIRST: gl.constexpr):
        """64 query rows (``q_smem``, rows row0 .. row0 + 63 of the output) against every tile; writes
        their normalised output."""
        WG_M: gl.constexpr = 64
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        offs_c = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        n_tiles = gl.maximum(gl.cdiv(count, BLOCK_N), 1)
        # turn event j (j = 0: tile 0's S; j = t: iteration t; j = n_tiles: the last P V): the first
        # warpgroup's wait needs j arrivals of the other's, the second's j + 1 (an mbarrier starts as
        # if its phase 1 had completed): wait on parity (j & 1) ^ F
        F: gl.constexpr = 1 if FIRST else 0

        mbarrier.wait(k_full.index(0), 0)
        fence_async_shared()
        mbarrier.wait(turn_mine, F)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), gl.zeros([WG_M, BLOCK_N], gl.float32, s_layout),
                          use_acc=False, is_async=True)
        mbarrier.arrive(turn_other, count=1)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        mbarrier.arrive(k_empty.index(0), count=1)
        m_i = gl.full([WG_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([WG_M], gl.float32, gl.SliceLayout(1, s_layout))
        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, offs_c < count, n_tiles == 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = gl.zeros([WG_M, HEAD_DIM], gl.float32, o_layout)

        for t in range(1, n_tiles):
            st = t % STAGES
            sv = (t - 1) % STAGES
            mbarrier.wait(k_full.index(st), (t // STAGES) & 1)
            mbarrier.wait(v_full.index(sv), ((t - 1) // STAGES) & 1)
            fence_async_shared()
            mbarrier.wait(turn_mine, (t & 1) ^ F)
            s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)),
                              gl.zeros([WG_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
            acc = warpgroup_mma(p_op, v_smem.index(sv), acc, is_async=True)
            mbarrier.arrive(turn_other, count=1)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))  # S_t; the P V product still runs
            mbarrier.arrive(k_empty.index(st), count=1)
            p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, t * BLOCK_N + offs_c < count, t == n_tiles - 1)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(v_empty.index(sv), count=1)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        sv = (n_tiles - 1) % STAGES
        mbarrier.wait(v_full.index(sv), ((n_tiles - 1) // STAGES) & 1)
        fence_async_shared()
        mbarrier.wait(turn_mine, (n_tiles & 1) ^ F)
        acc = warpgroup_mma(p_op, v_smem.index(sv), acc, is_async=True)
        mbarrier.arrive(turn_other, count=1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(v_empty.index(sv), count=1)

        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        out = acc / gl.where(l_o > 0.0, l_o, 1.0)[:, None]  # nothing kept: acc == 0 -> zeros
        rows = row0 + gl.arange(0, WG_M, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        o_ptrs = o_base + (rows.to(gl.int64) * stride_os)[:, None] + cols[None, :]
        gl.store(o_ptrs, out.to(dtype), mask=(rows < S_Q)[:, None])

    @gluon.jit
    def _fg_sparse_fwd_sm90_ws(
        Q, K, V, O, COUNTS, IDX,
        qk_scale,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os,
        stride_cb, stride_ch, stride_cq,
        stride_ib, stride_ih, stride_iq,
        H, GROUP, S_Q, NQB,
        HEAD_DIM: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        PRODUCER_WARPS: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        gl.static_assert(BLOCK_M == 128, "two consumer warpgroups of 64 rows")
        gl.static_assert(num_warps == 4, "the default partition is the first consumer warpgroup")
        dtype: gl.constexpr = Q.dtype.element_ty
        ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[256 // HEAD_DIM, HEAD_DIM // 8],
                                                   warps_per_cta=[num_warps, 1], order=[1, 0])
        tile_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

        pid = gl.program_id(0)
        qb = pid % NQB
        bh = pid // NQB
        b = (bh // H).to(gl.int64)
        h = (bh % H).to(gl.int64)
        hk = h // GROUP

        offs_m = qb * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
        q_ptrs = Q + b * stride_qb + h * stride_qh + (offs_m.to(gl.int64) * stride_qs)[:, None] + offs_d[None, :]
        q = gl.load(q_ptrs, mask=(offs_m < S_Q)[:, None], other=0.0)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], tile_smem, q)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile_smem)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile_smem)
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_full.index(i), count=PRODUCER_WARPS * 32)  # every producer thread's copies
            mbarrier.init(v_full.index(i), count=PRODUCER_WARPS * 32)
            mbarrier.init(k_empty.index(i), count=2)  # both consumer warpgroups
            mbarrier.init(v_empty.index(i), count=2)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        fence_async_shared()

        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        o_base = O + b * stride_ob + h * stride_oh
        count = gl.load(COUNTS + b * stride_cb + h * stride_ch + qb * stride_cq)
        i_base = IDX + b * stride_ib + h * stride_ih + qb * stride_iq
        row0 = qb * BLOCK_M
        gl.warp_specialize([
            (_ws_consumer, (q_smem.slice(0, 64), k_smem, v_smem, k_full, v_full, k_empty, v_empty,
                            turn.index(0), turn.index(1),
                            o_base, stride_os, row0, S_Q, count, qk_scale, HEAD_DIM, BLOCK_N, STAGES, True)),
            (_ws_consumer, (q_smem.slice(64, 64), k_smem, v_smem, k_full, v_full, k_empty, v_empty,
                            turn.index(1), turn.index(0),
                            o_base, stride_os, row0 + 64, S_Q, count, qk_scale, HEAD_DIM, BLOCK_N, STAGES, False)),
            (_ws_producer, (k_smem, v_smem, k_full, v_full, k_empty, v_empty, k_base, v_base, i_base, count,
                            stride_ks, stride_vs, HEAD_DIM, BLOCK_N, STAGES, PRODUCER_WARPS)),
        ], [4, PRODUCER_WARPS], [CONSUMER_REGS, PRODUCER_REGS])


def sm90_device(device: torch.device) -> bool:
    """Whether the kernel can run on ``device`` at all: Gluon present and a Hopper GPU (compute
    capability 9.0). False without CUDA in this build or process (fake CUDA tensors on a CPU
    machine)."""
    if not HAVE_GLUON or device.type != "cuda":
        return False
    try:
        return torch.cuda.get_device_capability(device) == (9, 0)
    except (AssertionError, RuntimeError):
        return False


def sm90_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   block_m: int, key_block: int, full_tile: int, *, symbolic: bool = False) -> bool:
    """Whether ``launch_sparse_kernel_sm90`` can take this launch: ``sm90_device``, fp16/bf16,
    head dim 64 or 128, static sizes, unit last strides and 16-byte aligned rows, key row offsets
    within int32, 128-row query blocks, single-key slices (block_n 1) and no full tiles.
    ``symbolic``: a compile-time question on tensors whose sizes or strides may be symbolic
    (SymInts): those pass the checks they cannot decide, which the launch makes again on the real
    tensors (``triton_sparse.launch_sm90`` sends a launch that fails them to the Triton kernel)."""
    if not HAVE_GLUON or q.device.type != "cuda" or block_m != BLOCK_M or key_block != 1 or full_tile != 0:
        return False  # (sm90_device last: the shape checks are cheaper than the capability query)
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype == out.dtype):
        return False
    D = q.shape[-1]
    if not isinstance(D, int) or D not in (64, 128) or k.shape[-1] != D or v.shape[-1] != D:
        return False

    def holds(pred, *xs) -> bool:  # pred(*xs), or True for sizes only known at run time (symbolic)
        if all(isinstance(x, int) for x in xs):
            return pred(*xs)
        return symbolic

    for t in (q, k, v, out):
        st = t.stride()
        if not holds(lambda *xs: True, *st, *t.shape, t.storage_offset()):
            return False  # symbolic sizes, asked at run time: the Triton kernel serves them
        if not holds(lambda x: x == 1, st[-1]) or not all(holds(lambda x: x % 8 == 0, x) for x in st[:-1]):
            return False  # 16-byte rows for cp.async
        if not holds(lambda x: x % 8 == 0, t.storage_offset()):
            return False
    if any(not holds(lambda n, s: (n - 1) * s + D < 2**31, t.shape[2], t.stride(2)) for t in (k, v)):
        return False  # key row offsets are 32-bit in the kernel
    return sm90_device(q.device)


class NotServed(ValueError):
    """A launch ``sm90_supported`` rejects (the tensors do not fit the kernel): not a failure of
    the kernel, and the Triton kernel serves it."""


def launch_sparse_kernel_sm90(q, k, v, out, counts, indices, scale: float, *, stages: int = STAGES):
    """Launch ``_fg_sparse_fwd_sm90_ws``: q (B, H, S_q, D), k/v (B, H_kv, S_kv, D), out like q;
    counts (B, H, nQB), indices (B, H, nQB, cap) int32 (``PackedSlices``, block_m 128, block_n 1,
    no full tiles); a launch ``sm90_supported`` rejects raises ``NotServed`` (a ValueError). ``stages``: K and V
    buffers of BLOCK_N (128) keys each, 2 or more; 3 (the default, the fastest measured) fill the
    shared memory at D = 128. Returns ``out``. No host sync. Launched through
    ``triton_common.launch``: inside ``collect_compiles`` it only records a compile thunk."""
    from .triton_common import LOG2E, launch

    if not sm90_supported(q, k, v, out, BLOCK_M, 1, 0):
        raise NotServed(
            "q, k, v, out: expected fp16/bf16 CUDA tensors of one dtype on an sm_90 GPU, head dim 64 or 128, "
            f"unit last strides and 16-byte aligned rows (sm90_supported), got {q.dtype} q of shape "
            f"{tuple(q.shape)} on {q.device}"
        )
    if not isinstance(stages, int) or stages < 2:
        raise ValueError(f"stages: expected an int >= 2 (K/V buffers), got {stages!r}")
    B, H, S_q, D = q.shape
    H_kv = k.shape[1]
    n_qb = triton.cdiv(S_q, BLOCK_M)
    launch(
        _fg_sparse_fwd_sm90_ws, (n_qb * B * H,),
        q, k, v, out, counts, indices, float(scale) * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *counts.stride(), *indices.stride()[:3], H, H // H_kv, S_q, n_qb,
        **_meta(D, stages), num_warps=4, maxnreg=WS_MAXNREG,
    )
    return out


def _meta(head_dim: int, stages: int) -> dict:
    """The kernel's constexprs besides ``num_warps``."""
    return dict(HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=stages, PRODUCER_WARPS=WS_PRODUCER_WARPS,
                CONSUMER_REGS=WS_CONSUMER_REGS, PRODUCER_REGS=WS_PRODUCER_REGS)


def compile_for_target_sm90(head_dim: int = 128, dtype: str = "bf16", stages: int = STAGES):
    """Compile the kernel for sm_90 with no GPU (Triton's compiled kernel: ``.asm`` has ttgir, ptx,
    cubin); the CPU tests check it builds and holds cp.async, mbarriers and wgmma."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from .triton_common import aot_signature

    fn = _fg_sparse_fwd_sm90_ws
    ptrs = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "O": f"*{dtype}", "COUNTS": "*i32", "IDX": "*i32"}
    sig, consts, attrs = aot_signature(fn.arg_names, ptrs, {**_meta(head_dim, stages), "num_warps": 4})
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": WS_MAXNREG})
