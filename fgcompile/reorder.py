"""Which queries share a query block: an order of the queries that makes each block's queries alike.

A slice (query block i, key j) is kept when ANY query of block i attends to key j, so a block whose
queries attend to different keys keeps the union of their keys. In the token order of a video DiT
(raster: frame, row, column) a block of 128 consecutive queries of a 30 x 52 frame spans about 2.5
whole rows, and the union of their local windows covers every column. Attention is equivariant in
its queries: computing it on reordered queries and putting the output rows back gives the same
output. So the profile predictor may group alike queries into blocks first; their slices' union is
smaller, and fewer slices reach the same error (``benchmarks/quality.py --query-order``).
``FGAttnConfig(query_order="pca")`` makes the compiled model do this.

:func:`query_order` ("pca", grid-free): per batch item and head, recursive bisection of the query
vectors along their principal direction (power iteration on the centred scatter matrix of each
group, made in one pass over its rows), split at a whole number of blocks, until every group is
one block. Queries close in Euclidean distance have close logits on every key
(``|(q1 - q2) . k| <= |q1 - q2| |k|``), so close queries have alike attention rows; the order
needs no knowledge of the video's grid. The group sizes at each level depend only on ``S_q`` and
``block_m`` (a group of ``n`` blocks splits into ``n // 2`` and the rest; the last block, when
``S_q`` is not a multiple of ``block_m``, stays in the last group), so every level is a few
batched tensor operations over all groups, batch items and heads. The
bisection works on the queries projected onto their ``RANK`` (16) leading principal directions per
(b, h), found once from a strided sample of the rows: on the suite this keeps the same slices at
the same error as the full head dim, at a fraction of the work.

Layout: ``perm`` int64 (B, H, S_q); reordered position ``p`` holds query ``perm[b, h, p]``:
``q_ordered = q.gather(2, perm[..., None].expand_as(q))``; :func:`order_rows` and
:func:`restore_rows` do this and its inverse for any (B, H, S_q, X) tensor.
"""

from __future__ import annotations

import functools

import torch

from .attention import _check_int

__all__ = ["query_order", "order_rows", "restore_rows"]

#: power-iteration steps per bisection level
POWER_STEPS = 6
#: the query vectors are first projected onto this many of their leading principal directions (per
#: batch item and head); the bisection then works in these few dims (on the suite: the same density
#: at 1% error as at full head dim, 8 to 32 dims alike; a tenth of the work at D = 128)
RANK = 16
#: the projection's scatter matrix is made from at most about this many query rows (evenly strided)
SUBSPACE_ROWS = 8192
#: subspace-iteration steps (each: one D x D product, an orthonormalisation) for the projection
SUBSPACE_STEPS = 4
#: a group's scatter matrix is summed over chunks of this many rows (wider groups are padded to a
#: whole number of chunks): one (D x W) @ (W x D) product per group ran on a handful of thread
#: blocks (2.4 of 5.2 ms of GPU time at Wan 480p on an H100, ``query_order_bench.py --profile``)
CHUNK = 128


