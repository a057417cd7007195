"""The Triton kernels on a GPU (bf16/fp16 numerics the CPU interpreter cannot check): fresh random
inputs each time, outputs poisoned with NaN before the launch (every element must be written),
relative error against float64 under 1e-2."""

from __future__ import annotations

import pytest
import torch

from fgcompile.attention import pack_slices, profile_attention, sparse_attention
from fgcompile.testing.metrics import rel_err
from fgcompile.kernels import reference
from fgcompile.kernels.triton_sparse import TUNE_SPACE, sparse_attention_triton

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    # one default config for the shape sweep (autotuning every shape would compile ~8 configs
    # each); the tuned configs themselves are checked one by one below.
    monkeypatch.setenv("FGCOMPILE_AUTOTUNE", "0")


def _inputs(B, H, H_kv, S_q, S_kv, D, dtype):
    # fresh random data each call (no fixed seed): the kernel must compute the same function on any input
    q = torch.randn(B, H, S_q, D, device="cuda", dtype=dtype)
    k = torch.randn(B, H_kv, S_kv, D, device="cuda", dtype=dtype)
    v = torch.randn(B, H_kv, S_kv, D, device="cuda", dtype=dtype)
    return q, k, v


def _mask(B, H, S_q, S_kv, bm, bn, density):
    keep = torch.rand(B, H, -(-S_q // bm), -(-S_kv // bn), device="cuda") < density
    keep[:, :, 1] = False  # some query blocks keep nothing
    if keep.shape[-1] * bn >= 256:
        keep[:, :, 0, : 256 // bn] = True  # and some fully kept tiles
    return keep


def _rel64(out, q, k, v, keep, bm, bn, scale):
    ref = reference.sparse_attention_reference(q.double(), k.double(), v.double(), keep, bm, bn, scale)
    return rel_err(out, ref)


@pytest.mark.parametrize(
    "B,H,H_kv,S_q,S_kv,D,bm,bn,density,dtype",
    [
        (1, 4, 4, 4096, 4096, 128, 128, 1, 0.3, torch.bfloat16),
        (2, 4, 2, 4100, 4099, 64, 128, 1, 0.5, torch.bfloat16),
        (1, 4, 1, 2000, 3000, 96, 64, 1, 0.2, torch.bfloat16),
        (1, 2, 2, 4096, 4096, 128, 128, 16, 0.3, torch.bfloat16),
        (2, 2, 1, 1500, 1777, 96, 128, 16, 0.4, torch.float16),
        (1, 2, 2, 1024, 1024, 64, 64, 1, 1.0, torch.float16),
        (1, 2, 2, 1024, 1000, 128, 32, 1, 0.3, torch.float32),
        (1, 2, 2, 2048, 2048, 128, 128, 1, 0.02, torch.bfloat16),  # every list shorter than a tile
    ],
)
@pytest.mark.parametrize("pad_tail", ["0", "1"])
def test_sparse_kernel_vs_float64(B, H, H_kv, S_q, S_kv, D, bm, bn, density, dtype, pad_tail, monkeypatch):
    monkeypatch.setenv("FGCOMPILE_PAD_TAIL", pad_tail)  # masked tail step / padded last tile
    q, k, v = _inputs(B, H, H_kv, S_q, S_kv, D, dtype)
    keep = _mask(B, H, S_q, S_kv, bm, bn, density)
    scale = D ** -0.5
    packed = pack_slices(keep, block_m=bm, block_n=bn, seq_len_kv=S_kv)
    out = torch.full((B, H, S_q, D), float("nan"), device="cuda", dtype=dtype)
    sparse_attention_triton(q, k, v, packed, scale, out=out)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "the launcher left elements unwritten"
    rel = _rel64(out, q, k, v, keep, bm, bn, scale)
    assert rel < 1e-2, rel
    assert torch.all(out[:, :, bm : 2 * bm] == 0)
    # the public API, strided (B, S, H, D) views, a fresh draw
    base = torch.randn(3, B, S_kv, H_kv, D, device="cuda", dtype=dtype)
    kk, vv = base[1].transpose(1, 2), base[2].transpose(1, 2)
    qq = torch.randn(B, S_q, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    out2 = sparse_attention(qq, kk, vv, keep, block_m=bm, block_n=bn)
    assert _rel64(out2, qq, kk, vv, keep, bm, bn, scale) < 1e-2


@pytest.mark.parametrize("cfg", TUNE_SPACE, ids=lambda c: f"N{c[0]}w{c[1]}s{c[2]}f{c[3]}")
@pytest.mark.parametrize("bn", [1, 16])
def test_every_tuned_config(cfg, bn):
    B, H, S, D, bm = 1, 4, 4096, 128, 128
    q, k, v = _inputs(B, H, H, S, S, D, torch.bfloat16)
    keep = _mask(B, H, S, S, bm, bn, 0.3)
    packed = pack_slices(keep, block_m=bm, block_n=bn, seq_len_kv=S)
    out = torch.full_like(q, float("nan"))
    try:
        sparse_attention_triton(q, k, v, packed, D ** -0.5, out=out, config=dict(BLOCK_N=cfg[0], num_warps=cfg[1], num_stages=cfg[2], FULL_N=cfg[3]))
    except Exception as e:  # a config the autotuner would skip (out of resources) is not a failure
        if "OutOfResources" in type(e).__name__ or "out of resource" in str(e):
            pytest.skip(f"config does not fit: {e}")
        raise
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert _rel64(out, q, k, v, keep, bm, bn, D ** -0.5) < 1e-2


@pytest.mark.parametrize(
    "B,H,H_kv,S_q,S_kv,D,bm,padded",
    [(1, 4, 4, 4096, 4096, 128, 128, False), (2, 4, 2, 1000, 1100, 96, 64, True), (1, 2, 2, 512, 700, 64, 128, True)],
)
@pytest.mark.parametrize("forward", ["triton", "sdpa"])
def test_profile_kernel_vs_reference(monkeypatch, B, H, H_kv, S_q, S_kv, D, bm, padded, forward):
    """Also with FGCOMPILE_PROFILE_FORWARD=sdpa: the dense forward and its log-sum-exp from
    PyTorch's cuDNN / flash attention (which must then be the path taken without key padding)."""
    from fgcompile.kernels import sdpa_forward

    monkeypatch.setenv("FGCOMPILE_PROFILE_FORWARD", forward)
    q, k, v = _inputs(B, H, H_kv, S_q, S_kv, D, torch.bfloat16)
    kp = (torch.rand(B, S_kv, device="cuda") < 0.8) if padded else None
    if forward == "sdpa" and not padded:
        assert sdpa_forward.dense_forward_lse(q, k, v, D ** -0.5) is not None, sdpa_forward._CHECKED
    out, probs = profile_attention(q, k, v, block_m=bm, key_padding=kp)
    torch.cuda.synchronize()
    assert not out.isnan().any() and not probs.isnan().any()
    ref_out = reference.dense_attention_reference(q.double(), k.double(), v.double(), D ** -0.5, kp)
    ref_p = reference.block_max_probs_reference(q.double(), k.double(), bm, D ** -0.5, kp)
    assert rel_err(out, ref_out) < 1e-2
    assert rel_err(probs, ref_p) < 1e-2
    # the predictor's threshold alpha / S_kv: the same decisions up to rounding near the threshold
    thr = 0.5 / S_kv
    disagree = ((probs > thr) != (ref_p > thr)).float().mean().item()
    assert disagree < 1e-3, disagree
    if padded:
        assert torch.all(probs[~kp[:, None, None, :].expand_as(probs)] == 0)


# ----------------------------------------------------------------------------- run-time overhead kernels
@pytest.mark.parametrize("B,H,nqb,S_kv,bn,full_tile", [(2, 3, 17, 5000, 1, 128), (1, 4, 9, 4099, 4, 16), (1, 2, 5, 3000, 1, 0), (1, 2, 3, 100, 1, 128)])
def test_packed_from_bits_kernel_equals_torch(B, H, nqb, S_kv, bn, full_tile):
    from fgcompile.kernels import packing

    nkb = -(-S_kv // bn)
    keep = torch.rand(B, H, nqb, nkb, device="cuda") < torch.rand(B, H, nqb, 1, device="cuda")
    keep[:, :, 0] = True
    keep[:, :, 1] = False
    words = packing.pack_bits(keep)  # the Triton kernel on CUDA
    assert torch.equal(words, packing.pack_bits(keep, impl="torch"))
    a = packing.packed_from_bits(words, nkb, 128, bn, S_kv, full_tile)
    b = packing.packed_from_bits(words, nkb, 128, bn, S_kv, full_tile, impl="torch")
    for name in ("counts", "indices", "full_counts", "full_tiles"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.full_tile == b.full_tile


@pytest.mark.parametrize("B,H,H_kv,S_q,S_kv,D,bm,padded", [(1, 4, 4, 2048, 3000, 128, 128, False), (2, 4, 2, 1000, 1100, 64, 64, True)])
def test_profile_bits_fused_equals_float_path(B, H, H_kv, S_q, S_kv, D, bm, padded):
    from fgcompile import predictors
    from fgcompile.attention import profile_attention_bits
    from fgcompile.kernels import packing

    q, k, v = _inputs(B, H, H_kv, S_q, S_kv, D, torch.bfloat16)
    q = q * 6.0  # peaked rows (logit std 6): a non-trivial mask; plain randn rows are near uniform: all kept
    kp = (torch.rand(B, S_kv, device="cuda") < 0.8) if padded else None
    out, bits, kept = profile_attention_bits(q, k, v, alpha=0.5, block_m=bm, key_padding=kp)
    out2, probs = profile_attention(q, k, v, block_m=bm, key_padding=kp)
    keep = predictors.keep_from_block_max(probs, alpha=0.5, key_padding=kp)
    got = packing.unpack_bits(bits, S_kv)
    assert torch.equal(kept, got.sum(-1, dtype=torch.int32))
    # log2-scale comparison in the kernel: only probabilities within ulps of the threshold may differ
    thr = (0.5 / (kp.sum(-1) if padded else torch.full((B,), S_kv, device="cuda"))).float()[:, None, None, None]
    near = (probs - thr).abs() <= 1e-5 * thr
    assert torch.equal(got[~near], keep[~near])
    assert (got != keep).float().mean().item() < 1e-5
    assert torch.equal(out, out2)
    assert 0.01 < keep.float().mean().item() < 0.99


@pytest.mark.parametrize("S_q,S_kv,H_kv,padded,tau", [(2048, 4096, 4, False, 0.9), (1000, 3000, 2, True, 0.5), (512, 40000, 4, False, 0.95)])
def test_pooled_bits_kernel_vs_torch(S_q, S_kv, H_kv, padded, tau):
    from fgcompile import predictors
    from fgcompile.kernels import packing

    B, H, D = 1, 4, 128
    q, k, _ = _inputs(B, H, H_kv, S_q, S_kv, D, torch.bfloat16)
    q = q + 2.0 * torch.randn(1, H, 1, D, device="cuda", dtype=torch.bfloat16)  # self-similar blocks
    kp = (torch.rand(B, S_kv, device="cuda") < 0.8) if padded else None
    bits = predictors.pooled_bits(q, k, tau=tau, block_m=128, key_padding=kp)
    keep = predictors.pooled_slices(q, k, tau=tau, block_m=128, key_padding=kp)
    got = packing.unpack_bits(bits, S_kv)
    # the same logits; only the order of the normaliser's sum differs: near-threshold keys at most
    assert (got != keep).float().mean().item() < 1e-4
    assert 0.001 < got.float().mean().item() < 0.9


@pytest.mark.parametrize(
    "B,H,H_kv,S_q,S_kv,D,density,dtype,layout",
    [
        (2, 4, 4, 1000, 1000, 128, 0.3, torch.bfloat16, "bhsd"),  # partial query block and tiles
        (1, 2, 2, 1024, 1024, 128, 1.0, torch.bfloat16, "bhsd"),  # exact tiles
        (1, 3, 3, 640, 2048, 128, 0.02, torch.bfloat16, "bhsd"),  # every list shorter than a tile
        (2, 4, 2, 777, 1500, 64, 0.4, torch.float16, "bhsd"),  # GQA, head dim 64, cross lengths
        (1, 6, 6, 900, 900, 128, 0.5, torch.bfloat16, "bshd"),  # (B, S, H, D) views
    ],
)
@pytest.mark.parametrize("stages", [3, 2])
def test_gluon_sm90_kernel_vs_float64(B, H, H_kv, S_q, S_kv, D, density, dtype, layout, stages):
    """The Gluon sm_90 kernel (what compiled models run on Hopper) against float64, poisoned
    outputs, empty query blocks, partial last tiles."""
    from fgcompile.kernels.gluon_sparse_sm90 import launch_sparse_kernel_sm90, sm90_supported

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel is for sm_90")

    def make(h, s):
        if layout == "bshd":
            return torch.randn(B, s, h, D, device="cuda", dtype=dtype).transpose(1, 2)
        return torch.randn(B, h, s, D, device="cuda", dtype=dtype)

    q, k, v = make(H, S_q), make(H_kv, S_kv), make(H_kv, S_kv)
    keep = torch.rand(B, H, -(-S_q // 128), S_kv, device="cuda") < density
    keep[:, :, 1 % keep.shape[2]] = False  # a query block with nothing kept writes zeros
    packed = pack_slices(keep, block_m=128, seq_len_kv=S_kv, full_tile=0)
    out = torch.full((B, H, S_q, D), float("nan"), device="cuda", dtype=dtype)
    assert sm90_supported(q, k, v, out, 128, 1, 0)
    launch_sparse_kernel_sm90(q, k, v, out, packed.counts, packed.indices, D ** -0.5, stages=stages)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "the kernel left elements unwritten"
    assert _rel64(out, q, k, v, keep, 128, 1, D ** -0.5) < 1e-2
    assert torch.all(out[:, :, 128:256] == 0)
