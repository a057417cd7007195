"""`FGAttnConfig`: every setting of the fgattn backend, in one frozen, validated object.

Usage::

    import fgcompile
    cfg = fgcompile.FGAttnConfig(predictor="profile", alpha=0.5)
    model = torch.compile(model, backend=fgcompile.backend(cfg))
    # or, through the string backend:
    model = torch.compile(model, backend="fgattn", options={"alpha": 0.5})

Every field is validated in ``__post_init__``; a bad value raises ``ValueError`` naming the
field and the accepted values.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["FGAttnConfig", "PREDICTORS", "IMPLS", "MASK_STORAGES", "QUERY_ORDERS", "strict_mode"]

PREDICTORS = ("profile", "pooled", "dense")
IMPLS = ("auto", "triton", "reference")
MASK_STORAGES = ("device", "host", "host_lists")
#: "none": the model's token order; "pca": ``fgcompile.reorder.query_order``
QUERY_ORDERS = ("none", "pca")


def strict_mode() -> bool:
    """True when FGCOMPILE_STRICT=1 (the test suite sets it): every place that would fall back to
    dense attention on an internal failure (a pass, a rewrite, a sparse call) raises instead."""
    return os.environ.get("FGCOMPILE_STRICT") == "1"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond any float (10 ** 400)
        return False


#: the block_m values the Triton kernels take (the plain-torch reference takes any of [16, 256])
TRITON_BLOCK_M = (16, 32, 64, 128)


@dataclass(frozen=True)
class FGAttnConfig:
    """Settings of the fgattn backend.

    Fields (all optional):

    predictor:
        How each sparse site chooses which M x 1 slices to compute.
        ``"profile"`` (default): at profiled calls compute dense attention (that call's output is
        exact) and keep slice (query block i, key j) iff the largest softmax probability of any
        query of block i on key j exceeds ``alpha / S_kv``; reuse the mask until the next profiled
        call. ``"pooled"``: the pooled top-CDF predictor at every call. ``"dense"``: never sparse
        (the rewritten graph still runs fgcompile's op, on the dense path).
    alpha:
        Threshold of the profile predictor, > 0. FG-Attn uses 0.5 (and 0.6). Smaller keeps more.
        Below 1, every query block keeps at least its strongest key (a query's largest
        probability is at least 1 / S_kv); from 1 on, a block none of whose probabilities
        exceeds alpha / S_kv (nearly uniform attention) keeps no key and its output rows are 0.
    profile_every:
        The profile predictor profiles the first sparse call of a site and then every
        ``profile_every``-th call after it (default 10: a 50-step sampler profiles 5 times).
    profile_calls:
        Explicit call indices (0-based, counted per site, warm-up calls included) to profile at,
        instead of ``profile_every``; e.g. ``(0, 15, 30, 45)``. The first sparse call is always
        profiled.
    tau:
        Pooled predictor: keep the best keys of each pooled query block until their softmax mass
        reaches ``tau``, in (0, 1]. Default 0.9.
    gamma:
        Pooled predictor: a query block whose queries have mean cosine similarity to their mean
        below ``gamma`` keeps every key, in [-1, 1]. Default 0.5.
    density:
        Optional budget in (0, 1]: keep at most this fraction of slices per query block (the
        strongest ones). ``None`` (default): no budget.
    max_density:
        In (0, 1]. A site whose profiled mask keeps more than this fraction of its slices runs
        dense attention until its next profiled call: SDPA (cuDNN), or at a site with key padding
        on CUDA the sparse kernel over every real key (SDPA's masked path takes 1.5x the time of
        its unmasked one on an H100, and that kernel runs at the unmasked speed:
        ``benchmarks/masked_dense_probe.py``). Default 0.9; 1.0 never switches. On an H100 a
        sparse call (the Gluon kernel plus its per-call packing) on a scattered mask takes 0.97
        (Wan2.1 480p), 0.88 (HunyuanVideo 480p) and 0.92 (CogVideoX-5B) of cuDNN's dense time at
        density 0.9, and 1.03 / 0.93 / 0.98 at 0.95 (``benchmarks/max_density_probe.py``,
        ``results/max_density_h100.json``; the default was 0.8, set when the Triton kernel took
        1.23x cuDNN's time at density 1.0). The
        kept fraction reaches the host by an asynchronous copy (no synchronisation); until it
        has arrived the site runs sparse.
    block_m:
        Queries per slice (M), a power of two in [16, 256]. Default 128 (FG-Attn's query block).
        The Triton kernels (CUDA) take ``TRITON_BLOCK_M`` (16 to 128); a site compiled for CUDA with
        another block_m runs dense, with that reason; the plain-torch path takes them all.
    block_n:
        Keys per slice (N), a power of two in [1, 128]; 1 (default) is the finest granularity.
    dense_calls:
        Number of first calls of every site that run dense attention (warm-up), >= 0. Default 0.
        (Dense calls, here and for ``dense_sites`` and ``max_density``, of a site with key
        padding on CUDA run the sparse kernel over every real key, as under ``max_density``;
        ``predictor="dense"`` always runs SDPA.)
    dense_sites:
        Glob patterns (fnmatch) of site names that always run dense, e.g. ``("blocks.0.*",)``.
    min_seq_len:
        Sites with fewer queries or keys than this stay on dense SDPA. Default 4096.
    impl:
        Kernel implementation: ``"auto"`` (Triton on CUDA, plain torch elsewhere), ``"triton"``
        or ``"reference"``.
    mask_storage:
        Where the profile predictor keeps each site's cached mask (a bitmap, int32 (B, H, nQB,
        ceil(nKB / 32)): 67 MB per site at Wan2.1's 720p, 2 GB over its 30 layers) between its
        calls. ``"host"`` (default): in pinned host memory, copied there asynchronously when a
        profiled call makes it, and brought back to the GPU for each sparse call only, prefetched
        on a side CUDA stream while the site called before it runs; GPU memory then holds about
        two masks at a time instead of one per site (Wan2.1-1.3B on an H100: peak memory within
        1% of the default compile, forward times unchanged; benchmarks/results/e2e_wan_h100.json).
        ``"device"``: in GPU memory, no copies (for models whose layers are too short to hide
        a mask's copy). ``"host_lists"``: as ``"host"``, and the mask's packed index lists (the
        kernel's int32 key lists) are kept in pinned host memory too, made by the first sparse
        call after each profiled call: later sparse calls copy them (prefetched) instead of
        packing the bitmap on the GPU at every call (a kernel of ~0.25 ms per Wan2.1 layer at
        density 0.6), for ``4 * B*H*nQB*cap`` bytes of host memory per site (cap: the density
        budget's bound, else nKB; Wan2.1-1.3B at 480p under a 0.3 budget: 121 MB per layer,
        3.6 GB for 30) and one more list in GPU memory (the next site's; prefetched copies reuse
        each other's memory in stream order, so a host running ahead of the GPU holds no more).
        On the CPU "device" and "host" are the same; "host_lists" keeps the lists there.
    query_order:
        Which queries share a query block, for the profile predictor. ``"none"`` (default): the
        model's token order, blocks of ``block_m`` consecutive queries. ``"pca"``: at each profiled
        call, per batch item and head, the queries are grouped by recursive bisection along their
        principal direction (on their 16 leading principal directions; ``fgcompile.query_order``,
        module ``fgcompile.reorder``), so that each block holds alike queries and
        the union of the keys they attend to is smaller; the mask is made and used in that order,
        and every output row is put back in place. On the synthetic suite fewer slices reach 1%
        error (8 x 16 x 16 tokens: density 0.63 instead of 0.73; 4 x 30 x 52: 0.66 instead of
        0.80, ``benchmarks/quality.py --query-order pca``; Wan 480p on an H100: 0.53 instead of
        0.70, and the sparse call, gathers included, 6.4 ms instead of 7.9 ms,
        ``benchmarks/equal_error_bench.py``). On the shipped trained toy DiT it gains little:
        0.79 instead of 0.82 at 1% error per call, and no density saving at 30 dB PSNR of its
        videos (0.62 against 0.60 with the full-dim order, ``benchmarks/quality_video.py``).
        Costs: the order itself at every profiled call (5.1 ms at Wan 480p on an H100, 0.46x a
        dense cuDNN call, ``benchmarks/query_order_bench.py``: with ``profile_every=10`` about
        0.5 ms per call),
        two gathers per sparse call, the order kept with the mask (B x H x S_q int32 per site,
        saved by ``save_state``), and on CUDA such sparse calls run their kernel inside the
        planning op. Not with ``predictor="pooled"``.
    """

    predictor: str = "profile"
    alpha: float = 0.5
    profile_every: int = 10
    profile_calls: tuple[int, ...] | None = None
    tau: float = 0.9
    gamma: float = 0.5
    density: float | None = None
    max_density: float = 0.9
    block_m: int = 128
    block_n: int = 1
    dense_calls: int = 0
    dense_sites: tuple[str, ...] = field(default_factory=tuple)
    min_seq_len: int = 4096
    impl: str = "auto"
    mask_storage: str = "host"
    query_order: str = "none"

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(
                f"FGAttnConfig.{name}: expected {expected}, got {getattr(self, name)!r}"
            )

        for f in dataclasses.fields(self):  # numpy (or other) integer and real scalars: plain int / float
            v = getattr(self, f.name)
            if isinstance(v, numbers.Integral) and not isinstance(v, (int, bool)):
                object.__setattr__(self, f.name, int(v))
            elif isinstance(v, numbers.Real) and not isinstance(v, (int, float, bool, numbers.Integral)):
                object.__setattr__(self, f.name, float(v))
        if self.predictor not in PREDICTORS:
            raise bad("predictor", f"one of {PREDICTORS}")
        if not _is_real(self.alpha) or self.alpha <= 0:
            raise bad("alpha", "a finite number > 0")
        if not _is_int(self.profile_every) or self.profile_every < 1:
            raise bad("profile_every", "an int >= 1")
        if self.profile_calls is not None:
            pc = self.profile_calls
            if isinstance(pc, list):
                object.__setattr__(self, "profile_calls", tuple(pc))
                pc = self.profile_calls
            if (
                not isinstance(pc, tuple)
                or not all(_is_int(c) and c >= 0 for c in pc)
                or len(set(pc)) != len(pc)
            ):
                raise bad("profile_calls", "None or a tuple of distinct ints >= 0")
            object.__setattr__(self, "profile_calls", tuple(sorted(pc)))
        if not _is_real(self.tau) or not (0 < self.tau <= 1):
            raise bad("tau", "a number in (0, 1]")
        if not _is_real(self.gamma) or not (-1 <= self.gamma <= 1):
            raise bad("gamma", "a number in [-1, 1]")
        if self.density is not None and (not _is_real(self.density) or not (0 < self.density <= 1)):
            raise bad("density", "None or a number in (0, 1]")
        if not _is_real(self.max_density) or not (0 < self.max_density <= 1):
            raise bad("max_density", "a number in (0, 1]")
        if not _is_int(self.block_m) or not (16 <= self.block_m <= 256) or self.block_m & (self.block_m - 1):
            raise bad("block_m", "a power of two in [16, 256]")
        if not _is_int(self.block_n) or not (1 <= self.block_n <= 128) or self.block_n & (self.block_n - 1):
            raise bad("block_n", "a power of two in [1, 128]")
        if not _is_int(self.dense_calls) or self.dense_calls < 0:
            raise bad("dense_calls", "an int >= 0")
        ds = self.dense_sites
        if isinstance(ds, str):
            object.__setattr__(self, "dense_sites", (ds,))
        elif isinstance(ds, list):
            object.__setattr__(self, "dense_sites", tuple(ds))
        if not isinstance(self.dense_sites, tuple) or not all(isinstance(p, str) for p in self.dense_sites):
            raise bad("dense_sites", "a tuple of glob patterns (str)")
        if not _is_int(self.min_seq_len) or self.min_seq_len < 1:
            raise bad("min_seq_len", "an int >= 1")
        if self.impl not in IMPLS:
            raise bad("impl", f"one of {IMPLS}")
        if self.mask_storage not in MASK_STORAGES:
            raise bad("mask_storage", f"one of {MASK_STORAGES}")
        if self.query_order not in QUERY_ORDERS:
            raise bad("query_order", f"one of {QUERY_ORDERS}")
        if self.query_order != "none" and self.predictor == "pooled":
            raise ValueError(
                f"FGAttnConfig.query_order: {self.query_order!r} serves the profile predictor (its order is made at "
                f"profiled calls); with predictor='pooled' expected 'none'"
            )

    # ------------------------------------------------------------------ helpers
    @classmethod
    def from_options(cls, options: "FGAttnConfig | Mapping[str, Any] | None") -> "FGAttnConfig":
        """Build a config from ``torch.compile(..., options=...)``: a dict of field values, a
        config, or None. Unknown keys raise ``ValueError`` listing the known fields."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(
                f"options: expected a dict of FGAttnConfig fields or an FGAttnConfig, got {type(options).__name__}"
            )
        opts = dict(options)
        base = opts.pop("config", None)
        if base is not None and not isinstance(base, cls):
            raise ValueError(f"options['config']: expected an FGAttnConfig, got {type(base).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ValueError(f"options: unknown FGAttnConfig field(s) {unknown}; known fields: {sorted(known)}")
        if base is None:
            return cls(**opts)
        return dataclasses.replace(base, **opts) if opts else base

    def replace(self, **changes: Any) -> "FGAttnConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def is_dense_site(self, name: str) -> bool:
        """True when ``name`` matches one of ``dense_sites``."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.dense_sites)

    def is_profiled_call(self, call: int) -> bool:
        """Whether a site's call ``call`` (0-based, warm-up included) is a scheduled profile call,
        given that the first sparse call (``dense_calls``) is always profiled."""
        first = self.dense_calls
        if call < first:
            return False
        if call == first:
            return True
        if self.profile_calls is not None:
            return call in self.profile_calls
        return (call - first) % self.profile_every == 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists for tuples), for saved state and reports."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d