def _levels(n: int, block_m: int) -> list[list[tuple[int, int]]]:
    """The groups ``(start, size)`` split at each level, from one group of ``n`` rows down to groups
    of at most ``block_m``; a group of ``nb`` blocks splits at ``(nb // 2) * block_m``."""
    levels, groups = [], [(0, n)]
    while True:
        split = [(s, m) for s, m in groups if m > block_m]
        if not split:
            return levels
        levels.append(split)
        nxt = []
        for s, m in groups:
            if m > block_m:
                left = (-(-m // block_m) // 2) * block_m
                nxt += [(s, left), (s + left, m - left)]
            else:
                nxt.append((s, m))
        groups = nxt


@functools.lru_cache(maxsize=32)
def _subspace_start(dim: int, rank: int, device: torch.device) -> torch.Tensor:
    """The subspace iteration's fixed start (dim, rank) float32 on ``device``, made once."""
    return torch.randn(dim, rank, generator=torch.Generator().manual_seed(1)).to(device)


def _project(q: torch.Tensor, rank: int) -> torch.Tensor:
    """``q`` (B, H, S, D) projected onto its ``rank`` leading principal directions per (b, h):
    float32 (B, H, S, rank) (``q.float()`` when ``rank >= D``). The directions come from the
    centred scatter matrix of at most ~``SUBSPACE_ROWS`` evenly strided rows by ``SUBSPACE_STEPS``
    steps of subspace iteration, orthonormalised by a Cholesky factorisation of the small
    (rank x rank) Gram matrix in float64 (``cholesky_ex``: no host synchronisation). Rows are not
    centred: the bisection centres each group itself."""
    B, H, S, D = q.shape
    if rank >= D:
        return q.float()
    xs = q[:, :, :: max(1, S // SUBSPACE_ROWS)].float()
    xs = xs - xs.mean(2, keepdim=True)
    cov = xs.transpose(-1, -2) @ xs  # (B, H, D, D)
    basis = _subspace_start(D, rank, q.device).expand(B, H, D, rank)
    eye = torch.eye(rank, dtype=torch.float64, device=q.device)
    for _ in range(SUBSPACE_STEPS):
        y = (cov @ basis).double()
        gram = y.transpose(-1, -2) @ y  # (B, H, rank, rank)
        # a ridge relative to the Gram's trace (and a floor for q of all-equal rows) keeps the
        # factorisation defined where q has fewer than ``rank`` independent directions
        ridge = gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * 1e-12 + 1e-300
        chol = torch.linalg.cholesky_ex(gram + ridge * eye).L
        basis = torch.linalg.solve_triangular(chol, y.transpose(-1, -2), upper=False).transpose(-1, -2).float()
    return q.float() @ basis


@functools.lru_cache(maxsize=32)
def _plan(n: int, block_m: int, dim: int, device: torch.device) -> tuple:
    """Everything of :func:`query_order` that depends on the sizes only, on ``device``, made once per
    (S_q, block_m, D, device), D the dims the bisection works in: the power iteration's start
    vector (D,) and, per level of :func:`_levels` (widths above ``CHUNK`` rounded up to chunks),
    ``(G, width, sizes (G,) float32, valid (G, width) bool, pos (G, width) int64: the positions
    in the order each group's rows come from, src / dst (rows of the level) int64: where the
    valid rows of the flattened (G, width) result go)``. Later calls of the same sizes copy
    nothing to the device (a copy from pageable host memory would wait for the stream)."""
    start = torch.randn(dim, generator=torch.Generator().manual_seed(0)).to(device)
    levels = []
    for groups in _levels(n, block_m):
        width = max(m for _, m in groups)
        if width > CHUNK:  # a whole number of chunks (padding rows are masked)
            width = -(-width // CHUNK) * CHUNK
        starts = torch.tensor([s for s, _ in groups])
        sizes = torch.tensor([m for _, m in groups])
        col = torch.arange(width)
        valid = col[None, :] < sizes[:, None]
        pos = (starts[:, None] + col[None, :]).clamp_max(n - 1)
        src = torch.cat([torch.arange(m) + i * width for i, (_, m) in enumerate(groups)])
        dst = torch.cat([torch.arange(s, s + m) for s, m in groups])
        levels.append((len(groups), width) + tuple(t.to(device) for t in (sizes.float(), valid, pos, src, dst)))
    return start, levels


def _principal_direction(xs: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """The principal direction (B, H, G, D) of each group's centred rows ``xs`` (B, H, G, width, D)
    float32, padding rows zero: ``POWER_STEPS`` power steps from ``start`` (D,) on the group's
    D x D scatter matrix, made in one pass over its rows (per chunk of ``CHUNK`` rows)."""
    B, H, G, W, D = xs.shape
    if W > CHUNK:  # a product over few long rows runs on few thread blocks: sum over chunks of rows
        xc = xs.reshape(B, H, G, W // CHUNK, CHUNK, D)
        cov = (xc.transpose(-1, -2) @ xc).sum(3)
    else:
        cov = xs.transpose(-1, -2) @ xs
    # scaled to trace 1 (eigenvalues <= 1: POWER_STEPS products cannot overflow, and shrink v by at
    # most D ** -POWER_STEPS), then cov ** POWER_STEPS applied to start as squares: fewer launches
    cov = cov / cov.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp_min(1e-30)
    v = start.expand(B, H, G, D)[..., None]
    steps = POWER_STEPS
    if steps % 2 == 0:
        cov, steps = cov @ cov, steps // 2
    for _ in range(steps):
        v = cov @ v
    return (v / v.norm(dim=-2, keepdim=True).clamp_min(1e-30))[..., 0]


def _bisect(q: torch.Tensor, block_m: int, direction) -> torch.Tensor:
    """The recursive bisection of :func:`query_order`, splitting each group along
    ``direction(xs, start)`` (see :func:`_principal_direction`)."""
    B, H, S, D = q.shape
    dev = q.device
    perm = torch.arange(S, device=dev).expand(B, H, S).contiguous()
    x = q.float()
    start, levels = _plan(S, block_m, D, dev)
    for G, width, sizes, valid, pos, src, dst in levels:
        rows = perm[:, :, pos]  # (B, H, G, width) query indices
        xs = x.gather(2, rows.reshape(B, H, -1, 1).expand(-1, -1, -1, D)).reshape(B, H, G, width, D)
        w = valid[None, None, :, :, None].to(x.dtype)
        mean = (xs * w).sum(3, keepdim=True) / sizes[None, None, :, None, None]
        xs = (xs - mean) * w  # centred; padding rows zero
        v = direction(xs, start)
        proj = (xs @ v[..., None])[..., 0].masked_fill(~valid, float("inf"))
        order = proj.argsort(dim=-1, stable=True)  # padding (inf) last: the valid entries come first
        new = rows.gather(-1, order).reshape(B, H, -1)
        perm[:, :, dst] = new[:, :, src]
    return perm


def query_order(q: torch.Tensor, block_m: int = 128, rank: int = RANK) -> torch.Tensor:
    """The "pca" order of ``q`` (B, H, S_q, D), any float dtype and layout, for query blocks of
    ``block_m``: int64 (B, H, S_q) on q's device, a permutation of ``0 .. S_q - 1`` in each (b, h)
    (see the module docstring). ``rank``: the bisection works on q projected onto its ``rank``
    leading principal directions (default ``RANK``); ``rank >= D`` uses q itself. Deterministic
    for given inputs; no host synchronisation after the first call of given sizes (the group sizes
    are known on the host, ``_plan``)."""
    if q.dim() != 4:
        raise ValueError(f"q: expected a (B, H, S_q, D) tensor, got shape {tuple(q.shape)}")
    _check_int("block_m", block_m)
    _check_int("rank", rank)
    if q.shape[2] <= block_m:
        return torch.arange(q.shape[2], device=q.device).expand(q.shape[:3]).contiguous()
    return _bisect(_project(q, rank), block_m, _principal_direction)


def order_rows(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``t`` (B, H, S, X) with its rows in the order ``perm`` (B, H, S) int64 gives: row ``p`` of the
    result is row ``perm[b, h, p]`` of ``t``. Contiguous."""
    return t.gather(2, perm[..., None].expand(-1, -1, -1, t.shape[-1]))


def restore_rows(t: torch.Tensor, perm: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`order_rows`: rows of ``t`` (B, H, S, X), in the order ``perm``, put
    back in place. The result has the layout of ``like`` (``torch.empty_like``) if given, else
    ``t``'s."""
    out = torch.empty_like(like if like is not None else t, dtype=t.dtype)
    return out.scatter_(2, perm[..., None].expand(-1, -1, -1, t.shape[-1]), t)
