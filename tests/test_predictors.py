"""The two sparsity predictors against brute-force float64 definitions, the density budget, argument
validation, and the synthetic attention suite."""

import math

import pytest
import torch

from fgcompile import predictors as P
from fgcompile.testing.synthetic import HEAD_KINDS, PATTERNS, make_attention_inputs, token_positions


# ----------------------------------------------------------------------------- brute force
def _inputs(B=2, H=4, H_kv=2, S_q=70, S_kv=45, D=16, seed=0, padding=False, dtype=torch.float64, gain=2.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, S_q, D, generator=g, dtype=torch.float64) * gain).to(dtype)
    k = (torch.randn(B, H_kv, S_kv, D, generator=g, dtype=torch.float64) * gain).to(dtype)
    kp = None
    if padding:
        kp = torch.rand(B, S_kv, generator=g) > 0.35
        kp[0, -7:] = False  # a padded tail, as text padding looks
    return q, k, kp


def _probs64(q, k, kp, scale):
    """Full softmax probabilities, float64, with GQA and key padding, by the textbook formula."""
    B, H = q.shape[:2]
    rep = H // k.shape[1]
    out = torch.zeros(B, H, q.shape[2], k.shape[2], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = q[b, h].double() @ k[b, h // rep].double().T * scale
            if kp is not None:
                s = s.masked_fill(~kp[b], float("-inf"))
            if kp is None or kp[b].any():
                out[b, h] = torch.softmax(s, -1)
    return out


def _profile_brute(q, k, kp, *, alpha, block_m, block_n, scale):
    """keep[b,h,i,j] = max over queries of block i, real keys of tile j of P > alpha / S_real,
    by loops. Also returns the margin |tile max - threshold| of every tile."""
    P64 = _probs64(q, k, kp, scale)
    B, H, S_q, S_kv = P64.shape
    nq, nk = math.ceil(S_q / block_m), math.ceil(S_kv / block_n)
    keep = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    margin = torch.full((B, H, nq, nk), float("inf"), dtype=torch.float64)
    for b in range(B):
        n_real = S_kv if kp is None else int(kp[b].sum())
        thr = alpha / n_real if n_real else float("inf")
        for h in range(H):
            for i in range(nq):
                for j in range(nk):
                    best = 0.0
                    for s in range(j * block_n, min(S_kv, (j + 1) * block_n)):
                        if kp is not None and not kp[b, s]:
                            continue
                        best = max(best, float(P64[b, h, i * block_m : (i + 1) * block_m, s].max()))
                    keep[b, h, i, j] = best > thr
                    margin[b, h, i, j] = abs(best - thr)
    return keep, margin


def _pooled_brute(q, k, kp, *, tau, gamma, block_m, block_n, scale):
    """The pooled top-CDF rule by loops: returns (exact keep, pooled probabilities p, the exact
    threshold probability per row)."""
    q, k = q.double(), k.double()
    B, H, S_q, D = q.shape
    S_kv = k.shape[2]
    rep = H // k.shape[1]
    nq, nk = math.ceil(S_q / block_m), math.ceil(S_kv / block_n)
    keep = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    probs = torch.zeros(B, H, nq, nk, dtype=torch.float64)
    thr = torch.zeros(B, H, nq, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kbar, valid = [], []
            for j in range(nk):
                rows = [s for s in range(j * block_n, min(S_kv, (j + 1) * block_n)) if kp is None or kp[b, s]]
                valid.append(bool(rows))
                kbar.append(k[b, h // rep, rows].mean(0) if rows else torch.zeros(D, dtype=torch.float64))
            kbar = torch.stack(kbar)
            valid = torch.tensor(valid)
            for i in range(nq):
                qs = q[b, h, i * block_m : (i + 1) * block_m]
                qbar = qs.mean(0)
                sim = torch.stack([torch.dot(t, qbar) / (t.norm() * qbar.norm()) for t in qs]).mean()
                logits = (kbar @ qbar * scale).masked_fill(~valid, float("-inf"))
                if not valid.any():
                    continue
                p = torch.softmax(logits, -1)
                probs[b, h, i] = p
                if sim < gamma:
                    keep[b, h, i] = valid
                    continue
                order = torch.argsort(p, descending=True)
                cum = 0.0
                for j in order.tolist():
                    if not valid[j]:
                        break
                    keep[b, h, i, j] = True
                    cum += float(p[j])
                    thr[b, h, i] = p[j]
                    if cum >= tau:
                        break
    return keep, probs, thr


CASES = [
    # (GQA, padding, block_n)
    (False, False, 1),
    (True, False, 4),
    (True, True, 1),
    (False, True, 4),
]


# ----------------------------------------------------------------------------- profile predictor
@pytest.mark.parametrize("gqa,padding,block_n", CASES)
def test_profile_matches_bruteforce(gqa, padding, block_n):
    q, k, kp = _inputs(H_kv=2 if gqa else 4, padding=padding, seed=block_n + 2 * padding)
    densities = []
    for alpha in (0.5, 4.0):
        keep = P.profile_slices(q, k, alpha=alpha, block_m=16, block_n=block_n, key_padding=kp)
        ref, margin = _profile_brute(q, k, kp, alpha=alpha, block_m=16, block_n=block_n, scale=0.25)
        assert keep.shape == ref.shape == (2, 4, 5, math.ceil(45 / block_n)) and keep.dtype == torch.bool
        clear = margin > 1e-6  # scores are float32
        assert clear.float().mean() > 0.99
        assert torch.equal(keep[clear], ref[clear])
        densities.append(ref.float().mean())
    assert 0.9 > densities[1] > 0.02 and densities[0] > densities[1] + 0.05  # non-trivial masks


def test_profile_float32_and_explicit_scale():
    q, k, kp = _inputs(padding=True, dtype=torch.float32, seed=5)
    keep = P.profile_slices(q, k, alpha=0.6, block_m=32, scale=0.1, key_padding=kp)
    ref, margin = _profile_brute(q, k, kp, alpha=0.6, block_m=32, block_n=1, scale=0.1)
    clear = margin > 1e-5
    assert torch.equal(keep[clear], ref[clear])


def test_profile_scores_definition_and_chunking(monkeypatch):
    from fgcompile.kernels import reference

    q, k, kp = _inputs(padding=True, S_q=77, seed=3)
    ref = _probs64(q, k, kp, 0.25)
    ref = torch.nn.functional.pad(ref, (0, 0, 0, 80 - 77)).view(2, 4, 5, 16, 45).amax(3)
    full = P.profile_scores(q, k, block_m=16, key_padding=kp)
    assert full.shape == (2, 4, 5, 45) and full.dtype == torch.float32
    torch.testing.assert_close(full.double(), ref, atol=1e-6, rtol=1e-5)
    assert (full[~kp[:, None, None, :].expand_as(full)] == 0).all()
    # Chunks of one query block: same result.
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 1)
    torch.testing.assert_close(P.profile_scores(q, k, block_m=16, key_padding=kp), full)


def test_profile_alpha_monotone_and_padding():
    q, k, kp = _inputs(padding=True, seed=4)
    kp[1] = False  # a batch element with no real key: nothing kept
    masks = [P.profile_slices(q, k, alpha=a, block_m=16, key_padding=kp) for a in (0.1, 0.5, 2.0, 8.0)]
    for small, large in zip(masks, masks[1:]):
        assert (large <= small).all()  # a larger alpha keeps a subset
    assert masks[0].float().mean() > masks[-1].float().mean()
    for m in masks:
        assert not (m & ~kp[:, None, None, :]).any()
        assert not m[1].any()


def test_keep_from_block_max_tiles():
    # Hand-made block maxima: S_kv = 6, alpha / S = 0.1.
    bm = torch.tensor([0.05, 0.2, 0.0, 0.09, 0.11, 0.3]).view(1, 1, 1, 6)
    assert P.keep_from_block_max(bm, alpha=0.6).view(-1).tolist() == [False, True, False, False, True, True]
    assert P.keep_from_block_max(bm, alpha=0.6, block_n=4).view(-1).tolist() == [True, True]
    # padding: 4 real keys -> threshold 0.15; key 1 padded (never kept), the tile max ignores it
    kp = torch.tensor([[True, False, True, True, False, True]])
    assert P.keep_from_block_max(bm, alpha=0.6, key_padding=kp).view(-1).tolist() == [False, False, False, False, False, True]
    assert P.keep_from_block_max(bm, alpha=0.6, block_n=2, key_padding=kp).view(-1).tolist() == [False, False, True]


# ----------------------------------------------------------------------------- pooled predictor
def _check_pooled(keep, ref, probs, thr, tau, valid_kb, dissimilar):
    assert keep.shape == ref.shape and keep.dtype == torch.bool
    assert (keep | ~ref).all(), "the exact top-CDF set must be kept"
    extra = keep & ~ref
    # Extra tiles only within the bisection's precision of the exact threshold (top_cdf's docstring):
    # (1 + ln(n / (1 - tau))) / 2**CDF_STEPS nats.
    nats = (1 + math.log(probs.shape[-1] / max(1 - tau, 1e-12))) / 2**P.CDF_STEPS
    assert (probs[extra] >= (thr[..., None].expand_as(probs)[extra]) * math.exp(-nats) * (1 - 1e-6)).all()
    mass = (probs * keep).sum(-1)
    rows = valid_kb.any(-1)
    assert (mass[rows] >= tau - 1e-9).all()
    assert not (keep & ~valid_kb).any()
    assert torch.equal(keep[dissimilar], valid_kb[dissimilar])


@pytest.mark.parametrize("gqa,padding,block_n", CASES)
@pytest.mark.parametrize("tau", [0.5, 0.9])
def test_pooled_matches_bruteforce(gqa, padding, block_n, tau):
    # Similar queries within a block (a shared component), so the top-CDF rule is exercised.
    q, k, kp = _inputs(H_kv=2 if gqa else 4, padding=padding, seed=10 + block_n, gain=1.0)
    q = q + 1.5 * torch.randn(1, 4, 1, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keep = P.pooled_slices(q, k, tau=tau, gamma=0.5, block_m=16, block_n=block_n, key_padding=kp)
    ref, probs, thr = _pooled_brute(q, k, kp, tau=tau, gamma=0.5, block_m=16, block_n=block_n, scale=0.25)
    nk = keep.shape[-1]
    if kp is None:
        valid = torch.ones_like(keep)
    else:
        v = torch.nn.functional.pad(kp, (0, nk * block_n - 45)).view(2, nk, block_n).any(-1)
        valid = v[:, None, None, :].expand_as(keep)
    sims = _sims(q, 16)
    _check_pooled(keep, ref, probs, thr, tau, valid, sims < 0.5)
    assert 0.02 < keep.float().mean() < 0.9
    assert (keep & ~ref).sum() <= 0.02 * keep.sum()  # the exact set, plus keys within the search grid of its threshold


def _sims(q, block_m):
    B, H, S, D = q.shape
    nq = math.ceil(S / block_m)
    out = torch.zeros(B, H, nq, dtype=torch.float64)
    for i in range(nq):
        qs = q[:, :, i * block_m : (i + 1) * block_m].double()
        qbar = qs.mean(2, keepdim=True)
        out[:, :, i] = torch.nn.functional.cosine_similarity(qs, qbar, dim=-1).mean(-1)
    return out


def test_pooled_gamma_fallback_and_tau_one():
    g = torch.Generator().manual_seed(7)
    D = 16
    k = torch.randn(1, 1, 40, D, generator=g, dtype=torch.float64)
    base = torch.randn(D, generator=g, dtype=torch.float64) * 3
    similar = base + 0.1 * torch.randn(16, D, generator=g, dtype=torch.float64)
    scattered = torch.randn(16, D, generator=g, dtype=torch.float64)  # mean cosine ~ 0.25
    q = torch.cat([similar, scattered]).view(1, 1, 32, D)
    keep = P.pooled_slices(q, k, tau=0.5, gamma=0.5, block_m=16)
    assert keep[0, 0, 1].all()  # dissimilar block: every key
    assert 0 < keep[0, 0, 0].sum() < 40  # similar block: the top-CDF set
    never = P.pooled_slices(q, k, tau=0.5, gamma=-1.0, block_m=16)
    assert not never[0, 0, 1].all()
    always = P.pooled_slices(q, k, tau=0.5, gamma=1.0, block_m=16)
    assert always.all()
    # tau = 1 keeps every real key block; padded ones never
    kp = torch.ones(1, 40, dtype=torch.bool)
    kp[0, 30:] = False
    one = P.pooled_slices(q, k, tau=1.0, gamma=-1.0, block_m=16, key_padding=kp)
    assert one[..., :30].all() and not one[..., 30:].any()
    assert P.pooled_slices(q, k, tau=1.0, block_m=16, block_n=4).all()


def test_top_cdf_exact_set():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 500, generator=g, dtype=torch.float64) * 3
    logits[:4, 100:] = float("-inf")
    logits[4] = float("-inf")  # nothing valid: nothing kept
    for tau in (0.3, 0.9, 0.999):
        keep = P.top_cdf(logits, tau, steps=40)  # enough steps for the exact set on these logits
        p = torch.softmax(logits[5:], -1)
        srt, order = p.sort(-1, descending=True)
        before = srt.cumsum(-1) - srt
        exact = torch.zeros_like(keep[5:]).scatter_(-1, order, before < tau)
        assert torch.equal(keep[5:], exact)
        assert not keep[4].any()
        assert not keep[:4, 100:].any()


# ----------------------------------------------------------------------------- density budget
def test_apply_density_bruteforce():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(2, 3, 4, 10, generator=g)
    keep = torch.rand(2, 3, 4, 10, generator=g) > 0.3
    for density in (0.1, 0.25, 0.5, 1.0):
        out = P.apply_density(keep, scores, density)
        budget = math.ceil(density * 10)
        for idx in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(4)).tolist():
            row_k, row_s, row_o = keep[tuple(idx)], scores[tuple(idx)], out[tuple(idx)]
            kept = sorted(torch.arange(10)[row_k].tolist(), key=lambda j: -float(row_s[j]))
            assert set(torch.arange(10)[row_o].tolist()) == set(kept[:budget])
    assert P.apply_density(keep, scores, None) is keep
    # ceil: 0.3 * 10 is 3 (not 4, despite 0.3 * 10 = 3.0000000000000004)
    assert P.apply_density(torch.ones(1, 1, 1, 10, dtype=torch.bool), scores[:1, :1, :1], 0.3).sum() == 3


def test_density_argument_of_both_predictors():
    q, k, kp = _inputs(padding=True, seed=8, gain=1.0)
    q = q + 2.0
    for block_n in (1, 4):
        full = P.profile_slices(q, k, alpha=0.3, block_m=16, block_n=block_n, key_padding=kp)
        capped = P.profile_slices(q, k, alpha=0.3, block_m=16, block_n=block_n, key_padding=kp, density=0.2)
        budget = math.ceil(0.2 * full.shape[-1])
        assert (capped <= full).all() and (capped.sum(-1) <= budget).all()
        assert (capped.sum(-1) == torch.minimum(full.sum(-1), torch.tensor(budget))).all()
        # the strongest tiles: apply_density on the tile maxima
        bm = P.profile_scores(q, k, block_m=16, key_padding=kp).masked_fill(~kp[:, None, None, :], 0)
        nk = full.shape[-1]
        tiles = torch.nn.functional.pad(bm, (0, nk * block_n - 45)).view(*bm.shape[:3], nk, block_n).amax(-1)
        assert torch.equal(capped, P.apply_density(full, tiles, 0.2))
        pooled = P.pooled_slices(q, k, tau=0.99, block_m=16, block_n=block_n, key_padding=kp, density=0.2)
        assert (pooled.sum(-1) <= budget).all() and pooled.any()
        assert (pooled <= P.pooled_slices(q, k, tau=0.99, block_m=16, block_n=block_n, key_padding=kp)).all()


def test_no_host_sync_meta_tensors():
    # Meta tensors have no data: any .item(), .nonzero(), boolean indexing or .cpu() would raise.
    q = torch.empty(2, 4, 300, 32, device="meta")
    k = torch.empty(2, 2, 200, 32, device="meta")
    kp = torch.empty(2, 200, dtype=torch.bool, device="meta")
    for block_n in (1, 4):
        a = P.profile_slices(q, k, block_m=64, block_n=block_n, key_padding=kp, density=0.5)
        b = P.pooled_slices(q, k, block_m=64, block_n=block_n, key_padding=kp, density=0.5)
        assert a.shape == b.shape == (2, 4, 5, math.ceil(200 / block_n)) and a.dtype == b.dtype == torch.bool


def test_half_precision_inputs():
    q, k, _ = _inputs(dtype=torch.float32, gain=1.0, seed=12)
    q = q + 1.5
    for dt in (torch.float16, torch.bfloat16):
        a = P.pooled_slices(q.to(dt), k.to(dt), tau=0.9, block_m=16)
        b = P.pooled_slices(q, k, tau=0.9, block_m=16)
        assert (a != b).float().mean() < 0.05
        pa = P.profile_slices(q.to(dt), k.to(dt), block_m=16)
        pb = P.profile_slices(q, k, block_m=16)
        assert (pa != pb).float().mean() < 0.05


# ----------------------------------------------------------------------------- validation
def _bad_calls():
    q, k, kp = _inputs(S_q=32, S_kv=20)
    yield "q", lambda: P.profile_slices(q[0], k)
    yield "q", lambda: P.pooled_slices(q.long(), k)
    yield "k", lambda: P.profile_slices(q, k[:, :, :, :8])
    yield "k", lambda: P.profile_slices(q, torch.cat([k, k[:, :1]], 1))  # 3 key heads for 4 query heads
    yield "k", lambda: P.pooled_slices(q, k[:1])
    yield "alpha", lambda: P.profile_slices(q, k, alpha=0)
    yield "alpha", lambda: P.profile_slices(q, k, alpha=float("nan"))
    yield "tau", lambda: P.pooled_slices(q, k, tau=0)
    yield "tau", lambda: P.pooled_slices(q, k, tau=1.5)
    yield "gamma", lambda: P.pooled_slices(q, k, gamma=2)
    yield "block_m", lambda: P.profile_slices(q, k, block_m=0)
    yield "block_m", lambda: P.pooled_slices(q, k, block_m=16.0)
    yield "block_n", lambda: P.pooled_slices(q, k, block_n=0)
    yield "block_n", lambda: P.keep_from_block_max(torch.zeros(1, 1, 1, 4), block_n=True)
    yield "scale", lambda: P.profile_slices(q, k, scale=-1.0)
    yield "key_padding", lambda: P.profile_slices(q, k, key_padding=torch.ones(2, 20))
    yield "key_padding", lambda: P.pooled_slices(q, k, key_padding=torch.ones(2, 21, dtype=torch.bool))
    yield "density", lambda: P.profile_slices(q, k, density=0)
    yield "density", lambda: P.pooled_slices(q, k, density=1.5)
    yield "density", lambda: P.apply_density(torch.ones(1, 1, 1, 2, dtype=torch.bool), torch.ones(1, 1, 1, 2), -1)
    yield "scores", lambda: P.apply_density(torch.ones(1, 1, 1, 2, dtype=torch.bool), torch.ones(1, 1, 1, 3), 0.5)
    yield "keep", lambda: P.apply_density(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), 0.5)
    yield "block_max", lambda: P.keep_from_block_max(torch.zeros(1, 4))


@pytest.mark.parametrize("name,call", list(_bad_calls()), ids=lambda x: x if isinstance(x, str) else "")
def test_errors_name_the_argument(name, call):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        call()


# ----------------------------------------------------------------------------- Triton selection kernel
_INTERP = __import__("os").environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.mark.skipif(not _INTERP and not torch.cuda.is_available(), reason="needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("gqa,padding,block_n", CASES)
@pytest.mark.parametrize("tau", [0.5, 0.9])
def test_pooled_bits_kernel_matches_bruteforce(gqa, padding, block_n, tau):
    from fgcompile.kernels.packing import pack_bits, unpack_bits
    from fgcompile.kernels.triton_pooled import pooled_select_bits_triton

    q, k, kp = _inputs(H_kv=2 if gqa else 4, padding=padding, seed=10 + block_n, gain=1.0, dtype=torch.float32)
    q = q + 1.5 * torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(1)).float()
    bits = P.pooled_bits(q, k, tau=tau, gamma=0.5, block_m=16, block_n=block_n, key_padding=kp, impl="triton")
    nk = math.ceil(45 / block_n)
    keep = unpack_bits(bits, nk)
    ref, probs, thr = _pooled_brute(q, k, kp, tau=tau, gamma=0.5, block_m=16, block_n=block_n, scale=0.25)
    if kp is None:
        valid = torch.ones_like(keep)
    else:
        valid = torch.nn.functional.pad(kp, (0, nk * block_n - 45)).view(2, nk, block_n).any(-1)[:, None, None, :].expand_as(keep)
    _check_pooled(keep, ref, probs, thr, tau, valid, _sims(q, 16) < 0.5)
    assert 0.02 < keep.float().mean() < 0.9
    # the torch definition on the same inputs; and the tiled (long-row) variant of the kernel
    assert torch.equal(bits, pack_bits(P.pooled_slices(q, k, tau=tau, gamma=0.5, block_m=16, block_n=block_n, key_padding=kp)))
    logits, dis, valid_kb = P._pooled_parts(q, k, gamma=0.5, block_m=16, block_n=block_n, scale=0.25, key_padding=kp)
    tiled = pooled_select_bits_triton(logits, valid_kb, dis, tau, P.CDF_STEPS, row_reg_max=16, tile=32)
    assert torch.equal(tiled, bits)


@pytest.mark.parametrize("arity,steps", P.CDF_PLANS)
def test_top_cdf_search_plans_of_equal_precision(arity, steps):
    """k-ary passes ((arity + 1) ** steps = 4,096 grid points) keep the set bisection keeps, and
    always at least tau of the mass; a bad arity is refused by name."""
    lg = torch.randn(64, 4000, generator=torch.Generator().manual_seed(1)) * 4
    lg[:3, 100:] = float("-inf")  # rows with few valid entries
    keep = P.top_cdf(lg, 0.9, steps=steps, arity=arity)
    assert torch.equal(keep, P.top_cdf(lg, 0.9))
    assert (torch.softmax(lg, -1) * keep).sum(-1).min() >= 0.9 - 1e-6
    with pytest.raises(ValueError, match="arity"):
        P.top_cdf(lg, 0.9, arity=0)


@pytest.mark.skipif(not _INTERP and not torch.cuda.is_available(), reason="needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("arity,steps", P.CDF_PLANS[1:])
@pytest.mark.parametrize("row_reg_max", [None, 16])
def test_pooled_select_kernel_kary_matches_top_cdf(arity, steps, row_reg_max):
    """The selection kernel's k-ary passes (rows in registers, and the tiled long-row variant)
    against the torch definition with the same plan, bit for bit."""
    from fgcompile.kernels.packing import pack_bits
    from fgcompile.kernels.triton_pooled import pooled_select_bits_triton

    g = torch.Generator().manual_seed(arity)
    logits = torch.randn(2, 3, 5, 300, generator=g) * 3
    valid = torch.rand(2, 300, generator=g) > 0.1
    dis = torch.rand(2, 3, 5, generator=g) < 0.2
    kw = dict(row_reg_max=row_reg_max, tile=64) if row_reg_max else {}
    bits = pooled_select_bits_triton(logits, valid, dis, 0.9, steps, arity=arity, **kw)
    keep = P.top_cdf(logits.masked_fill(~valid[:, None, None, :], float("-inf")), 0.9, steps=steps, arity=arity)
    keep = torch.where(dis[..., None], valid[:, None, None, :].expand_as(keep), keep)
    assert torch.equal(bits, pack_bits(keep))
    assert 0.05 < keep.float().mean() < 0.9


@pytest.mark.skipif(not _INTERP and not torch.cuda.is_available(), reason="needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("S,D,bm,dtype", [(70, 40, 16, torch.float32), (64, 64, 32, torch.bfloat16), (33, 16, 16, torch.float16)])
def test_pool_queries_kernel_matches_torch(S, D, bm, dtype):
    """The Triton pooling pass (mean query x scale, self-similarity flag) against the torch path,
    on a (B, S, H, D) layout seen as (B, H, S, D) (strided q), with a ragged last block."""
    from fgcompile.kernels.triton_pooled import pool_queries_triton

    g = torch.Generator().manual_seed(S)
    q = torch.randn(2, S, 3, D, generator=g).transpose(1, 2)
    q[:, 0, :bm] += 4 * torch.randn(D, generator=g)  # a self-similar block (kept by gamma)
    q = q.to(dtype)
    ref, ref_dis = P._pooled_queries(q, gamma=0.5, block_m=bm, scale=0.3, ct=torch.float32, out_dtype=torch.float32, kernel=False)
    got, dis = pool_queries_triton(q, bm, 0.5, 0.3, torch.float32)
    assert got.shape == ref.shape == (2, 3, -(-S // bm), D) and dis.dtype == torch.bool
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(dis, ref_dis)
    assert dis.any() and not dis.all()
    low, _ = pool_queries_triton(q, bm, 0.5, 0.3, dtype)
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), got, rtol=1e-2, atol=1e-3)  # rounding (the interpreter may truncate)


@pytest.mark.skipif(not _INTERP and not torch.cuda.is_available(), reason="needs TRITON_INTERPRET=1 or CUDA")
def test_pooled_bits_kernel_fallback_rows_and_tau_one():
    from fgcompile.kernels.packing import unpack_bits

    g = torch.Generator().manual_seed(7)
    D = 16
    k = torch.randn(1, 1, 40, D, generator=g)
    base = torch.randn(D, generator=g) * 3
    q = torch.cat([base + 0.1 * torch.randn(16, D, generator=g), torch.randn(16, D, generator=g)]).view(1, 1, 32, D)
    keep = unpack_bits(P.pooled_bits(q, k, tau=0.5, gamma=0.5, block_m=16, impl="triton"), 40)
    assert keep[0, 0, 1].all() and 0 < keep[0, 0, 0].sum() < 40
    kp = torch.ones(1, 40, dtype=torch.bool)
    kp[0, 30:] = False
    one = unpack_bits(P.pooled_bits(q, k, tau=1.0, gamma=-1.0, block_m=16, key_padding=kp, impl="triton"), 40)
    assert one[..., :30].all() and not one[..., 30:].any()
    # a density budget takes the torch path (same answer as pack_bits(pooled_slices))
    d = P.pooled_bits(q, k, tau=0.9, block_m=16, density=0.2, impl="triton")
    assert torch.equal(unpack_bits(d, 40), P.pooled_slices(q, k, tau=0.9, block_m=16, density=0.2))


def test_profile_bits_torch_paths():
    from fgcompile.kernels.packing import unpack_bits

    q, k, kp = _inputs(padding=True, seed=6, dtype=torch.float32)
    v = torch.randn_like(k)
    for block_n, density in ((1, None), (4, None), (1, 0.3)):
        out, bits, d = P.profile_bits(q, k, v, alpha=0.5, block_m=16, block_n=block_n, key_padding=kp, density=density, impl="reference")
        keep = P.profile_slices(q, k, alpha=0.5, block_m=16, block_n=block_n, key_padding=kp, density=density)
        assert torch.equal(unpack_bits(bits, keep.shape[-1]), keep)
        torch.testing.assert_close(d, keep.float().mean(dim=(0, 2, 3)))
        assert out.shape == q.shape


# ----------------------------------------------------------------------------- CUDA path
@pytest.mark.gpu
def test_cuda_matches_cpu():
    q, k, kp = _inputs(S_q=300, S_kv=260, D=64, padding=True, dtype=torch.float32, gain=0.6, seed=20)
    dev = [t.cuda() for t in (q, k, kp)]
    a = P.profile_scores(*dev[:2], block_m=64, key_padding=dev[2])
    b = P.profile_scores(q, k, block_m=64, key_padding=kp)
    torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-3)
    pa = P.pooled_slices(*dev[:2], block_m=64, key_padding=dev[2]).cpu()
    pb = P.pooled_slices(q, k, block_m=64, key_padding=kp)
    assert (pa != pb).float().mean() < 0.01


# ----------------------------------------------------------------------------- synthetic suite
def test_synthetic_deterministic_and_shapes():
    a = make_attention_inputs(2, 4, 6, heads=5, head_dim=32, text_tokens=3, batch=2, seed=1)
    b = make_attention_inputs(2, 4, 6, heads=5, head_dim=32, text_tokens=3, batch=2, seed=1)
    c = make_attention_inputs(2, 4, 6, heads=5, head_dim=32, text_tokens=3, batch=2, seed=2)
    q, k, v = a
    assert q.shape == k.shape == v.shape == (2, 5, 51, 32) and q.dtype == torch.float32
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and not torch.equal(x, z)
    assert not torch.equal(q[0], q[1])  # batch elements differ
    assert a.info.head_patterns == HEAD_KINDS and a.info.seq_len == 51 and a.info.grid == (2, 4, 6)
    assert a.info == b.info
    h = make_attention_inputs(2, 4, 6, heads=2, head_dim=32, dtype=torch.float16, seed=1)
    assert h.q.dtype == torch.float16 and h.info.head_patterns == ("local", "temporal")
    assert set(PATTERNS) == {"local", "temporal", "sink", "mixed"}
    with pytest.raises(ValueError, match="^pattern: expected"):
        make_attention_inputs(2, 4, 6, heads=2, pattern="global")
    with pytest.raises(ValueError, match="^heads: expected"):
        make_attention_inputs(2, 4, 6, heads=0)


@pytest.fixture(scope="module")
def suite_probs():
    grid = (6, 10, 12)
    case = make_attention_inputs(*grid, heads=5, text_tokens=8, seed=3)
    q, k, _ = case
    probs = torch.softmax(q[0] @ k[0].transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return case.info, probs


def test_synthetic_patterns_have_their_structure(suite_probs):
    info, probs = suite_probs
    n = info.video_tokens
    pos = token_positions(*info.grid)
    d = (pos[:, None] - pos[None]).abs()
    near = d.max(-1).values <= 2  # 3D Chebyshev radius 2: 125 of 720 tokens
    same_pos = (d[..., 1] == 0) & (d[..., 2] == 0)  # same (h, w), any frame: 6 of 720
    p = probs[:, :n]  # video queries
    local_mass = (p[..., :n] * near).sum(-1).mean(-1)
    same_mass = (p[..., :n] * same_pos).sum(-1).mean(-1)
    sink_mass = p[..., list(info.sinks)].sum(-1).mean(-1)
    kinds = dict(zip(info.head_patterns, range(5)))
    L, T, S = kinds["local"], kinds["temporal"], kinds["sink"]
    assert local_mass[L] > 0.7 and same_mass[L] < 0.3
    assert same_mass[T] > 0.5 and same_mass[T] > 3 * same_mass[L]
    assert sink_mass[S] > 0.6 and sink_mass[L] < 0.05 and sink_mass[T] < 0.05
    assert local_mass[kinds["local+temporal"]] > 0.6 and same_mass[kinds["local+temporal"]] > 0.3
    assert local_mass[kinds["local+sink"]] > 0.4 and sink_mass[kinds["local+sink"]] > 0.2
    # Text keys get some mass; text queries have no position: without sinks they attend broadly.
    text_mass = probs[:, :n, n:].sum(-1).mean(-1)
    assert (text_mass < 0.2).all() and (text_mass > 0.001).all()
    assert (probs[[L, T], n:].max(-1).values.mean(-1) < 0.3).all()
    # Peaky but not degenerate: 90% of the mass on < 15% of the keys, 99% needs > 10% of them.
    srt = p.sort(-1, descending=True).values.cumsum(-1)
    frac90 = ((srt < 0.9).sum(-1) + 1).float().mean(-1) / probs.shape[-1]
    frac99 = ((srt < 0.99).sum(-1) + 1).float().mean(-1) / probs.shape[-1]
    assert (frac90 < 0.15).all() and (frac99 > 0.1).all()


def test_synthetic_single_pattern_heads():
    case = make_attention_inputs(4, 6, 6, heads=2, pattern="sink", seed=0)
    q, k, _ = case
    assert case.info.head_patterns == ("sink", "sink") and len(case.info.sinks) == 4
    p = torch.softmax(q[0] @ k[0].transpose(-1, -2) / 8, -1)
    assert (p[..., list(case.info.sinks)].sum(-1).mean(-1) > 0.6).all()


def test_config_takes_numpy_scalars():
    """numpy integer and float scalars (e.g. from a sweep over np.linspace) are plain numbers."""
    np = pytest.importorskip("numpy")
    from fgcompile import FGAttnConfig

    cfg = FGAttnConfig(block_m=np.int64(64), alpha=np.float32(0.5), dense_calls=np.int32(2))
    assert (cfg.block_m, cfg.alpha, cfg.dense_calls) == (64, 0.5, 2)
    assert type(cfg.block_m) is int and type(cfg.alpha) is float
    with pytest.raises(ValueError, match="FGAttnConfig.block_m"):
        FGAttnConfig(block_m=np.int64(48))


def _benchmark_module(name: str):
    """Import ``benchmarks/<name>.py`` (a script directory, not a package)."""
    import importlib
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_quality_bench_top_key_mass_and_density_at():
    """benchmarks/quality.py's calibration statistic (mean softmax mass of each query's top
    fraction of keys, per head) against a brute-force sort, and its 1%-error interpolation."""
    quality = _benchmark_module("quality")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 50, 8, generator=g), torch.randn(2, 3, 40, 8, generator=g)
    got = quality.top_key_mass(q, k, 0.7, fraction=0.25, chunk=7)
    p = torch.softmax(q @ k.transpose(-1, -2) * 0.7, -1).sort(-1, descending=True).values[..., :10].sum(-1)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), p.mean((0, 2)).double(), rtol=1e-5, atol=1e-6)
    assert quality.top_key_mass(q, k, 0.7, fraction=1.0) == pytest.approx([1.0] * 3)
    d, exact = quality.density_at([(0.2, 0.04), (0.5, 0.005), (0.3, 0.02)])
    assert exact and 0.3 < d < 0.5
    assert quality.density_at([(0.2, 0.001)]) == (0.2, False)
    assert quality.density_at([(0.2, 0.5)]) == (None, False)


def test_equal_error_bench_search_alpha():
    """benchmarks/equal_error_bench.py's bisection: the largest alpha whose error is within the
    target, for an error that grows with alpha; None when even the smallest alpha misses it."""
    import math

    eeb = _benchmark_module("equal_error_bench")
    err = lambda a: 0.001 * a  # noqa: E731  (error 1% at alpha 10)
    alpha, seen = eeb.search_alpha(err, 0.01, steps=20)
    assert err(alpha) <= 0.01 and alpha == pytest.approx(10.0, rel=1e-3) and alpha in seen
    assert len(seen) == 22 and all(math.isfinite(e) for e in seen.values())
    assert eeb.search_alpha(lambda a: 1.0, 0.01, steps=5)[0] is None
    assert eeb.search_alpha(lambda a: 0.0, 0.01, steps=5)[0] == 1e4
    assert eeb.savings({"128x1": {"density": 0.6}, "128x128": {"density": 0.8}, "32x1": {}}) == \
        pytest.approx({"128x1": 0.25, "128x128": 0.0})


def test_quality_cross_metric_measures_logit_differences():
    """benchmarks/quality.py's cross_metric: the squared distance of two mapped rows is the sum over
    the other tensor's centred rows of their squared logit difference, per (b, h)."""
    quality = _benchmark_module("quality")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g) * 3 + 1
    m = quality.cross_metric(x, y)
    assert m.shape == x.shape and m.dtype == torch.float32
    diff = x[:, :, :, None] - x[:, :, None, :]  # (B, H, S, S, D)
    yc = y - y.mean(2, keepdim=True)
    logit_sq = (diff @ yc[:, :, None].transpose(-1, -2)).pow(2).sum(-1)  # (B, H, S, S)
    dist_sq = (m[:, :, :, None] - m[:, :, None, :]).pow(2).sum(-1)
    torch.testing.assert_close(dist_sq, logit_sq, rtol=1e-4, atol=1e-3)
