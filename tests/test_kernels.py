"""Kernels on the CPU: references against float64, the Triton kernels under the interpreter
(TRITON_INTERPRET=1, set by conftest.py) against the references, packing, validation, and the
ahead-of-time sm_90 compile (cp.async + wgmma in the PTX)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fgcompile.attention import pack_slices, profile_attention, sparse_attention
from fgcompile.testing.metrics import rel_err
from fgcompile.kernels import packing, reference
from fgcompile.kernels.packing import SliceBitmap, bitmap_memory_bytes, pack_bits, unpack_bits, unpack_slices

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_interp = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="needs TRITON_INTERPRET=1 or CUDA")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _f64_sparse(q, k, v, keep, block_m, block_n, scale):
    """Masked softmax attention in float64, the whole S_q x S_kv at once (small shapes only)."""
    B, H, S_q, D = q.shape
    H_kv, S_kv = k.shape[1], k.shape[2]
    g = H // H_kv
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    mask = keep.repeat_interleave(block_m, 2)[:, :, :S_q].repeat_interleave(block_n, 3)[..., :S_kv]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vv


def _rand(B, H, H_kv, S_q, S_kv, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S_q, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, H_kv, S_kv, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, H_kv, S_kv, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def _mask(B, H, S_q, S_kv, block_m, block_n, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-S_q // block_m), -(-S_kv // block_n)
    if kind == "all":
        return torch.ones(B, H, nqb, nkb, dtype=torch.bool)
    if kind == "one":  # exactly one key block per query block
        keep = torch.zeros(B, H, nqb, nkb, dtype=torch.bool)
        j = torch.randint(0, nkb, (B, H, nqb, 1), generator=g)
        return keep.scatter_(-1, j, True)
    if kind == "some_empty":
        keep = torch.rand(B, H, nqb, nkb, generator=g) < 0.5
        keep[:, :, ::2] = False
        return keep
    if kind == "runs":  # random kept runs plus full aligned tiles (exercises the full-tile path)
        keep = torch.rand(B, H, nqb, nkb, generator=g) < 0.3
        keep[..., : max(1, 128 // block_n)] = True
        return keep
    return torch.rand(B, H, nqb, nkb, generator=g) < 0.4




# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("block_n", [1, 3])
def test_sparse_reference_matches_float64(block_n):
    B, H, H_kv, S_q, S_kv, D, bm = 2, 4, 2, 70, 50, 16, 16
    q, k, v = _rand(B, H, H_kv, S_q, S_kv, D)
    keep = _mask(B, H, S_q, S_kv, bm, block_n, "some_empty", seed=1)
    keep[0, 0, 1] = False  # a query block that keeps nothing
    out = reference.sparse_attention_reference(q, k, v, keep, bm, block_n, 0.3)
    ref = _f64_sparse(q, k, v, keep, bm, block_n, 0.3)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_err(out, ref) < 1e-5
    assert torch.all(out[0, 0, 16:32] == 0)


def test_references_chunked_equal_unchunked(monkeypatch):
    B, H, S_q, S_kv, D, bm = 1, 2, 100, 90, 16, 32
    q, k, v = _rand(B, H, H, S_q, S_kv, D, seed=3)
    keep = _mask(B, H, S_q, S_kv, bm, 1, "random", seed=2)
    kp = torch.rand(B, S_kv) < 0.7
    full = (
        reference.sparse_attention_reference(q, k, v, keep, bm, 1, 0.25),
        reference.block_max_probs_reference(q, k, bm, 0.25, kp),
        reference.dense_attention_reference(q, k, v, 0.25, kp),
    )
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 2 * S_kv * H)  # a few rows per chunk
    chunked = (
        reference.sparse_attention_reference(q, k, v, keep, bm, 1, 0.25),
        reference.block_max_probs_reference(q, k, bm, 0.25, kp),
        reference.dense_attention_reference(q, k, v, 0.25, kp),
    )
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b)


def test_profile_references_match_definition():
    B, H, H_kv, S_q, S_kv, D, bm = 2, 2, 1, 45, 33, 8, 16
    q, k, v = _rand(B, H, H_kv, S_q, S_kv, D, seed=4)
    kp = torch.rand(B, S_kv) < 0.6
    kp[1] = False  # a batch with no real key
    s = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * 0.5
    s = s.masked_fill(~kp[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    pp = torch.nn.functional.pad(p, (0, 0, 0, 3 * bm - S_q))
    want = pp.reshape(B, H, 3, bm, S_kv).amax(3)
    got = reference.block_max_probs_reference(q, k, bm, 0.5, kp)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    out = reference.dense_attention_reference(q, k, v, 0.5, kp)
    torch.testing.assert_close(out.double(), p @ v.double().repeat_interleave(2, 1), atol=1e-5, rtol=1e-5)
    assert torch.all(out[1] == 0) and torch.all(got[1] == 0)


# ----------------------------------------------------------------------------- Triton kernel

CASES = [
    # (B, H, H_kv, S_q, S_kv, D, block_m, block_n, mask kind, dtype)
    (1, 2, 2, 128, 128, 64, 64, 1, "all", torch.float32),
    (1, 2, 2, 192, 160, 64, 64, 1, "some_empty", torch.float16),
    (1, 2, 1, 100, 90, 64, 32, 1, "one", torch.float32),
    (1, 2, 2, 150, 130, 96, 64, 1, "random", torch.float16),
    (2, 4, 2, 96, 77, 128, 32, 1, "random", torch.float32),
    (1, 2, 2, 130, 200, 64, 64, 16, "random", torch.float32),
    (2, 2, 1, 64, 150, 96, 32, 16, "some_empty", torch.float16),
    (1, 2, 2, 64, 300, 64, 64, 1, "runs", torch.float16),
    (1, 1, 1, 64, 260, 64, 64, 16, "runs", torch.float32),
    (1, 2, 2, 64, 96, 128, 64, 16, "one", torch.float16),
]


@needs_interp
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}q{c[3]}k{c[4]}D{c[5]}m{c[6]}n{c[7]}-{c[8]}-{str(c[9])[6:]}")
@pytest.mark.parametrize("pad_tail", ["0", "1"])
def test_triton_matches_reference(case, pad_tail, monkeypatch):
    monkeypatch.setenv("FGCOMPILE_PAD_TAIL", pad_tail)  # the gather loop's masked tail step or padded last tile
    B, H, H_kv, S_q, S_kv, D, bm, bn, kind, dtype = case
    q, k, v = _rand(B, H, H_kv, S_q, S_kv, D, dtype=dtype, device=DEV, seed=S_q + S_kv)
    keep = _mask(B, H, S_q, S_kv, bm, bn, kind, seed=D).to(DEV)
    out = sparse_attention(q, k, v, keep, block_m=bm, block_n=bn, impl="triton")
    ref = reference.sparse_attention_reference(q, k, v, keep, bm, bn, D ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert rel_err(out, ref) < tol
    empty = ~keep.any(-1)  # (B, H, nQB)
    for b, h, i in empty.nonzero().tolist():
        assert torch.all(out[b, h, i * bm : (i + 1) * bm] == 0)


@needs_interp
@pytest.mark.parametrize("pad_tail", ["0", "1"])
@pytest.mark.parametrize("kind", ["runs", "random"])
def test_triton_rescale_with_growing_scores(pad_tail, kind, monkeypatch):
    """Scores that grow along the key order by a few units per key tile, so the online softmax's
    running max moves at most tiles (by small and by large steps) and the accumulator is rescaled
    mid-loop: against float64, both tail modes, the full-tile loop and the gathered loop. (Session
    13 also ran this against a lazy rescale, FA4's conditional one, withdrawn: benchmarks/NOTES.md.)"""
    monkeypatch.setenv("FGCOMPILE_PAD_TAIL", pad_tail)
    B, H, S_q, S_kv, D, bm = 1, 2, 128, 640, 32, 64
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, H, S_q, D, generator=g)
    q[..., 0] = 4.0  # every query weighs the keys' first coordinate
    k = torch.randn(B, H, S_kv, D, generator=g)
    # the first coordinate ramps up: ~1.5 units of score (base e) more per 16 keys, the
    # interpreter's tile; the largest scores are ~60 units over the first tile's
    k[..., 0] = torch.linspace(-2.0, 13.0, S_kv)
    v = torch.randn(B, H, S_kv, D, generator=g)
    if kind == "runs":
        keep = _mask(B, H, S_q, S_kv, bm, 1, "runs", seed=3)
    else:
        keep = torch.rand(B, H, -(-S_q // bm), S_kv, generator=g) < 0.6
    keep[..., -1] = True  # the largest score is kept: its weight is the row's largest
    scale = D ** -0.5
    out = sparse_attention(q.to(DEV), k.to(DEV), v.to(DEV), keep.to(DEV), block_m=bm, scale=scale, impl="triton")
    ref = _f64_sparse(q, k, v, keep, bm, 1, scale)
    assert torch.isfinite(out).all()
    assert rel_err(out.cpu(), ref) < 1e-5


@needs_interp
def test_real_key_lists_run_dense_attention_over_the_real_keys():
    """``packing.real_key_lists`` (a key-padded dense call's lists, expanded over heads and query
    blocks): the mask they pack is the key-padding mask for every head and block, they hold
    B * S_kv indices whatever H and S_q, and the Triton kernel on them (GQA, a ragged last block)
    gives float64 attention over the real keys; a batch item with no real key gives zeros."""
    B, H, H_kv, S_q, S_kv, D, bm = 3, 4, 2, 200, 230, 32, 64
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, H, S_q, D, generator=g)
    k, v = (torch.randn(B, H_kv, S_kv, D, generator=g) for _ in range(2))
    kp = torch.ones(B, S_kv, dtype=torch.bool)
    kp[1, 193:] = False
    kp[1, 5:9] = False  # not only a suffix
    kp[2] = False
    lists = packing.real_key_lists(kp.to(DEV), H, S_q, bm)
    nqb = -(-S_q // bm)
    assert tuple(lists.counts.shape) == (B, H, nqb) and tuple(lists.indices.shape) == (B, H, nqb, S_kv)
    assert lists.indices.untyped_storage().nbytes() <= B * S_kv * 4 + 64
    assert torch.equal(unpack_slices(lists).cpu(), kp[:, None, None, :].expand(B, H, nqb, S_kv))
    scale = D ** -0.5
    out = sparse_attention(q.to(DEV), k.to(DEV), v.to(DEV), lists, block_m=bm, scale=scale, impl="triton").cpu()
    keep = kp[:, None, None, :].expand(B, H, nqb, S_kv)
    ref = _f64_sparse(q, k.repeat_interleave(H // H_kv, 1), v.repeat_interleave(H // H_kv, 1), keep, bm, 1, scale)
    assert rel_err(out[:2], ref[:2]) < 1e-5
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@needs_interp
def test_triton_strided_inputs_and_packed_input():
    """(B, S, H, D) tensors seen as (B, H, S, D) (non-contiguous), a PackedSlices input, and the
    full-tile fast path on and off give the same result."""
    B, H, S, D, bm = 1, 2, 200, 64, 64
    g = torch.Generator().manual_seed(7)
    base = torch.randn(3, B, S, H, D, generator=g).to(DEV)
    q, k, v = (t.transpose(1, 2) for t in base.unbind(0))
    assert not q.is_contiguous()
    keep = _mask(B, H, S, S, bm, 1, "runs", seed=5).to(DEV)
    ref = reference.sparse_attention_reference(q, k, v, keep, bm, 1, 0.1)
    out_bool = sparse_attention(q, k, v, keep, block_m=bm, scale=0.1, impl="triton")
    packed = pack_slices(keep, block_m=bm, seq_len_kv=S)
    assert int(packed.full_counts.sum()) > 0  # the mask has fully kept tiles
    out_packed = sparse_attention(q, k, v, packed, scale=0.1, impl="triton")
    out_nofull = sparse_attention(q, k, v, pack_slices(keep, block_m=bm, seq_len_kv=S, full_tile=0), scale=0.1, impl="triton")
    for o in (out_bool, out_packed, out_nofull):
        assert rel_err(o, ref) < 1e-5
    # the reference path accepts a PackedSlices too
    assert rel_err(sparse_attention(q, k, v, packed, scale=0.1, impl="reference"), ref) < 1e-6
    # 64-bit and 32-bit key offsets (the launcher picks 32 bits here) give the same output
    from fgcompile.kernels.triton_sparse import INTERPRET_CONFIG, needs_64bit_offsets, sparse_attention_triton

    assert not needs_64bit_offsets(k, v)
    outs = [sparse_attention_triton(q, k, v, packed, 0.1, config={**INTERPRET_CONFIG, "OFFS_64": o}) for o in (True, False)]
    assert torch.equal(outs[0], outs[1]) and rel_err(outs[0], ref) < 1e-5


@needs_interp
@pytest.mark.parametrize("slots,block_n", [(12, 1), (13, 1), (26, 2)])
def test_tail_split_gives_the_unsplit_output(slots, block_n):
    """The last wave's blocks shared among several programs (``tail_split``: partial softmax states
    merged by ``_combine_parts``), with an empty block and a one-tile block among them, GQA, and
    shares with no tile, give the unsplit output up to rounding."""
    from fgcompile.kernels.triton_sparse import INTERPRET_CONFIG, sparse_attention_triton, tail_split

    assert tail_split(3072, 132) == (3036, 3)  # Wan2.1 480p on 132 SMs: the last 36 blocks in 3 shares each
    assert tail_split(264, 132) == (264, 1) and tail_split(100, 132) == (100, 1) and tail_split(133, 132) == (132, 8)
    B, H, H_kv, S, D, bm = 1, 4, 2, 200, 32, 32
    q, k, v = _rand(B, H, H_kv, S, S, D, seed=11)
    nqb, nkb = -(-S // bm), -(-S // block_n)
    g = torch.Generator().manual_seed(12)
    keep = torch.rand(B, H, nqb, nkb, generator=g) < 0.4
    keep[0, 3, nqb - 1] = False  # the last block: split, nothing kept
    keep[0, 3, nqb - 2] = False
    keep[0, 3, nqb - 2, 3] = True  # one key block: one tile, most shares empty
    n_full, splits = tail_split(B * H * nqb, slots)
    assert splits > 1 and n_full <= B * H * nqb - 2  # both blocks above are split
    packed = pack_slices(keep, block_m=bm, block_n=block_n, seq_len_kv=S, full_tile=0)
    ref = reference.sparse_attention_reference(q, k, v, keep, bm, block_n, 0.2)
    whole = sparse_attention_triton(q, k, v, packed, 0.2, config=INTERPRET_CONFIG)
    split = sparse_attention_triton(q, k, v, packed, 0.2, config={**INTERPRET_CONFIG, "SLOTS": slots})
    assert rel_err(split, ref) < 1e-5 and rel_err(whole, ref) < 1e-5
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    assert torch.all(split[0, 3, (nqb - 1) * bm:] == 0)


@needs_interp
def test_launch_writes_dense_out_where_use_dense_holds():
    """The lowered graph's select (the copy kernel the launch runs after the sparse kernel):
    ``use_dense`` True writes ``dense_out`` (the lists are empty on those calls), False the sparse
    result without reading ``dense_out``; ``out`` may be a permuted view (q's layout)."""
    from fgcompile.kernels.triton_sparse import launch_sparse_kernel, sparse_attention_triton

    B, H, S, D, bm = 1, 2, 128, 32, 64
    g = torch.Generator().manual_seed(3)
    q, k, v = (t.transpose(1, 2) for t in torch.randn(3, B, S, H, D, generator=g).to(DEV).unbind(0))
    keep = _mask(B, H, S, S, bm, 1, "random", seed=2).to(DEV)
    packed = pack_slices(keep, block_m=bm, seq_len_kv=S)
    ref = sparse_attention_triton(q, k, v, packed, 0.2)
    dense = torch.randn(B, H, S, D, generator=g).to(DEV)
    empty = pack_slices(torch.zeros_like(keep), block_m=bm, seq_len_kv=S)
    # (True, packed): a site's first profiled call runs the loops on its new mask, the output is dense_out
    for flag, p, want in ((False, packed, ref), (True, empty, dense), (True, packed, dense)):
        out = torch.empty_like(q).fill_(float("nan"))
        assert out.stride() == q.stride()
        d = dense if flag else torch.full_like(dense, float("nan"))  # never read on a sparse call
        launch_sparse_kernel(q, k, v, out, p.counts, p.indices, p.full_counts, p.full_tiles, 0.2, bm, 1, p.full_tile,
                             dense_out=d, use_dense=torch.tensor(flag, device=DEV))
        assert torch.equal(out, want), flag
    with pytest.raises(ValueError, match="dense_out and use_dense"):
        launch_sparse_kernel(q, k, v, out, p.counts, p.indices, p.full_counts, p.full_tiles, 0.2, bm, 1, p.full_tile,
                             dense_out=dense)


def test_64bit_offsets_decided_by_the_largest_row_offset():
    from fgcompile.kernels.triton_sparse import needs_64bit_offsets

    small = torch.empty_strided((1, 2, 1000, 128), (0, 128, 256, 1), device="meta")
    assert not needs_64bit_offsets(small, small)
    # one head's rows reach past 2**31 elements: (S - 1) * stride_s >= 2**31 - 1
    big = torch.empty_strided((1, 1, 2**21 + 1, 128), (0, 0, 1024, 1), device="meta")
    assert needs_64bit_offsets(small, big) and needs_64bit_offsets(big, small)


@needs_interp
def test_triton_bf16_upcast_under_interpreter():
    q, k, v = _rand(1, 2, 2, 64, 64, 64, dtype=torch.bfloat16, device=DEV, seed=11)
    keep = _mask(1, 2, 64, 64, 32, 1, "random", seed=3).to(DEV)
    out = sparse_attention(q, k, v, keep, block_m=32, impl="triton")
    ref = _f64_sparse(q, k, v, keep, 32, 1, 64 ** -0.5)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2


@needs_interp
@pytest.mark.parametrize("pad_tail", ["0", "1"])
def test_triton_property_random_shapes(pad_tail, monkeypatch):
    monkeypatch.setenv("FGCOMPILE_PAD_TAIL", pad_tail)
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=6, deadline=None, derandomize=True, database=None)
    @hyp.given(
        B=st.integers(1, 2),
        group=st.sampled_from([(1, 1), (2, 1), (2, 2)]),
        S_q=st.integers(1, 96),
        S_kv=st.integers(1, 96),
        D=st.sampled_from([16, 64, 96]),
        bm=st.sampled_from([16, 32]),
        bn=st.sampled_from([1, 2, 16]),
        density=st.floats(0.0, 1.0),
        seed=st.integers(0, 2**16),
    )
    def check(B, group, S_q, S_kv, D, bm, bn, density, seed):
        H, H_kv = group
        q, k, v = _rand(B, H, H_kv, S_q, S_kv, D, device=DEV, seed=seed)
        g = torch.Generator().manual_seed(seed)
        keep = (torch.rand(B, H, -(-S_q // bm), -(-S_kv // bn), generator=g) < density).to(DEV)
        out = sparse_attention(q, k, v, keep, block_m=bm, block_n=bn, impl="triton")
        ref = _f64_sparse(q, k, v, keep, bm, bn, D ** -0.5)
        assert torch.isfinite(out).all()
        assert (out.double() - ref).abs().max().item() < 1e-4

    check()


@needs_interp
@pytest.mark.parametrize(
    "B,H,H_kv,S_q,S_kv,D,bm,padded,dtype",
    [
        (1, 2, 2, 100, 90, 64, 32, False, torch.float32),
        (2, 2, 1, 70, 130, 96, 64, True, torch.float16),
    ],
)
def test_profile_kernel_matches_definition(B, H, H_kv, S_q, S_kv, D, bm, padded, dtype):
    q, k, v = _rand(B, H, H_kv, S_q, S_kv, D, dtype=dtype, device=DEV, seed=S_q)
    kp = None
    if padded:
        kp = (torch.rand(B, S_kv, generator=torch.Generator().manual_seed(1)) < 0.7).to(DEV)
        kp[-1] = False  # no real key at all in the last batch
    out, probs = profile_attention(q, k, v, block_m=bm, key_padding=kp, impl="triton")
    out_r, probs_r = profile_attention(q, k, v, block_m=bm, key_padding=kp, impl="reference")
    assert probs.dtype == torch.float32 and probs.shape == (B, H, -(-S_q // bm), S_kv)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert rel_err(out, out_r) < tol
    assert (probs - probs_r).abs().max().item() < (1e-3 if dtype == torch.float16 else 1e-6)
    assert torch.isfinite(out).all()
    if padded:
        assert torch.all(probs[~kp[:, None, None, :].expand_as(probs)] == 0)
        assert torch.all(out[-1] == 0)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("block_n,full_tile", [(1, 0), (1, 16), (1, 128), (4, 16), (3, 16)])
def test_pack_slices_round_trip(block_n, full_tile):
    B, H, nqb, S_kv = 2, 3, 4, 200
    nkb = -(-S_kv // block_n)
    g = torch.Generator().manual_seed(block_n * 100 + full_tile)
    keep = torch.rand(B, H, nqb, nkb, generator=g) < 0.3
    keep[0, 0, 0] = True
    keep[0, 0, 1] = False
    keep[1, 2, 3, : 64 // block_n] = True
    p = packing.pack_slices(keep, 64, block_n, S_kv, full_tile=full_tile)
    assert p.counts.dtype == torch.int32 and p.indices.dtype == torch.int32
    assert p.shape == tuple(keep.shape)
    assert torch.equal(unpack_slices(p), keep)
    # ascending indices inside the count; full tiles and gathered keys partition the kept set
    for b, h, i in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        c = int(p.counts[b, h, i])
        idx = p.indices[b, h, i, :c]
        assert torch.all(idx[1:] > idx[:-1])
        n_full_keys = int(p.full_counts[b, h, i]) * (p.full_tile // block_n if p.full_tile else 0)
        assert c + n_full_keys == int(keep[b, h, i].sum())
    if full_tile and full_tile % block_n == 0:
        assert int(p.full_counts[0, 0, 0]) == S_kv // full_tile  # an all-kept row is all full tiles


def test_pack_slices_has_no_host_sync():
    """Under FakeTensorMode any data-dependent op (.item(), .nonzero(), boolean indexing) raises."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        keep = torch.empty(1, 2, 4, 300, dtype=torch.bool)
        p = packing.pack_slices(keep, 64, 1, 300)
        assert tuple(p.indices.shape) == (1, 2, 4, 300) and tuple(p.full_tiles.shape) == (1, 2, 4, 2)
        w = pack_bits(keep)
        assert tuple(unpack_bits(w, 300).shape) == (1, 2, 4, 300)
        # the run time's per-call path: bitmap -> PackedSlices (falls back to torch ops on fakes)
        p2 = packing.packed_from_bits(w, 300, 64, 1, 300)
        assert tuple(p2.indices.shape) == (1, 2, 4, 300) and tuple(p2.full_tiles.shape) == (1, 2, 4, 2)
        assert tuple(packing.popcount_rows(w).shape) == (1, 2, 4)


def test_bitmaps_round_trip_and_memory():
    g = torch.Generator().manual_seed(0)
    for n in (1, 31, 32, 33, 100):
        keep = torch.rand(2, 3, 5, n, generator=g) < 0.5
        words = pack_bits(keep)
        assert words.dtype == torch.int32 and words.shape[-1] == -(-n // 32)
        assert torch.equal(unpack_bits(words, n), keep)
        bm = SliceBitmap.from_keep(keep)
        assert torch.equal(bm.to_keep(), keep) and bm.memory_bytes() == bitmap_memory_bytes(keep.shape)
    assert torch.equal(unpack_bits(pack_bits(torch.ones(1, 64, dtype=torch.bool)), 64), torch.ones(1, 64, dtype=torch.bool))
    # Wan-1.3B 480p: 30 layers x 12 heads x 256 query blocks x 32,760 keys fit in 1 GiB as bitmaps
    per_layer = bitmap_memory_bytes((1, 12, 256, 32760))
    assert 30 * per_layer < 2**30
    assert 370 * 2**20 > 30 * per_layer > 350 * 2**20


@needs_interp
@pytest.mark.parametrize(
    "block_n,full_tile,S_kv",
    [(1, 128, 300), (1, 0, 100), (1, 16, 200), (1, 64, 257), (2, 16, 130), (4, 16, 200), (3, 16, 200), (1, 128, 40)],
)
def test_packed_from_bits_triton_equals_torch(block_n, full_tile, S_kv):
    B, H, nqb = 2, 2, 3
    nkb = -(-S_kv // block_n)
    g = torch.Generator().manual_seed(block_n * 1000 + full_tile + S_kv)
    keep = torch.rand(B, H, nqb, nkb, generator=g) < torch.rand(B, H, nqb, 1, generator=g)
    keep[0, 0, 0] = True  # all kept: every tile full
    keep[0, 0, 1] = False  # nothing kept
    keep[1, 1, 2, : 160 // block_n] = True  # a run covering some tiles
    words = pack_bits(keep)
    assert torch.equal(pack_bits(keep, impl="triton"), words)
    assert torch.equal(pack_bits(keep, impl="torch"), words)
    a = packing.packed_from_bits(words, nkb, 64, block_n, S_kv, full_tile, impl="triton")
    b = packing.packed_from_bits(words, nkb, 64, block_n, S_kv, full_tile, impl="torch")
    for name in ("counts", "indices", "full_counts", "full_tiles"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.full_tile == b.full_tile and torch.equal(unpack_slices(a), keep)
    assert torch.equal(packing.popcount_rows(words), keep.sum(-1, dtype=torch.int32))
    if S_kv == 300:  # int16 lists (benchmarks/pack_probe.py): the same indices
        from fgcompile.kernels.triton_pack import packed_from_bits_triton

        c = packed_from_bits_triton(words, nkb, 64, block_n, S_kv, full_tile, index_dtype=torch.int16)
        assert c.indices.dtype == torch.int16 and torch.equal(c.indices.to(torch.int32), a.indices)
        with pytest.raises(ValueError, match="index_dtype"):  # int16 cannot hold more key blocks
            packed_from_bits_triton(words, 2**15 + 1, 64, block_n, S_kv, full_tile, index_dtype=torch.int16)
        with pytest.raises(ValueError, match="index_dtype"):
            packed_from_bits_triton(words, nkb, 64, block_n, S_kv, full_tile, index_dtype=torch.int64)


@needs_interp
@pytest.mark.parametrize("segments,chunk,cap", [(2, 32, None), (3, 32, 50), (5, 64, 7), (64, 32, None)])
def test_packed_from_bits_triton_segments(segments, chunk, cap):
    """Rows split into segments (several programs per row, each counting the kept bits before its
    segment): the same lists as one program per row, caps and an uneven last segment included."""
    from fgcompile.kernels.triton_pack import packed_from_bits_triton

    B, H, nqb, nkb = 1, 2, 3, 203
    g = torch.Generator().manual_seed(segments * 100 + chunk)
    keep = torch.rand(B, H, nqb, nkb, generator=g) < torch.rand(B, H, nqb, 1, generator=g)
    keep[0, 0, 0] = True
    keep[0, 1, 1] = False
    words = pack_bits(keep)
    ref = packing.packed_from_bits(words, nkb, 64, 1, nkb, 0, cap=cap, impl="torch")
    got = packed_from_bits_triton(words, nkb, 64, 1, nkb, 0, cap=cap, chunk=chunk, segments=segments)
    for name in ("counts", "indices", "full_counts", "full_tiles"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


@needs_interp
@pytest.mark.parametrize("full_tile", [0, 16])
def test_packed_index_cap(full_tile):
    """cap index columns: the same lists where every row fits (a density budget's mask); a row
    over the cap keeps its first cap keys and never writes out of bounds; torch == Triton."""
    from fgcompile.predictors import apply_density, density_budget

    B, H, nqb, S_kv = 1, 2, 4, 200
    g = torch.Generator().manual_seed(full_tile)
    scores = torch.rand(B, H, nqb, S_kv, generator=g)
    keep = apply_density(scores > 0.2, scores, 0.3)
    if full_tile:  # 64 keys in full tiles: removed from the lists, so the row still fits
        keep[0, 1, 3, :64] = True
        keep[0, 1, 3, 64:] = False
    cap = density_budget(S_kv, 0.3)
    assert cap == 60 and int(keep.sum(-1).max()) == (64 if full_tile else 60)
    words = pack_bits(keep)
    full = packing.packed_from_bits(words, S_kv, 64, 1, S_kv, full_tile, impl="torch")
    for impl in ("torch", "triton"):
        capped = packing.packed_from_bits(words, S_kv, 64, 1, S_kv, full_tile, cap=cap, impl=impl)
        assert capped.indices.shape == (B, H, nqb, cap)
        # every row's list fits: the same packing, narrower
        assert torch.equal(capped.counts, full.counts) and torch.equal(unpack_slices(capped), keep)
        assert torch.equal(capped.indices, full.indices[..., :cap])
    # a row over the cap (caller error): its first cap keys, count clamped
    over = torch.zeros(1, 1, 1, 100, dtype=torch.bool)
    over[..., ::2] = True  # 50 keys
    for impl in ("torch", "triton"):
        p = packing.packed_from_bits(pack_bits(over), 100, 64, 1, 100, 0, cap=20, impl=impl)
        assert p.counts.item() == 20 and p.indices.shape[-1] == 20
        assert p.indices[0, 0, 0].tolist() == list(range(0, 40, 2))


def test_pack_bits_matches_old_int64_definition():
    g = torch.Generator().manual_seed(4)
    for n in (1, 31, 32, 33, 100):
        keep = torch.rand(3, 2, n, generator=g) < 0.5
        x = torch.nn.functional.pad(keep.to(torch.int64), (0, -(-n // 32) * 32 - n)).reshape(3, 2, -1, 32)
        w = (x << torch.arange(32)).sum(-1)
        want = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
        assert torch.equal(pack_bits(keep), want)
    assert pack_bits(torch.ones(1, 32, dtype=torch.bool)).item() == -1


@needs_interp
@pytest.mark.parametrize("padded", [False, True])
def test_profile_bits_kernel_matches_float_path(padded):
    from fgcompile import predictors
    from fgcompile.attention import profile_attention_bits

    B, H, H_kv, S_q, S_kv, D, bm = 2, 2, 1, 70, 100, 32, 32
    q, k, v = _rand(B, H, H_kv, S_q, S_kv, D, device=DEV, seed=9)
    q = q * 4.0  # peaked rows: a non-trivial mask
    kp = None
    if padded:
        kp = (torch.rand(B, S_kv, generator=torch.Generator().manual_seed(2)) < 0.7).to(DEV)
        kp[-1] = False  # no real key: nothing kept
    out, bits, kept = profile_attention_bits(q, k, v, alpha=0.5, block_m=bm, key_padding=kp, impl="triton")
    out2, probs = profile_attention(q, k, v, block_m=bm, key_padding=kp, impl="triton")
    keep = predictors.keep_from_block_max(probs, alpha=0.5, key_padding=kp)
    assert bits.dtype == torch.int32 and bits.shape == (B, H, 3, 4)
    assert torch.equal(unpack_bits(bits, S_kv), keep)
    assert torch.equal(kept, keep.sum(-1, dtype=torch.int32)) and torch.equal(out, out2)
    assert 0.05 < keep.float().mean() < 0.95
    if padded:
        assert not unpack_bits(bits, S_kv)[-1].any()
    # the reference impl gives the same bitmap
    _, bits_r, _ = profile_attention_bits(q, k, v, alpha=0.5, block_m=bm, key_padding=kp, impl="reference")
    assert (unpack_bits(bits_r, S_kv) != keep).float().mean() < 0.01
    with pytest.raises(ValueError, match="^alpha"):
        profile_attention_bits(q, k, v, alpha=0.0)


# ----------------------------------------------------------------------------- validation


def _ok_inputs():
    q, k, v = _rand(1, 4, 2, 64, 64, 64, seed=1)
    keep = torch.ones(1, 4, 1, 64, dtype=torch.bool)
    return q, k, v, keep


@pytest.mark.parametrize(
    "mutate,arg",
    [
        (lambda a: dict(a, q=a["q"][0]), "q"),
        (lambda a: dict(a, q=a["q"].to(torch.float64)), "q"),
        (lambda a: dict(a, k=a["k"].half()), "k"),
        (lambda a: dict(a, v=a["v"][:, :, :10]), "v"),
        (lambda a: dict(a, k=a["k"][:, :, :, :32], v=a["v"][:, :, :, :32]), "k"),
        (lambda a: dict(a, k=torch.randn(1, 3, 64, 64), v=torch.randn(1, 3, 64, 64)), "k"),
        (lambda a: dict(a, k=torch.randn(2, 2, 64, 64), v=torch.randn(2, 2, 64, 64)), "k"),
        (lambda a: dict(a, keep=a["keep"].int()), "keep"),
        (lambda a: dict(a, keep=a["keep"][:, :, :, :10]), "keep"),
        (lambda a: dict(a, keep="all"), "keep"),
        (lambda a: dict(a, block_m=0), "block_m"),
        (lambda a: dict(a, block_n=1.5), "block_n"),
        (lambda a: dict(a, scale=-1.0), "scale"),
        (lambda a: dict(a, impl="cuda"), "impl"),
        (lambda a: dict(a, block_m=48, keep=torch.ones(1, 4, 2, 64, dtype=torch.bool), impl="triton"), "block_m"),
        (lambda a: dict(a, q=torch.randn(1, 4, 64, 160), k=torch.randn(1, 2, 64, 160), v=torch.randn(1, 2, 64, 160), impl="triton"), "q"),
    ],
)
def test_sparse_attention_validation(mutate, arg):
    q, k, v, keep = _ok_inputs()
    a = mutate(dict(q=q, k=k, v=v, keep=keep))
    kw = {x: a[x] for x in ("block_m", "block_n", "scale", "impl") if x in a}
    kw.setdefault("block_m", 64)
    with pytest.raises(ValueError, match=rf"^{arg}"):
        sparse_attention(a["q"], a["k"], a["v"], a["keep"], **kw)


def test_validation_of_pack_and_profile_and_triton_on_cpu(monkeypatch):
    q, k, v, keep = _ok_inputs()
    with pytest.raises(ValueError, match="^keep"):
        pack_slices(keep.float())
    with pytest.raises(ValueError, match="^seq_len_kv"):
        pack_slices(keep, seq_len_kv=100)
    with pytest.raises(ValueError, match="^full_tile"):
        pack_slices(keep, full_tile=24)
    packed = pack_slices(keep, block_m=64)
    with pytest.raises(ValueError, match="^block_m"):
        sparse_attention(q, k, v, packed, block_m=32)
    with pytest.raises(ValueError, match="^keep"):
        sparse_attention(q[:, :, :10], k, v, pack_slices(torch.ones(1, 4, 1, 32, dtype=torch.bool), block_m=64))
    with pytest.raises(ValueError, match="^key_padding"):
        profile_attention(q, k, v, key_padding=torch.ones(1, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match="^key_padding"):
        profile_attention(q, k, v, key_padding=torch.ones(1, 64))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^impl.*TRITON_INTERPRET"):
            sparse_attention(q, k, v, keep, block_m=64, impl="triton")
    # "auto" on the CPU is the reference, and scale defaults to D ** -0.5
    out = sparse_attention(q, k, v, keep, block_m=64)
    ref = _f64_sparse(q, k, v, keep, 64, 1, 64 ** -0.5)
    assert rel_err(out, ref) < 1e-5


# ----------------------------------------------------------------------------- sm_90 compile

_COMPILE_SCRIPT = r"""
import json, re
from fgcompile.kernels.triton_sparse import compile_for_target
out = []
# the direct call's kernel (full tiles, 64-bit offsets) and the compiled model's (no full tiles,
# 32-bit offsets, the last wave's blocks split in 3)
for offs_64, full_tile, splits in ((True, 128, 1), (False, 0, 3)):
    ck = compile_for_target(90, dtype="bf16", head_dim=128, block_m=128, key_block=1, block_n=128, num_warps=8,
                            num_stages=3, offs_64=offs_64, full_tile=full_tile, splits=splits)
    ptx, ttgir = ck.asm["ptx"], ck.asm["ttgir"]
    out.append({
        "cp_async_16": len(re.findall(r"cp\.async\.cg\.shared\.global[^\n]*0x10", ptx)),
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "waits": [int(x) for x in re.findall(r"async_wait [^\n]*num = (\d+)", ttgir)],
        "shared": ck.metadata.shared,
        "loops": 2 if full_tile else 1,
    })
# the packing kernel: slots from POPC (no scan over the bits of a word)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from fgcompile.kernels.triton_pack import _packed_from_bits as fn
consts = {"CHUNK": 2048, "PER": 128, "USE_FULL": True, "ZBLOCK": 1024, "HW_POPC": True}
sig = {n: ("*i32" if n in ("W", "COUNTS", "IDX", "FCOUNTS", "FTILES") else "constexpr" if n in consts else "i32")
       for n in fn.arg_names}
pk = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                    options={"num_warps": 4})
out.append({"pack_popc": len(re.findall(r"popc\.b32", pk.asm["ptx"]))})
# the merge of the split blocks' shares compiles for sm_90 too
from fgcompile.kernels.triton_sparse import _combine_parts as cf
cc = {"SPLITS": 3, "HEAD_DIM": 128, "HEAD_DIM_PAD": 128, "BLOCK_M": 128, "ROWS": 32}
csig = {n: ("constexpr" if n in cc else "*fp32" if n.startswith("PART") else "*bf16" if n == "O" else "i32")
        for n in cf.arg_names}
triton.compile(ASTSource(fn=cf, signature=csig, constexprs=cc), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print(json.dumps(out))
"""


def _compile_in_child(script: str):
    """Run ``script`` (it prints one JSON line last) in a fresh interpreter without
    TRITON_INTERPRET (the interpreter replaces the compiler); returns the parsed line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_kernel_compiles_for_sm90_with_cp_async_and_wgmma():
    pytest.importorskip("triton")
    *infos, pack = _compile_in_child(_COMPILE_SCRIPT)
    assert pack["pack_popc"] > 0, pack
    for info in infos:  # 64-bit offsets; 32-bit with the dense epilogue
        assert info["cp_async_16"] > 0, info  # the gathered K/V rows: 16-byte asynchronous copies
        assert info["wgmma"] > 0, info  # Hopper tensor-core instructions
        # num_stages=3: two tiles of K/V copies stay in flight in every loop (not a full wait per step)
        assert info["waits"].count(2) >= info["loops"], info
        assert info["shared"] <= 227 * 1024, info


def test_tuning_space_pruned_by_shape():
    """The autotuner's configs after the prune predicate: 128-row blocks of 128-dim heads keep the
    four 8-warp configs (at least 4: the lowering's contract); 64-dim heads keep more; 64-row
    blocks never get 8 warps."""
    import triton

    from fgcompile.kernels.triton_sparse import TUNE_SPACE, _prune

    configs = [triton.Config({"BLOCK_N": bn, "FULL_N": fn}, num_warps=w, num_stages=st) for (bn, w, st, fn) in TUNE_SPACE]
    q = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)

    def kept(d_pad, bm):
        nargs = {"Q": q, "HEAD_DIM_PAD": d_pad, "BLOCK_M": bm, "KEY_BLOCK": 1, "FULL_TILE": 128, "UPCAST": False}
        return [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in _prune(configs, nargs)]

    big = kept(128, 128)
    assert len(big) == 4 and all(w == 8 for _, w, _ in big) and (128, 8, 3) in big
    assert len(kept(64, 128)) > len(big)
    assert all(w == 4 for _, w, _ in kept(128, 64))


def test_launch_collects_compile_thunks():
    """``triton_common.launch`` launches, except inside ``collect_compiles()`` on the same thread,
    where it records a thunk calling the kernel's ``warmup`` with the launch's arguments and grid."""
    import threading

    from fgcompile.kernels.triton_common import collect_compiles, launch

    calls = []

    class Kernel:
        __name__ = "k"

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(("launch", grid, a, kw))

        def warmup(self, *a, grid, **kw):
            calls.append(("warmup", grid, a, kw))

    k = Kernel()
    launch(k, (2, 3), 1, X=4)
    assert calls == [("launch", (2, 3), (1,), {"X": 4})]
    with collect_compiles() as thunks:
        launch(k, (5,), 7, X=8)
        other = threading.Thread(target=launch, args=(k, (9,), 0))  # another thread launches as usual
        other.start()
        other.join()
        with collect_compiles() as inner:
            launch(k, (6,), 1)
        assert len(inner) == 1
    assert calls[1:] == [("launch", (9,), (0,), {})] and len(thunks) == 1
    thunks[0]()
    assert calls[-1] == ("warmup", (5,), (7,), {"X": 8})
    launch(k, (1,))  # outside again: launches
    assert calls[-1][0] == "launch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_forward_lse_matches_float64(dtype):
    """PyTorch's fused attention (the CPU flash op here; cuDNN / flash on CUDA) as the profiled
    call's forward: output and base-2 log-sum-exp against float64 math, GQA included."""
    from fgcompile.kernels.sdpa_forward import dense_forward_lse

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 70, 32, generator=g).to(DEV, dtype)
    k, v = (torch.randn(2, 2, 50, 32, generator=g).to(DEV, dtype) for _ in range(2))
    got = dense_forward_lse(q, k, v, 0.2)
    assert got is not None
    out, lse2 = got
    kk, vv = (t.double().repeat_interleave(2, dim=1) for t in (k, v))
    s = q.double() @ kk.transpose(-1, -2) * 0.2
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert lse2.dtype == torch.float32 and lse2.shape == (2, 4, 70)
    torch.testing.assert_close(lse2.double(), torch.logsumexp(s, -1) / math.log(2), atol=tol, rtol=0)
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ vv, atol=tol, rtol=tol)


def test_sdpa_forward_skips_a_backend_that_fails_its_check(monkeypatch, caplog):
    """A backend whose log-sum-exp is off (or that raises) is not used: the caller gets None and
    runs the Triton forward; the check runs once per backend, device, dtype and head dim."""
    from fgcompile.kernels import sdpa_forward

    calls = []

    def wrong(q, k, v, scale):
        calls.append(1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
        return out, lse * 2  # not a natural-log log-sum-exp

    monkeypatch.setattr(sdpa_forward, "_CHECKED", {})
    monkeypatch.setitem(sdpa_forward._BACKENDS, "cpu", [("wrong", "_scaled_dot_product_flash_attention_for_cpu", wrong)])
    q = torch.randn(1, 2, 40, 16)
    with caplog.at_level("INFO", logger="fgcompile"):
        assert sdpa_forward.dense_forward_lse(q, q, q, 0.25) is None
        assert sdpa_forward.dense_forward_lse(q, q, q, 0.25) is None
    assert len(calls) == 1 and "wrong attention" in caplog.text  # checked once, never run on the input

    def raises(q, k, v, scale):
        raise RuntimeError("no kernel for this head dim")

    monkeypatch.setitem(sdpa_forward._BACKENDS, "cpu", [("raises", "_scaled_dot_product_flash_attention_for_cpu", raises)])
    assert sdpa_forward.dense_forward_lse(q, q, q, 0.25) is None


def test_sdpa_forward_setting(monkeypatch, caplog):
    from fgcompile.kernels.sdpa_forward import wanted

    monkeypatch.delenv("FGCOMPILE_PROFILE_FORWARD", raising=False)
    assert not wanted()
    monkeypatch.setenv("FGCOMPILE_PROFILE_FORWARD", "sdpa")
    assert wanted()
    monkeypatch.setenv("FGCOMPILE_PROFILE_FORWARD", "cudnn")
    with caplog.at_level("WARNING", logger="fgcompile"):
        assert not wanted()
    assert "FGCOMPILE_PROFILE_FORWARD" in caplog.text


@needs_interp
@pytest.mark.parametrize("padded", [False, True])
def test_profile_bits_with_sdpa_forward(monkeypatch, padded):
    """FGCOMPILE_PROFILE_FORWARD=sdpa: the profiled call's output and bitmap equal those of the
    Triton forward (key padding: the Triton forward runs either way)."""
    from fgcompile.attention import profile_attention_bits

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 150, 32, generator=g).to(DEV) for _ in range(3))
    kp = None
    if padded:
        kp = torch.ones(1, 150, dtype=torch.bool, device=DEV)
        kp[:, 120:] = False
    monkeypatch.setenv("FGCOMPILE_PROFILE_FORWARD", "triton")
    ref = profile_attention_bits(q, k, v, alpha=0.5, block_m=64, key_padding=kp, impl="triton")
    from fgcompile.kernels import triton_profile

    used = []
    real = triton_profile.dense_forward_lse
    monkeypatch.setattr(triton_profile, "dense_forward_lse", lambda *a: used.append(real(*a)) or used[-1])
    monkeypatch.setenv("FGCOMPILE_PROFILE_FORWARD", "sdpa")
    got = profile_attention_bits(q, k, v, alpha=0.5, block_m=64, key_padding=kp, impl="triton")
    assert len(used) == (0 if padded else 1) and all(u is not None for u in used)  # padded: never asked
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4)
    mismatch = (got[1] ^ ref[1]).ne(0).sum().item()
    assert mismatch <= 2, mismatch  # a few ulps of the threshold may straddle
    assert (got[2] - ref[2]).abs().max().item() <= 2


_GLUON_COMPILE_SCRIPT = r"""
import json, re
from fgcompile.kernels import gluon_sparse_sm90 as g
out = []
for d, stages in ((128, 3), (64, 4), (128, 2)):
    ck = g.compile_for_target_sm90(head_dim=d, stages=stages)
    ptx = ck.asm["ptx"]
    out.append({
        "d": d, "stages": stages,
        "cp_async_16": len(re.findall(r"cp\.async\.cg\.shared\.global[^\n]*0x10", ptx)),
        "cp_async_arrive": len(re.findall(r"cp\.async\.mbarrier\.arrive\.noinc", ptx)),
        "setmaxnreg": sorted({int(x) for x in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)}),
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "wgmma_waits": [int(x) for x in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)],
        "shared": ck.metadata.shared,
    })
print(json.dumps(out))
"""


def test_gluon_sm90_kernel_compiles_warp_specialised():
    """The Gluon sm_90 kernel builds for sm_90 on a machine without a GPU: its producer gathers K/V
    with 16-byte cp.async copies and signals them on mbarriers (``cp.async.mbarrier.arrive.noinc``),
    its partitions re-balance registers (setmaxnreg: the producer's 40, the consumers' 232), each
    consumer keeps one wgmma group in flight (``wait_group 1``: the P V product of the previous
    tile runs while the softmax of this one does), and its buffers fit Hopper's 227 KB of shared
    memory."""
    pytest.importorskip("triton.experimental.gluon")
    from fgcompile.kernels import gluon_sparse_sm90 as g

    for info in _compile_in_child(_GLUON_COMPILE_SCRIPT):
        rows = g.BLOCK_N * info["d"] * 2 // 16  # 16-byte rows of one K or V tile
        # per producer thread: one K and one V tile in the producer's loop; one arrive after each
        assert info["cp_async_16"] == 2 * rows // (32 * g.WS_PRODUCER_WARPS), info
        assert info["cp_async_arrive"] == 2, info
        assert {g.WS_PRODUCER_REGS, g.WS_CONSUMER_REGS} <= set(info["setmaxnreg"]), info
        assert info["wgmma"] > 0 and 1 in info["wgmma_waits"], info
        assert info["shared"] <= 227 * 1024, info


def test_gluon_sm90_launch_rejects_what_it_cannot_serve():
    """``launch_sparse_kernel_sm90`` raises a ValueError naming its inputs (not a compile error) on
    tensors ``sm90_supported`` rejects: here CPU tensors."""
    pytest.importorskip("triton.experimental.gluon")
    from fgcompile.kernels.gluon_sparse_sm90 import launch_sparse_kernel_sm90, sm90_supported

    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
    counts = torch.zeros(1, 2, 2, dtype=torch.int32)
    idx = torch.zeros(1, 2, 2, 256, dtype=torch.int32)
    assert not sm90_supported(q, q, q, q, 128, 1, 0)
    with pytest.raises(ValueError, match="q, k, v, out: expected"):
        launch_sparse_kernel_sm90(q, q, q, torch.empty_like(q), counts, idx, 0.1)


def test_gluon_sm90_launch_binds_every_kernel_argument(monkeypatch):
    """Without a GPU: inside ``collect_compiles`` the Gluon launcher records one compile thunk (it
    never runs the kernel on lists a scratch step left unwritten) whose positional arguments and
    constexprs are exactly the kernel's parameters, with the register split the kernel was
    measured with."""
    pytest.importorskip("triton.experimental.gluon")
    from fgcompile.kernels import gluon_sparse_sm90 as g
    from fgcompile.kernels.triton_common import collect_compiles

    monkeypatch.setattr(g, "sm90_supported", lambda *a, **k: True)
    q = torch.randn(2, 4, 300, 64, dtype=torch.bfloat16)
    kv = torch.randn(2, 2, 500, 64, dtype=torch.bfloat16)
    counts = torch.zeros(2, 4, 3, dtype=torch.int32)
    idx = torch.zeros(2, 4, 3, 8, dtype=torch.int32)
    with collect_compiles() as thunks:
        out = g.launch_sparse_kernel_sm90(q, kv, kv, torch.empty_like(q), counts, idx, 0.125, stages=2)
    assert len(thunks) == 1 and out.shape == q.shape
    t = thunks[0]
    names = g._fg_sparse_fwd_sm90_ws.arg_names
    kw = dict(t.keywords)
    assert kw.pop("grid") == (3 * 2 * 4,)
    assert kw.pop("maxnreg") == g.WS_MAXNREG
    assert list(names) == list(names[: len(t.args)]) + sorted(kw, key=list(names).index)
    assert len(t.args) + len(kw) == len(names)
    assert kw["HEAD_DIM"] == 64 and kw["STAGES"] == 2 and kw["num_warps"] == 4
    assert t.args[names.index("GROUP")] == 2  # GQA: 4 query heads on 2 kv heads
    with pytest.raises(ValueError, match="stages"):
        g.launch_sparse_kernel_sm90(q, kv, kv, torch.empty_like(q), counts, idx, 0.125, stages=1)


def _sm90_launch_case():
    """(q, k, v, packed, float64 reference, D) of one launch of ``launch_sm90``'s shape (128-row
    blocks of single keys, GQA, partial blocks)."""
    B, H, H_kv, S_q, S_kv, D = 1, 2, 1, 200, 300, 64
    q, k, v = _rand(B, H, H_kv, S_q, S_kv, D, device=DEV)
    keep = torch.rand(B, H, 2, S_kv, generator=torch.Generator().manual_seed(3)) < 0.3
    packed = pack_slices(keep.to(DEV), block_m=128, block_n=1, seq_len_kv=S_kv)
    return q, k, v, packed, _f64_sparse(q.cpu(), k.cpu(), v.cpu(), keep, 128, 1, D**-0.5), D


@needs_interp
def test_gluon_failure_falls_back_to_the_triton_kernel(monkeypatch, caplog):
    """``launch_sm90`` (the body of ``fgcompile::sparse_attention_sm90``): where the Gluon launch
    raises (here: made to), the Triton kernel computes the same lists' attention, one warning
    names the error, and later launches of that (device, dtype, head dim) skip the Gluon try."""
    from fgcompile.kernels import triton_sparse as ts

    tries = []

    def broken(*a, **k):
        tries.append(1)
        raise RuntimeError("PTX .version 9.9 does not support .target sm_90a")

    monkeypatch.setattr(ts, "launch_sparse_kernel_sm90", broken)
    monkeypatch.setattr(ts, "_SM90_FAILED", {})
    q, k, v, packed, ref, D = _sm90_launch_case()
    with caplog.at_level("WARNING", logger="fgcompile"):
        for _ in range(2):
            out = torch.full_like(q, float("nan"))
            ts.launch_sm90(q, k, v, out, packed.counts, packed.indices, D**-0.5)
            torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5, rtol=2e-5)
    assert len(tries) == 1
    warned = [r for r in caplog.records if "Gluon sm_90 kernel failed" in r.getMessage()]
    assert len(warned) == 1 and "PTX .version 9.9" in warned[0].getMessage()
    assert list(ts.sm90_failures().values()) == ["RuntimeError: PTX .version 9.9 does not support .target sm_90a"]


@needs_interp
def test_launch_the_gluon_kernel_cannot_take_runs_the_triton_kernel(monkeypatch, caplog):
    """``launch_sm90`` on tensors ``sm90_supported`` rejects (a graph of symbolic sizes chose the
    Gluon kernel at compile time; its real tensors do not fit, here CPU tensors): the Triton kernel
    computes that launch, with no warning and no failure recorded, so later launches that fit
    still take the Gluon kernel."""
    from fgcompile.kernels import triton_sparse as ts

    monkeypatch.setattr(ts, "_SM90_FAILED", {})
    q, k, v, packed, ref, D = _sm90_launch_case()
    out = torch.full_like(q, float("nan"))
    with caplog.at_level("WARNING", logger="fgcompile"):
        ts.launch_sm90(q, k, v, out, packed.counts, packed.indices, D**-0.5)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5, rtol=2e-5)
    assert ts.sm90_failures() == {} and "Gluon" not in caplog.text


def test_sm90_supported_on_symbolic_sizes():
    """At compile time (``symbolic=True``) sizes and strides that are SymInts pass the checks
    they cannot decide; every other check still applies, and without ``symbolic`` they fail."""
    import unittest.mock as mock

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fgcompile.kernels import gluon_sparse_sm90 as g

    env = ShapeEnv()
    s = env.create_unbacked_symint()
    with FakeTensorMode(shape_env=env, allow_non_fake_inputs=True):
        q = torch.empty(1, 2, 256, 128, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(1, 2, s, 128, dtype=torch.bfloat16, device="cuda")
        q32 = torch.empty(1, 2, 256, 128, dtype=torch.float32, device="cuda")
    with mock.patch.object(g, "sm90_device", lambda d: True), mock.patch.object(g, "HAVE_GLUON", True):
        assert g.sm90_supported(q, q, q, q, 128, 1, 0)
        assert g.sm90_supported(q, k, k, q, 128, 1, 0, symbolic=True)
        assert not g.sm90_supported(q, k, k, q, 128, 1, 0)
        assert not g.sm90_supported(q32, k, k, q32, 128, 1, 0, symbolic=True)  # dtype
        assert not g.sm90_supported(q, k, k, q, 64, 1, 0, symbolic=True)  # block_m
