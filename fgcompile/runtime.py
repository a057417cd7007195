"""Per-model, per-site run-time state: the predictor schedule, the cached slice masks, statistics,
and saving/loading calibrated state.

Ownership: the compiled graph calls
``torch.ops.fgcompile.site_attention(q, k, v, key_padding, scale, handle, owner)`` (see
``fgcompile.lowering.ops``). ``handle`` (a constant of the graph) names a ``SiteTemplate``: the
site's stable name (its module path, e.g. ``"blocks.3.attn1"``), its config and what the
detection pass found. ``owner`` is a parameter of the model, passed at run time: Dynamo reuses one
compiled graph for every instance of a module class, so per-model state cannot be a constant of
the graph. Each owner parameter maps (weakly) to one ``ModelState``, which holds one ``SiteState``
per site name; two models never share state and the state dies with the model. Recompiles (new
shapes, graph breaks) reuse a site's state by name; a cached mask is only reused for the exact
shape it was computed for. A graph without a parameter input (a graph-break segment holding
only the attention) takes its state from its anchor, the graph with parameters that ran before it
(see "graphs without a parameter" below).

Schedule of one site, call ``c`` (0-based, counted per site):

    if predictor == "dense" or c < dense_calls or the site matches dense_sites
            or (a dynamic-length site) S_q or S_kv < min_seq_len:   dense SDPA
    elif predictor == "profile":
        if c is a profiled call (config.is_profiled_call) or no mask of this shape is cached:
            out, block_max = profile_attention(q, k, v)     # exact output
            mask = block_max > alpha / S_kv  (per M x N tile; density budget)
        else: sparse_attention(q, k, v, cached mask)
    elif predictor == "pooled":   sparse_attention(q, k, v, pooled_slices(q, k))

Mask storage (``config.mask_storage``, CUDA only): ``"device"`` keeps each cached mask in GPU
memory; ``"host"`` keeps it in pinned host memory (copied there on a side stream after the profiled
call that made it) and brings it back for each sparse call only. Sites learn the order in which
they run (each site's ``successor``, per thread, across models: with regional compilation every
block has its own ``ModelState``), and after each call the next site's host mask is prefetched on
the side stream while this site runs. The copy is allocated on the side stream, which first waits
for the work the current stream has been given so far: a copy's memory is reused by later copies
in stream order, and a host that runs the whole forward ahead of the GPU still holds at most two
copies (this call's and the next site's), without ever waiting for the GPU (``SiteState.prefetch``).

``"host_lists"`` keeps the mask's packed index lists (``PackedSlices``) in host memory as well,
made by the first sparse call after the mask changed: later sparse calls copy (prefetch) the lists
instead of packing the bitmap on the device, i.e. no packing kernel per call, for
``4 * B*H*nQB*cap`` bytes of pinned host memory per site (cap: the density budget's bound, else
nKB) and one more list on the GPU (the next site's, prefetched). A call with key padding packs its
bitmap as ``"host"`` does.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import weakref
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.weak

from .config import FGAttnConfig, strict_mode
from .lowering import torch_private

__all__ = [
    "ModelState",
    "SiteTemplate",
    "register_site",
    "SiteState",
    "SiteStats",
    "state_of",
    "run_site",
    "plan_site",
    "template_of",
    "reset",
    "stats",
    "save_state",
    "load_state",
    "configure",
    "STATE_VERSION",
]

log = logging.getLogger("fgcompile")

STATE_VERSION = 1

_LOCK = threading.Lock()
_NEXT_HANDLE = itertools.count(1)


def _owner_module(model: Any) -> Any:
    """What a compiled model wraps: the module of ``torch.compile(module)`` or of
    ``torch.compile(module.forward)``, else ``model`` itself."""
    owner = getattr(model, "_orig_mod", model)
    return torch_private.compiled_method_module(owner) or owner


def record_compile(owner: Optional[torch.Tensor], config: FGAttnConfig, infos: Sequence[Any]) -> None:
    """Keep what one compile decided for its sites (``SiteInfo``: name, decision, reason), under
    the graph's owner parameter (``None``: a graph without one; not kept). A graph without sites
    leaves an empty record: the model was compiled under fgattn."""
    if owner is None:
        return
    with _LOCK:
        got = _COMPILED.get(owner)
        if got is None:
            got = _COMPILED[owner] = {}
        for i in infos:
            got[i.name] = (config, i.decision, i.reason)


def compiled_decisions(model: Any) -> dict[str, tuple]:
    """{site name: (config, decision, reason)} the compiles of ``model``'s graphs recorded (the
    last compile of each name wins); empty when it never compiled under fgattn."""
    owner = _owner_module(model)
    if not isinstance(owner, torch.nn.Module):
        return {}
    out: dict[str, tuple] = {}
    seen: set = set()
    for p in owner.parameters():
        got = _COMPILED.get(p)
        if got is not None and id(got) not in seen:
            seen.add(id(got))
            out.update(got)
    return out


@dataclass(frozen=True)
class SiteTemplate:
    """What a compiled graph knows of a site: its name, config, and the detection pass's SiteInfo."""

    name: str
    config: FGAttnConfig
    info: Any = field(default=None, compare=False)
    owner_name: Optional[str] = None  # path of the owner parameter inside the compiled module
    # a site of a graph without a parameter input whose calls take their state from the graph
    # that ran before them (see ``anchoring``)
    anchored: bool = False


_TEMPLATES: dict[int, SiteTemplate] = {}
# owner parameter -> ModelState (weak: the state dies with the model's parameters)
# (by identity: a WeakKeyDictionary would compare tensors with ==, which is elementwise)
_OWNED: "torch.utils.weak.WeakIdKeyDictionary" = torch.utils.weak.WeakIdKeyDictionary()
# owner parameter -> {site name: (config, decision, reason)} of every site its graphs' compiles
# found, dense ones included: a model whose sites all run dense has no ModelState, and this is
# what stats' error and explain(compiled_model) tell about it
_COMPILED: "torch.utils.weak.WeakIdKeyDictionary" = torch.utils.weak.WeakIdKeyDictionary()
_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}  # CUDA device index -> the stream mask copies run on
_ORDER = threading.local()  # .last: weakref to the site this thread called last (see SiteState.successor)


def register_site(
    name: str, config: FGAttnConfig, info: Any = None, owner_name: Optional[str] = None, anchored: bool = False
) -> int:
    """Register a site template; returns the handle the graph passes to the op. ``owner_name``:
    the path of the graph's owner parameter relative to the compiled module (e.g.
    ``"attn1.to_q.weight"`` when one block was compiled), which lets ``stats``/``save_state`` name
    sites by their full path in the user's model (``"blocks.3.attn1"``). ``anchored``: a site of
    a graph without a parameter input, whose calls find their state through the graph that ran
    before them (``anchoring``)."""
    with _LOCK:
        handle = next(_NEXT_HANDLE)
        _TEMPLATES[handle] = SiteTemplate(name, config, info, owner_name, anchored)
    return handle


@dataclass
class SiteStats:
    """Statistics of one site. Densities are fractions of (query block, key block) slices kept,
    per query head, averaged over batch; ``None`` until the site ran a sparse or profiled call."""

    name: str
    calls: int
    dense_calls: int
    profiled_calls: int
    sparse_calls: int
    density_last: Optional[list[float]]
    density_mean: Optional[list[float]]
    fallback: Optional[str] = None  # why the site runs dense from now on (a failed sparse path)
    direct_calls: int = 0  # sparse calls whose kernel ran inside site_plan (lists wider than the compiled buffer)
    mask_bytes: int = 0  # device memory held by the cached mask (a bitmap; a prefetched copy is not counted)
    host_mask_bytes: int = 0  # pinned host memory held by the cached mask (mask_storage="host" on CUDA)
    host_list_bytes: int = 0  # host memory held by the cached mask's index lists (mask_storage="host_lists")
    order_bytes: int = 0  # memory held by the cached mask's query order (query_order="pca"; on the device)

    @property
    def mean_density(self) -> Optional[float]:
        """Mean over heads of ``density_mean``."""
        if self.density_mean is None:
            return None
        return sum(self.density_mean) / len(self.density_mean)


@dataclass
class SiteState:
    """State of one attention site of one compiled model."""

    name: str
    config: FGAttnConfig
    info: Any = None  # fgcompile.passes.find_attention.SiteInfo, for reports
    calls: int = 0
    n_dense: int = 0
    n_profiled: int = 0
    n_sparse: int = 0
    n_direct: int = 0  # of n_sparse: kernel run inside site_plan (see runtime.plan_site)
    mask: Optional[torch.Tensor] = None  # the keep mask as a bitmap: int32 (B, H, nQB, ceil(nKB / 32))
    mask_key: Optional[tuple] = None  # (q.shape, k.shape, block_m, block_n) the mask was computed for
    mask_density: Optional[float] = None  # fraction of slices the cached mask keeps (host copy)
    mask_cap: Optional[int] = None  # most key blocks any row of the cached mask keeps (a bound; None: nKB)
    order: Optional[torch.Tensor] = None  # query order of the cached mask (query_order="pca"): int32 (B, H, S_q), on the device
    _mask_density_pending: Optional[tuple] = None  # (pinned host scalar, CUDA event) in flight
    _mask_ready: Optional[Any] = None  # CUDA event: the copy of a host mask from the device has completed
    _prefetched: Optional[tuple] = None  # (device copy, CUDA event, the host tensor it copies) for the next call
    _lists: Optional[Any] = None  # the cached mask's PackedSlices, indices in host memory (mask_storage="host_lists")
    _lists_source: Optional[torch.Tensor] = None  # the cached mask (self.mask) _lists pack
    _lists_ready: Optional[Any] = None  # CUDA event: the copy of _lists' indices to the host has completed
    _lists_kept: Optional[torch.Tensor] = None  # (H,) float32 kept fraction of _lists, on the device
    _profiled_bits: Optional[torch.Tensor] = None  # this call's new mask on the device (for plan_site), profiled calls
    _successor: Optional[Any] = None  # weakref to the site called after this one last time
    _device: Optional[torch.device] = None  # of the last call
    _pin_failed: bool = False  # host storage could not pin a mask (warned once; such masks stay on the device)
    _density_last: Optional[torch.Tensor] = None  # (H,) float32 on the device
    _density_sum: Optional[torch.Tensor] = None
    _density_count: int = 0
    _template_config: Optional[FGAttnConfig] = None  # the compiled config this site last ran with
    last_shapes: Optional[tuple] = None  # (q.shape, k.shape) of the last call
    fallback: Optional[str] = None  # set when the sparse path failed: the site runs dense since
    full_name: Optional[str] = None  # its path in the model, where configure(dense_sites=...) resolved it

    # ----------------------------------------------------------------- running
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding: Optional[torch.Tensor],
        scale: float,
    ) -> torch.Tensor:
        """One call of the site: the schedule's step, then the sparse kernel if the step asks for it."""
        out, packed = self.plan(q, k, v, key_padding, scale)
        self._profiled_bits = None
        if out is not None:
            return out
        return self.run_sparse(q, k, v, key_padding, scale, packed)

    def run_sparse(self, q, k, v, key_padding, scale, packed, direct: bool = False) -> torch.Tensor:
        """The sparse kernel on the ``packed`` lists of a call that ``plan()`` counted as sparse;
        a failure runs the call dense (``_fail``). ``direct``: the call runs here rather than in the
        compiled graph (``plan_site``), counted in ``n_direct``."""
        from . import attention

        cfg = self.config
        self.n_direct += direct
        try:
            if self.order is None:
                return attention.sparse_attention(
                    q, k, v, packed, block_m=cfg.block_m, block_n=cfg.block_n, scale=scale, impl=cfg.impl
                )
            from . import reorder

            if self.order.device != q.device:  # loaded from a file
                self.order = self.order.to(q.device)
            order = self.order.long()
            out = attention.sparse_attention(reorder.order_rows(q, order), k, v, packed, block_m=cfg.block_m,
                                             block_n=cfg.block_n, scale=scale, impl=cfg.impl)
            return reorder.restore_rows(out, order, like=q)
        except Exception as e:
            self.n_sparse -= 1  # counted by plan(); this call runs dense
            self.n_direct -= direct
            return self._fail(e, q, k, v, key_padding, scale)

    def _dense(self, q, k, v, key_padding, scale, kernel: bool = True) -> torch.Tensor:
        """Dense attention of a call the schedule runs dense (counted by the caller). A call with
        key padding on CUDA runs the sparse kernel on every real key (``packing.real_key_lists``)
        where ``kernel`` and the site's kernel serves it (``_kernel_serves_dense``): SDPA's masked
        path takes 1.5x the time of its unmasked one on an H100 (cuDNN; efficient attention 4.3x),
        and the kernel keeping every real key runs at the unmasked speed
        (``benchmarks/masked_dense_probe.py``). Else, and where that launch fails (the site then
        falls back to SDPA for good, ``_fail``), SDPA (:func:`dense_attention`)."""
        if kernel and key_padding is not None and self._kernel_serves_dense(q):
            from . import attention
            from .kernels import packing

            try:
                lists = packing.real_key_lists(key_padding, q.shape[1], q.shape[2], self.config.block_m)
                return attention.sparse_attention(q, k, v, lists, block_m=self.config.block_m, block_n=1,
                                                  scale=scale, impl=self.config.impl)
            except Exception as e:
                self.n_dense -= 1  # counted by the caller and again by _fail
                return self._fail(e, q, k, v, key_padding, scale)
        return dense_attention(q, k, v, key_padding, scale)

    def _kernel_serves_dense(self, q: torch.Tensor) -> bool:
        """Whether a dense call of this site may run the sparse kernel (``_dense``): on CUDA, with
        the Triton kernels (``impl`` not "reference"), single-key slices and a block_m they take;
        not under ``predictor="dense"`` (plain SDPA, the user's baseline) nor after a failure."""
        from .config import TRITON_BLOCK_M

        cfg = self.config
        return (q.device.type == "cuda" and self.fallback is None and cfg.predictor != "dense"
                and cfg.impl != "reference" and cfg.block_n == 1 and cfg.block_m in TRITON_BLOCK_M)

    def _fail(self, e: Exception, q, k, v, key_padding, scale) -> torch.Tensor:
        """The sparse path failed: never crash the user's model. Run this and every later call
        dense, record why (``stats(model)[name].fallback``) and log a warning; with
        FGCOMPILE_STRICT=1 (the test suite) raise instead."""
        if strict_mode():
            raise e
        self.fallback = f"{type(e).__name__}: {e}"
        log.warning("fgcompile: site %s falls back to dense attention: %s", self.name, self.fallback)
        self.n_dense += 1
        return dense_attention(q, k, v, key_padding, scale)

    def plan(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding: Optional[torch.Tensor],
        scale: float,
        index_cap: Optional[int] = None,
    ) -> tuple[Optional[torch.Tensor], Optional[Any]]:
        """Advance the schedule by one call and say what this call computes.

        Returns ``(out, None)`` when the call's output is already computed (a dense warm-up call,
        ``predictor="dense"``, or a profiled call, whose output is dense attention), or
        ``(None, packed)`` for a sparse call: the ``PackedSlices`` the sparse kernel must compute
        (cached mask or this call's prediction, padded keys removed). A profiled call leaves the
        mask it made, on q's device, in ``_profiled_bits`` for the caller (which clears it). Then
        learns the call order and prefetches the next site's host mask (``_note_call``). No host
        synchronisation."""
        call = self.calls
        self.calls += 1
        self.last_shapes = (tuple(q.shape), tuple(k.shape))
        self._device = q.device
        prefetched, self._prefetched = self._prefetched, None  # for this call only: used or dropped
        self._profiled_bits = None
        short = self._short_call(q, k)
        if self._dense_call(call) or short:
            self.n_dense += 1
            out, packed = self._dense(q, k, v, key_padding, scale, kernel=not short), None
        else:
            try:
                out, packed = self._plan_sparse(call, q, k, v, key_padding, scale, index_cap, prefetched)
            except Exception as e:
                out, packed = self._fail(e, q, k, v, key_padding, scale), None
        del prefetched  # an unused prefetched copy is freed before the next site's is made
        _note_call(self)
        return out, packed

    def _short_call(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """A call shorter than ``min_seq_len`` of a site whose sequence length is dynamic (symbolic
        in its graph: find_attention makes such a self-attention a site whatever its example size);
        static sites were decided on their exact sizes."""
        dynamic = self.info is not None and not all(
            isinstance(getattr(self.info, f, 0), int) for f in ("seq_len_q", "seq_len_kv"))
        return dynamic and min(q.shape[2], k.shape[2]) < self.config.min_seq_len

    def _dense_call(self, call: int) -> bool:
        """Whether the schedule runs call ``call`` dense whatever the mask: a failed sparse path,
        ``predictor="dense"``, a warm-up call, a site matching ``dense_sites``, or one the
        detection pass made to run dense (``SiteInfo.run_dense``)."""
        cfg = self.config
        return (self.fallback is not None or cfg.predictor == "dense" or call < cfg.dense_calls
                or cfg.is_dense_site(self.name) or (self.full_name is not None and cfg.is_dense_site(self.full_name))
                or bool(getattr(self.info, "run_dense", "")))

    def _plan_sparse(
        self, call: int, q, k, v, key_padding, scale, index_cap=None, prefetched: Optional[tuple] = None
    ) -> tuple[Optional[torch.Tensor], Optional[Any]]:
        cfg = self.config

        from . import predictors
        from .kernels import packing

        key = (tuple(q.shape), tuple(k.shape), cfg.block_m, cfg.block_n)
        if cfg.predictor == "profile":
            if cfg.is_profiled_call(call) or self.mask is None or self.mask_key != key:
                order = None
                if cfg.query_order == "pca":
                    from . import reorder

                    order = reorder.query_order(q, cfg.block_m)
                out, bits, kept = predictors.profile_bits(
                    q if order is None else reorder.order_rows(q, order), k, v, alpha=cfg.alpha,
                    block_m=cfg.block_m, block_n=cfg.block_n, scale=scale,
                    key_padding=key_padding, density=cfg.density, impl=cfg.impl,
                )
                if order is not None:
                    out = reorder.restore_rows(out, order, like=q)
                if key_padding is not None and cfg.density is None:
                    # the keys padded at this call are unknown, not unwanted: cache them as kept,
                    # so that a later call whose padding differs (another prompt's text length)
                    # computes them; every sparse call ANDs its own padding in below. (Under a
                    # density budget the cache keeps this call's choice: the index lists are
                    # sized for the budget.)
                    bits = bits | packing.pack_bits(~key_padding.to(torch.bool))[:, None, None, :]
                self._keep_mask(bits)
                self._drop_lists()  # of the old mask
                self.order = None if order is None else order.to(torch.int32)
                self.mask_key = key
                self.mask_cap = predictors.density_budget(-(-k.shape[2] // cfg.block_n), cfg.density)
                self._note_mask_density(kept.mean())
                self.n_profiled += 1
                self._record(kept)
                self._profiled_bits = bits
                return out, None
            if self.mask_density is None and self._mask_density_pending is not None:
                host, event = self._mask_density_pending
                if event.query():  # arrived; never waits
                    self.mask_density = float(host)
                    self._mask_density_pending = None
            if self.mask_density is not None and self.mask_density > cfg.max_density:
                # too dense to gain: dense attention until the next profiled call
                self.n_dense += 1
                self._record(torch.ones(q.shape[1], device=q.device))
                return self._dense(q, k, v, key_padding, scale), None
            cap = self._cap(k, index_cap)
            if key_padding is None and self._lists_usable(cap):
                packed = self._lists_for_call(q.device, prefetched)
                self.n_sparse += 1
                self._record(self._lists_kept)
                return None, packed
            bits = self._mask_for_call(q.device, prefetched)
        else:  # pooled
            bits = predictors.pooled_bits(
                q,
                k,
                tau=cfg.tau,
                gamma=cfg.gamma,
                block_m=cfg.block_m,
                block_n=cfg.block_n,
                scale=scale,
                key_padding=key_padding,
                density=cfg.density,
                impl={"reference": "torch"}.get(cfg.impl, cfg.impl),
            )
        if key_padding is not None:
            # Padded keys are never computed, whatever the cached mask says (block_n == 1 here:
            # the detection pass sends key-padded sites with block_n > 1 to the dense path).
            bits = bits & packing.pack_bits(key_padding.to(torch.bool))[:, None, None, :]
        packed = self.packed(bits, k, index_cap)
        self.n_sparse += 1
        kept = packing.kept_per_head(packed)
        self._record(kept)
        if cfg.predictor == "profile" and key_padding is None and cfg.mask_storage == "host_lists":
            self._keep_lists(packed, kept)
        return None, packed

    def index_bound(self, k: torch.Tensor) -> int:
        """A bound on the kept key blocks of every row of this call's mask, known on the host: the
        density budget under which the mask was made (pooled: the current config; profile: the
        cached mask's), else nKB."""
        from . import predictors

        n_kb = -(-k.shape[2] // self.config.block_n)
        if self.config.predictor == "profile":
            return min(self.mask_cap, n_kb) if self.mask_cap is not None else n_kb
        return predictors.density_budget(n_kb, self.config.density)

    def packed(self, bits: torch.Tensor, k: torch.Tensor, index_cap: Optional[int] = None) -> Any:
        """The ``PackedSlices`` the kernel consumes for a bitmap of this site's tiles (no host sync).
        Its index lists have ``index_bound(k)`` columns, or ``index_cap`` where that is at least the
        bound (the compiled graph's shape)."""
        from .kernels import packing

        cfg = self.config
        n_kb = -(-k.shape[2] // cfg.block_n)
        return packing.packed_from_bits(bits, n_kb, cfg.block_m, cfg.block_n, k.shape[2],
                                        packing.model_full_tile(cfg.block_n), cap=self._cap(k, index_cap))

    def _cap(self, k: torch.Tensor, index_cap: Optional[int] = None) -> int:
        """The index columns of this call's lists: ``index_bound(k)``, or ``index_cap`` (the
        compiled graph's) where that is at least the bound and at most nKB."""
        n_kb = -(-k.shape[2] // self.config.block_n)
        cap = self.index_bound(k)
        if index_cap is not None and cap <= index_cap <= n_kb:
            cap = index_cap
        return cap

    # ----------------------------------------------------------------- mask storage
    def _host_storage(self, device: torch.device) -> bool:
        """Whether the cached mask of calls on ``device`` lives in pinned host memory:
        ``mask_storage="host"`` or ``"host_lists"`` on CUDA (on the CPU the mask is in host memory
        either way)."""
        return self.config.mask_storage != "device" and device.type == "cuda" and not self._pin_failed

    def _keep_mask(self, bits: torch.Tensor) -> None:
        """Cache ``bits`` (a bitmap made or used by this call on its device, int32 (B, H, nQB,
        ceil(nKB / 32))) where ``mask_storage`` asks: the tensor itself, or (host storage) a pinned
        host copy made on the device's side stream once the current stream has produced ``bits``;
        ``_mask_ready`` marks the copy's completion. The call may go on using ``bits`` on the
        current stream; its memory is not reused before the copy has read it. No host sync."""
        self._mask_ready = None
        if not self._host_storage(bits.device):
            self.mask = bits
            return
        host = self._pinned(
            lambda: torch.empty(bits.shape, dtype=bits.dtype, pin_memory=True),
            f"cannot pin {bits.numel() * bits.element_size()} bytes of host memory for its mask (%s); it stays on the GPU",
        )
        if host is None:  # no pinned memory to be had: keep this mask on the device
            self.mask = bits
            return
        side = _side_stream(bits.device)
        side.wait_stream(torch.cuda.current_stream(bits.device))
        with torch.cuda.stream(side):
            host.copy_(bits, non_blocking=True)
        bits.record_stream(side)  # the allocator must not hand out bits' memory before the copy ran
        self.mask, self._mask_ready = host, side.record_event()

    def _pinned(self, make: Any, why: str) -> Optional[torch.Tensor]:
        """``make()`` (a pinned host tensor), or None where pinned memory cannot be had: the site
        then keeps its masks on the device (``_pin_failed``) and logs ``why`` (``%s``: the error)
        once."""
        try:
            return make()
        except RuntimeError as e:
            if not self._pin_failed:
                log.warning("fgcompile: site %s: " + why, self.name, e)
            self._pin_failed = True
            return None

    def _copy_mask(self, device: torch.device, stream: Optional["torch.cuda.Stream"] = None) -> torch.Tensor:
        """A copy of the cached mask on ``device``. On CUDA enqueued on ``stream`` (default: the
        current stream), after the mask's own copy from the device (``_keep_mask``) if one is in
        flight, asynchronous from pinned memory: no host sync."""
        return _copy_to(self.mask, self._mask_ready, device, stream)

    def _mask_for_call(self, device: torch.device, prefetched: Optional[tuple]) -> torch.Tensor:
        """The cached mask on ``device`` for a sparse call, int32 (B, H, nQB, ceil(nKB / 32)); no
        host sync. Device storage: the cached tensor, moved to ``device`` once (a mask loaded from
        a file, or kept on the host before ``configure`` chose the device). Host storage: a copy
        for this call only, dropped after it: ``prefetched`` when it is a copy of the current mask
        on ``device``, else one made now on the current stream (a mask still on the device, cached
        before ``configure`` chose the host, moves there)."""
        if not self._host_storage(device):
            if self.mask.device != device:
                self.mask = self._copy_mask(device)
                self._mask_ready = None
            return self.mask
        if self.mask.device.type == "cuda":
            bits = self.mask.to(device)
            self._keep_mask(bits)
            return bits
        if prefetched is not None:
            bits, copied, source = prefetched
            if source is self.mask and bits.device == device:
                torch.cuda.current_stream(device).wait_event(copied)
                return bits  # no record_stream: see prefetch()
        return self._copy_mask(device)

    # ----------------------------------------------------------------- cached index lists
    def _lists_usable(self, cap: Optional[int] = None) -> bool:
        """Whether the cached lists pack the cached mask under ``mask_storage="host_lists"`` (and,
        given ``cap``, have that many index columns)."""
        lists = self._lists
        return (
            lists is not None
            and self.config.mask_storage == "host_lists"
            and self._lists_source is self.mask
            and (cap is None or lists.indices.shape[-1] == cap)
        )

    def _keep_lists(self, packed: Any, kept: torch.Tensor) -> None:
        """Cache ``packed`` (this sparse call's lists of the cached mask, on its device) for the
        mask's later sparse calls: copies of its tensors, the indices in host memory (pinned,
        copied on the side stream from a device copy made on the current stream: 0.1-0.2 ms per
        Wan layer, once per mask; no host sync), the small tensors where they are. Pinned memory
        that cannot be had leaves the site packing its bitmap at every call."""
        self._drop_lists()
        # private copies: the compiled graph owns this call's tensors and may reuse their memory
        # for its own later outputs, on the current stream, while the side stream still reads them
        packed = replace(packed, counts=packed.counts.clone(), indices=packed.indices.clone(),
                         full_counts=packed.full_counts.clone(), full_tiles=packed.full_tiles.clone())
        idx = packed.indices
        if idx.device.type == "cuda":
            try:
                host = torch.empty(idx.shape, dtype=idx.dtype, pin_memory=True)
            except RuntimeError as e:
                log.warning("fgcompile: site %s: cannot pin %d bytes of host memory for its index lists (%s); "
                            "its sparse calls pack the mask instead", self.name, idx.numel() * idx.element_size(), e)
                return
            side = _side_stream(idx.device)
            side.wait_stream(torch.cuda.current_stream(idx.device))
            with torch.cuda.stream(side):
                host.copy_(idx, non_blocking=True)
            idx.record_stream(side)
            self._lists_ready = side.record_event()
        else:
            host = idx
        self._lists = replace(packed, indices=host)
        self._lists_source, self._lists_kept = self.mask, kept

    def _lists_for_call(self, device: torch.device, prefetched: Optional[tuple]) -> Any:
        """The cached lists on ``device`` for a sparse call (fresh tensors: the compiled graph owns
        its plan's outputs): the indices ``prefetched`` when that is a copy of them, else copied now
        on the current stream. No host sync."""
        lists = self._lists
        idx = None
        if prefetched is not None:
            copy, copied, source = prefetched
            if source is lists.indices and copy.device == device:
                if device.type == "cuda":
                    torch.cuda.current_stream(device).wait_event(copied)  # no record_stream: see prefetch()
                idx = copy
        if idx is None:
            idx = _copy_to(lists.indices, self._lists_ready, device)
        return replace(lists, counts=lists.counts.clone(), indices=idx,
                       full_counts=lists.full_counts.clone(), full_tiles=lists.full_tiles.clone())

    def _wants_prefetch(self) -> bool:
        """Whether the site's next call should find its host mask on the device already: host
        storage on CUDA, nothing prefetched yet, and a next step that is a sparse call with the
        cached mask, as far as the host knows without the call's shapes."""
        cfg = self.config
        return (
            self._prefetched is None
            and self.mask is not None
            and self.mask.device.type == "cpu"
            and self._device is not None
            and self._host_storage(self._device)
            and cfg.predictor == "profile"
            and not self._dense_call(self.calls)
            and not cfg.is_profiled_call(self.calls)
            and not (self.mask_density is not None and self.mask_density > cfg.max_density)
        )

    def prefetch(self) -> None:
        """Start copying the host mask (or, with ``mask_storage="host_lists"``, its cached index
        lists) to the device of the site's last call on the device's side stream; the next call
        uses the copy if the mask has not changed since (``_mask_for_call``, ``_lists_for_call``),
        else drops it.

        Memory: the copy is allocated on the side stream and read on the current stream without
        ``record_stream``; the side stream first waits for everything the current stream has been
        given so far. Once the host frees a copy (after enqueueing the call that reads it), the
        allocator may hand its block to a later copy on the side stream at once, and that copy runs
        only after the current stream has passed the reading call: reuse in stream order, no host
        wait. A host far ahead of the GPU (it enqueues a whole Wan forward in ~60 ms of a ~420 ms
        GPU forward) thus holds two copies at a time (this call's and the next site's), where
        ``record_stream`` would keep every freed copy until the GPU reached its reader: every
        layer's lists at once (7.2 GB for Wan2.1-1.3B at 480p, density 0.6; benchmarks/NOTES.md,
        sessions 13-14). The copy starts when the GPU reaches this call."""
        side = _side_stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        if self._lists_usable():
            source = self._lists.indices
            copy = _copy_to(source, self._lists_ready, self._device, side)
        else:
            source = self.mask
            copy = self._copy_mask(self._device, side)
        self._prefetched = (copy, side.record_event(), source)

    @property
    def successor(self) -> Optional["SiteState"]:
        """The site that ran right after this one last time (in this thread, in any model), whose
        host mask this site's calls prefetch; None until learned."""
        return self._successor() if self._successor is not None else None

    def host_mask(self) -> torch.Tensor:
        """The cached mask in host memory, for saving: waits for a copy from the device still in
        flight (a host sync: never called by steady-state calls)."""
        if self._mask_ready is not None:
            self._mask_ready.synchronize()
        return self.mask.cpu()

    def _drop_mask(self) -> None:
        """Forget the cached mask and every copy of it (in flight, prefetched)."""
        self.mask = self.mask_key = self._mask_ready = self._prefetched = self._profiled_bits = self.order = None
        self._drop_lists()

    def _drop_lists(self) -> None:
        """Forget the cached index lists (``mask_storage="host_lists"``)."""
        self._lists = self._lists_source = self._lists_ready = self._lists_kept = None

    def _note_mask_density(self, d: torch.Tensor) -> None:
        """Bring the new mask's kept fraction to the host without synchronising: on CUDA an
        asynchronous copy to pinned memory, read by a later call once its event has completed (until
        then the site runs sparse)."""
        self.mask_density = None
        self._mask_density_pending = None
        if d.is_cuda:
            host = torch.empty((), dtype=d.dtype, pin_memory=True)
            host.copy_(d, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._mask_density_pending = (host, event)
        else:
            self.mask_density = float(d)

    def _record(self, d: torch.Tensor) -> None:
        # d: kept fraction per head (H,), on the device: no host synchronisation here.
        self._density_last = d
        if self._density_sum is None or self._density_sum.shape != d.shape:
            self._density_sum = d.clone()
            self._density_count = 1
        else:
            self._density_sum = self._density_sum + d
            self._density_count += 1

    def reset(self) -> None:
        """Forget the schedule position, the cached mask and the statistics."""
        self.calls = self.n_dense = self.n_profiled = self.n_sparse = self.n_direct = 0
        self.fallback = None
        self._drop_mask()
        self.mask_cap = None
        self.mask_density = None
        self._mask_density_pending = None
        self._density_last = self._density_sum = None
        self._density_count = 0

    def stats(self) -> SiteStats:
        last = self._density_last.tolist() if self._density_last is not None else None
        mean = (
            (self._density_sum / max(self._density_count, 1)).tolist()
            if self._density_sum is not None
            else None
        )
        nbytes = self.mask.numel() * self.mask.element_size() if self.mask is not None else 0
        pinned = nbytes > 0 and self.mask.device.type == "cpu" and self.mask.is_pinned()
        lists = self._lists.indices if self._lists_usable() else None
        list_bytes = lists.numel() * lists.element_size() if lists is not None else 0
        return SiteStats(self.name, self.calls, self.n_dense, self.n_profiled, self.n_sparse, last, mean, self.fallback,
                         self.n_direct, 0 if pinned else nbytes, nbytes if pinned else 0, list_bytes,
                         0 if self.order is None else self.order.numel() * self.order.element_size())


class ModelState:
    """All sites of one compiled model, by name."""

    def __init__(self) -> None:
        self.sites: dict[str, SiteState] = {}
        self.owner_name: Optional[str] = None  # see SiteTemplate.owner_name
        self._claims: dict[str, Any] = {}  # site name -> the call site (SiteInfo.call_site) that runs it
        self._names: dict[tuple, str] = {}  # (template name, call site) -> site name (see site_name)

    def single_config(self, compiled: bool = False) -> Optional[FGAttnConfig]:
        """The one config all sites run with (``compiled``: the one they were compiled with,
        before any ``configure``), or None when they differ or there is no site."""
        configs = {(s._template_config or s.config) if compiled else s.config for s in self.sites.values()}
        return next(iter(configs)) if len(configs) == 1 else None

    def site_name(self, template: SiteTemplate, call_site: Optional[tuple] = None) -> str:
        """The name ``template``'s calls run under in this model: ``template.name``, unless another
        call site (``SiteInfo.call_site``) of the same model already runs under it. Then the next
        free ``"<name>#<n>"``, kept for that call site. One module called from two places in two
        graphs (a weight-tied block used twice with a graph break between the uses) names its
        site the same in both graphs; sharing one state, the second use would run on the first
        use's mask. Names are given in first-run order, so a model run the same way names its
        sites the same (``save_state`` / ``load_state``). Recompiles of the same code (new shapes,
        another torch.compile of the module) have the same call site and share the state. One
        graph that runs twice per forward with the same weights (a weight-tied block called in a
        loop with a graph break inside) cannot be told apart this way: its calls share a state."""
        key = getattr(template.info, "call_site", None)
        if call_site is not None:
            key = (call_site, key)
        if key is None:
            return template.name
        got = self._names.get((template.name, key))
        if got is not None:
            return got
        with _LOCK:
            name = template.name
            if self._claims.setdefault(name, key) != key:
                base, n = name.split("#")[0], 1
                while f"{base}#{n}" in self._claims:
                    n += 1
                name = f"{base}#{n}"
                self._claims[name] = key
                log.info("fgcompile: site %s called from another place than its first use runs as %s", template.name, name)
            self._names[(template.name, key)] = name
        return name

    def site(self, template: SiteTemplate, call_site: Optional[tuple] = None) -> SiteState:
        """The state of ``template``'s site (named by :meth:`site_name`), created on first use. A
        site compiled again with another config (a new torch.compile of the same model) takes the
        new config and starts its schedule over (``SiteState.reset``). ``call_site``: what tells
        this call's site apart from others of the same name, in place of ``SiteInfo.call_site``
        (an anchored call: the anchor graph and the call's place after it)."""
        if template.owner_name is not None:
            self.owner_name = template.owner_name
        name = self.site_name(template, call_site)
        site = self.sites.get(name)
        if site is None:
            site = SiteState(name=name, config=template.config, info=template.info)
            site._template_config = template.config
            self.sites[name] = site
        elif site._template_config != template.config:  # compiled again with another config
            site.config = site._template_config = template.config
            site.reset()  # its schedule (warm-up, profiled calls) starts over, as for a new model
        if template.info is not None:
            site.info = template.info  # the graph running now (static and dynamic graphs may alternate)
        return site


_UNOWNED = ModelState()  # sites of graphs with no parameter input (compiled functions)


def _state_of_owner(owner: Optional[torch.Tensor]) -> ModelState:
    if owner is None:
        return _UNOWNED
    st = _OWNED.get(owner)
    if st is None:
        with _LOCK:
            st = _OWNED.get(owner)
            if st is None:
                st = _OWNED[owner] = ModelState()
    return st


# ------------------------------------------------------------------ graphs without a parameter
# A graph with no parameter input (a graph-break segment holding only the attention: the original
# Wan2.1 code breaks the graph between its projections and its attention) has no owner to key its
# sites' state: Dynamo runs the same graph for every layer. Its calls take their state from the
# anchor: the last graph with a parameter that fgattn compiled and this thread ran (the layer's
# projections), provided a module holding that graph's owner parameter is still running (on the
# Python stack). The state is the anchor owner's ModelState; the site is told apart by its place:
#
#     (the anchor graph (its parameters' paths),
#      the innermost running module that holds the anchor's owner (the layer),
#      the code places (line, bytecode offset) of the running modules' calls, from that module
#      up to the outermost one,
#      the call's count among the calls of that place since the anchor ran)
#
# A forward runs the same code each time, so a place is the same attention at every step: a
# layer's attention after its own projections; the second use of a weight-tied block (another
# line of the parent's forward); an attention before the forward's first graph with parameters
# (another line than the previous forward's last attention, whose anchor it inherits); the n-th
# call of a helper in a loop. Without a valid anchor (a compiled function called from code that
# is not compiled) the site's state is the shared _UNOWNED one, where the profile predictor runs
# dense.

#: Anchored calls one anchor serves; later ones (an anchor that stays current while a compiled
#: function runs over and over) take the shared state.
MAX_ANCHORED_CALLS = 64


@dataclass
class _Anchor:
    """The graph with a parameter this thread ran last (see above)."""

    tag: tuple  # the graph's parameter paths: the same for recompiles of the same code
    owner: "weakref.ref[torch.Tensor]"  # its owner parameter
    owner_name: Optional[str]
    calls: dict = field(default_factory=dict)  # place -> anchored calls there since it ran


_ANCHOR = threading.local()  # .value: the thread's _Anchor
_MEMBERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def anchoring(compiled: Any, owner_index: int, tag: tuple, owner_name: Optional[str]) -> Any:
    """``compiled`` (what the backend returns for a graph whose input ``owner_index`` is its owner
    parameter), made to record itself as the thread's anchor at each call. ``tag``: the graph's
    parameter paths; ``owner_name``: the owner's path in the compiled module."""

    def anchored_graph(*args: Any) -> Any:
        _ANCHOR.value = _Anchor(tag, weakref.ref(args[owner_index]), owner_name)
        return compiled(*args)

    anchored_graph.__name__ = getattr(compiled, "__name__", "anchored_graph")
    return anchored_graph


def _holds(module: torch.nn.Module, p: torch.Tensor) -> bool:
    """Whether ``p`` is a parameter of ``module`` (its own or its submodules'; cached per module
    by identity: a parameter replaced later is not found, which only leaves a site dense)."""
    members = _MEMBERS.get(module)
    if members is None:
        members = {id(q): weakref.ref(q) for q in module.parameters()}
        _MEMBERS[module] = members
    ref = members.get(id(p))
    return ref is not None and ref() is p


def _running_module(frame: Any) -> Optional[torch.nn.Module]:
    """The module whose method ``frame`` runs (its ``self``), if any (GraphModules excluded)."""
    if "self" not in frame.f_code.co_varnames:
        return None
    module = frame.f_locals.get("self")
    if isinstance(module, torch.nn.Module) and not isinstance(module, torch.fx.GraphModule):
        return module
    return None


def _anchor_place(frame: Any) -> Optional[tuple]:
    """(anchor, place) of a call whose caller's frame is ``frame``: the thread's anchor if its
    owner parameter is alive and held by a running module (on the stack above ``frame``), and the
    call's place (see above, without the count); None without such an anchor."""
    anchor = getattr(_ANCHOR, "value", None)
    owner = anchor.owner() if anchor is not None else None
    if owner is None:
        return None
    holder, lines = None, []
    while frame is not None:
        module = _running_module(frame)
        if holder is None and module is not None and _holds(module, owner):
            holder = module
        if holder is not None and module is not None:
            code = frame.f_code
            lines.append((code.co_filename, code.co_name, frame.f_lineno, frame.f_lasti))
        frame = frame.f_back
    if holder is None:
        return None
    return anchor, (anchor.tag, id(holder), tuple(lines))


def current_anchor() -> Optional[_Anchor]:
    """The thread's anchor, if its owner parameter is alive and held by a module whose call is on
    the Python stack (a forward of the model that ran the anchor graph is still running), else None."""
    found = _anchor_place(sys._getframe(1))
    return found[0] if found is not None else None


def _states_of(model: Any) -> list[tuple[str, ModelState]]:
    """(prefix, state) for every state owned by a parameter of ``model``; prefix is the path, in
    ``model``, of the module that was compiled (empty when the whole model was): with regional
    compilation (each block compiled) every block has its own state."""
    owner = _owner_module(model)
    found: list[tuple[str, ModelState]] = []
    if not (isinstance(owner, torch.nn.Module) and any(True for _ in owner.parameters())):
        # a compiled function or a module without parameters: its graphs have no parameter to
        # own their sites, which live in the one state all of those share
        return [("", _UNOWNED)] if _UNOWNED.sites and callable(owner) else []
    for pname, p in owner.named_parameters(remove_duplicate=False):
        st = _OWNED.get(p)
        if st is None or any(st is f for _, f in found):
            continue
        prefix = ""
        if st.owner_name and pname.endswith(st.owner_name):
            prefix = pname[: len(pname) - len(st.owner_name)].rstrip(".")
        found.append((prefix, st))
    if not found and _UNOWNED.sites and any(p in _COMPILED for p in owner.parameters()) and not compiled_decisions(owner):
        # compiled under fgattn, but no graph with a parameter held a site: its attention ran
        # only in graph-break segments without one (a graph break between the projections and
        # the attention), whose sites live in the shared state
        found.append(("", _UNOWNED))
    return found


def state_of(model: Any) -> ModelState:
    """The state of a compiled model (what torch.compile returned, or the module it wraps): the
    sites of every graph compiled from it (or from its submodules, with regional compilation),
    named by their path in the model. Raises ValueError if it never ran a sparse site under
    fgattn. Compiled functions and modules without parameters have no parameter to own their
    sites: they all share one state (their sites are told apart by name only), which also answers
    for a model whose attention ran only in graph-break segments without a parameter."""
    found = _states_of(model)
    if not found:
        decided = compiled_decisions(model)
        if decided:
            listed = "; ".join(f"{n}: {d} ({r})" for n, (_, d, r) in list(decided.items())[:8])
            more = f" (and {len(decided) - 8} more)" if len(decided) > 8 else ""
            raise ValueError(
                "model: no attention site of this model has run sparse under fgattn, so it has no fgcompile "
                f"state; its compiles decided: {listed}{more}"
            )
        raise ValueError(
            "model: expected a model compiled with backend='fgattn' (or fgcompile.backend(...)) "
            "that has run at least once; no fgcompile state is attached to it (a model whose "
            "attention sites all run dense has none: fgcompile.explain(model, *inputs) gives their reasons)"
        )
    if len(found) == 1 and not found[0][0]:
        return found[0][1]
    merged = ModelState()  # a view over the sites of several states, by full path
    for prefix, st in found:
        for name, site in st.sites.items():
            full = base = _full_name(prefix, name, site)
            n = 1
            while full in merged.sites:  # (graphs of one module owned by two of its parameters)
                full, n = f"{base}#{n}", n + 1
            merged.sites[full] = site
    return merged


def _full_name(prefix: str, name: str, site: "SiteState") -> str:
    """A site's path in the model: ``prefix`` (the compiled module's path) joined to its name in
    that module's graph; a site in the compiled module's own forward (named ``attention``,
    ``attention#1``...) takes the module's path itself (``blocks.0``, ``blocks.0#1``), the name a
    whole-model compile gives it."""
    if not prefix:
        return name
    if getattr(site.info, "in_root", False):
        return prefix + name[len(name.split("#")[0]):]  # "attention#1" -> prefix + "#1"
    return f"{prefix}.{name}"


def _copy_to(t: torch.Tensor, ready: Optional[Any], device: torch.device,
             stream: Optional["torch.cuda.Stream"] = None) -> torch.Tensor:
    """``t`` (a cached mask or index list, in host memory or on a device) on ``device``. On CUDA
    enqueued on ``stream`` (default: the current stream) after the event ``ready`` (the copy that
    made ``t``, still in flight) if any, asynchronous from pinned memory: no host sync."""
    if device.type != "cuda":
        return t.to(device)
    stream = stream if stream is not None else torch.cuda.current_stream(device)
    if ready is not None:
        stream.wait_event(ready)
    with torch.cuda.stream(stream):
        return t.to(device, non_blocking=True)


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The stream that copies masks between host and the CUDA ``device`` (one per device, created
    on first use)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        with _LOCK:
            stream = _SIDE_STREAMS.get(index)
            if stream is None:
                stream = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def _note_call(site: SiteState) -> None:
    """After a call of ``site``: learn the call order (the site this thread called before is
    followed by ``site``; kept per thread and across models, so that blocks compiled one by one,
    each with its own ModelState, are linked too), then prefetch the host mask of the site that
    followed ``site`` last time, when its next call will read it."""
    ref = weakref.ref(site)
    last = getattr(_ORDER, "last", None)
    last = last() if last is not None else None
    if last is not None:
        last._successor = ref
    _ORDER.last = ref
    nxt = site.successor
    # (not while a CUDA graph is captured: the next call copies its own mask then)
    if nxt is not None and nxt._wants_prefetch() and not torch.cuda.is_current_stream_capturing():
        try:
            nxt.prefetch()
        except Exception as e:  # only speed depends on it: the next call copies its mask itself
            if strict_mode():
                raise
            log.warning("fgcompile: site %s: prefetching its cached mask failed: %s", nxt.name, e)


def _site(handle: int, owner: Optional[torch.Tensor]) -> SiteState:
    """The state one call of site ``handle`` runs on: its owner's, else (a graph without a
    parameter) its anchor's, counting the call among the anchored ones; else the shared state,
    where the profile predictor runs dense."""
    template = template_of(handle)
    if owner is not None or not template.anchored:
        return _state_of_owner(owner).site(template)
    found = _anchor_place(sys._getframe(1))
    anchor = found[0] if found is not None else None
    if anchor is not None and sum(anchor.calls.values()) < MAX_ANCHORED_CALLS:
        place = found[1]
        count = anchor.calls.get(place, 0)
        anchor.calls[place] = count + 1
        state = _state_of_owner(anchor.owner())
        if state.owner_name is None:
            state.owner_name = anchor.owner_name
        return state.site(template, (place, count))
    site = _UNOWNED.site(template)
    if site.config.predictor == "profile" and site.fallback is None:
        why = ("no fgattn graph with parameters of a module that is running ran before it" if anchor is None
               else f"more than {MAX_ANCHORED_CALLS} calls of sites without parameters followed one graph")
        site.fallback = f"a graph without parameters whose calls cannot be told apart ({why}): dense"
    return site


def run_site(
    handle: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: Optional[torch.Tensor],
    scale: float,
    owner: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Entry point of the ``fgcompile::site_attention`` op."""
    return _site(handle, owner)(q, k, v, key_padding, scale)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Dense attention through SDPA. q (B, H, S_q, D), k/v (B, H_kv, S_kv, D), key_padding bool
    (B, S_kv) (True = real key) or None. Returns a contiguous (B, H, S_q, D_v) tensor."""
    mask = None
    if key_padding is not None:
        mask = key_padding[:, None, None, :].to(torch.bool)
    gqa = q.shape[1] != k.shape[1]
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.contiguous()


# ---------------------------------------------------------------------- public helpers
#: FGAttnConfig fields that change the compiled graph (which sites are rewritten): these need a
#: new torch.compile; every other field is read at run time and can be changed by ``configure``.
GRAPH_FIELDS = ("min_seq_len",)


def configure(model: Any, **changes: Any) -> None:
    """Change run-time settings of every site of a compiled model without recompiling, e.g.
    ``fgcompile.configure(model, density=0.3)`` or ``(predictor="pooled", tau=0.95)``. Cached masks
    are dropped when a field that shapes them changes. Fields that decide which sites are sparse
    (``GRAPH_FIELDS``) raise ValueError: compile again with a new backend for those.
    ``dense_sites`` patterns match each site's full path in ``model`` here (``stats``' names), also
    under regional compilation, where the compile-time patterns only see the names inside each
    compiled block (``attn``, not ``blocks.0.attn``)."""
    unknown = sorted(set(changes) - {f.name for f in fields(FGAttnConfig)})
    if unknown:
        raise ValueError(f"{unknown[0]}: not an FGAttnConfig field")
    bad = sorted(set(changes) & set(GRAPH_FIELDS))
    if bad:
        raise ValueError(f"{bad[0]}: decides which sites are rewritten at compile time; compile the model again with it")
    named = state_of(model).sites  # by full path in the model
    if changes.get("block_n", 1) != 1 and any(getattr(s.info, "mask", None) == "key_padding" for s in named.values()):
        raise ValueError(f"block_n: a site with a key-padding mask needs block_n == 1, got {changes['block_n']}")
    for full_name, site in named.items():
        if "dense_sites" in changes:
            site.full_name = full_name
        new = site.config.replace(**changes)
        if new == site.config:
            continue
        mask_fields = ("predictor", "alpha", "tau", "gamma", "density", "block_m", "block_n", "query_order")
        if any(getattr(new, f) != getattr(site.config, f) for f in mask_fields):
            site._drop_mask()
        site._prefetched = None  # made under the old settings; a new mask_storage applies at the next call
        site.config = new
        site.fallback = None  # a sparse path that failed under the old settings gets a fresh try


def reset(model: Any) -> None:
    """Restart every site's schedule (a new video): the next call of each site is its first."""
    for site in state_of(model).sites.values():
        site.reset()


def stats(model: Any) -> dict[str, SiteStats]:
    """Per-site statistics of a compiled model: calls, dense/profiled/sparse counts, and per-head
    kept density of the last call and its mean over calls. Synchronises with the device."""
    return {name: s.stats() for name, s in state_of(model).sites.items()}


def _check_path(path: Any) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path: expected a file path (str or os.PathLike), got {type(path).__name__}")


def save_state(model: Any, path: str) -> None:
    """Save calibrated state (config, per-site schedule position and cached masks, as bitmaps) to
    ``path`` (torch.save format, versioned)."""
    _check_path(path)
    st = state_of(model)
    config = st.single_config()
    sites = {}
    for name, s in st.sites.items():
        entry: dict[str, Any] = {
            "config": s.config.to_dict(),
            "calls": s.calls,
            "counts": [s.n_dense, s.n_profiled, s.n_sparse],
            "mask_key": None,
            "mask_bits": None,
            "mask_shape": None,
            "order": None,
        }
        if s.mask is not None and s.mask_key is not None:
            q_shape, k_shape, bm, bn = s.mask_key
            entry["mask_key"] = [list(q_shape), list(k_shape), bm, bn]
            entry["mask_shape"] = list(s.mask.shape)
            entry["mask_bits"] = s.host_mask()
            entry["order"] = None if s.order is None else s.order.cpu()
        sites[name] = entry
    torch.save({"format": "fgcompile-state", "version": STATE_VERSION, "config": config.to_dict() if config else None, "sites": sites}, path)


def _saved_entry(name: str, entry: Any) -> tuple:
    """``(config, calls, counts, mask_key, mask_bits, order)`` of one site's entry of a state file,
    checked against each other (the bitmap's shape and dtype against the shapes it was made for, the
    query order against q's shape and the config's ``query_order``); raises ValueError naming the
    site and what is wrong."""
    where = f"path: site {name!r} of the state file"
    if not isinstance(entry, dict) or not {"config", "calls", "counts", "mask_key", "mask_bits"} <= set(entry):
        raise ValueError(f"{where}: expected an entry with config, calls, counts, mask_key and mask_bits")
    cfg = entry["config"]
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: its config is not a dict")
    try:  # unknown fields (a newer version's file?) and invalid values raise there
        config = FGAttnConfig.from_options({k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: its config is not valid: {e}") from e
    calls, counts = entry["calls"], entry["counts"]
    if not isinstance(calls, int) or calls < 0:
        raise ValueError(f"{where}: calls should be an int >= 0, got {calls!r}")
    if not (isinstance(counts, (list, tuple)) and len(counts) == 3 and all(isinstance(c, int) and c >= 0 for c in counts)):
        raise ValueError(f"{where}: counts should be 3 ints >= 0, got {counts!r}")
    key, bits = entry["mask_key"], entry["mask_bits"]
    if (key is None) != (bits is None):
        raise ValueError(f"{where}: mask_key and mask_bits should both be given or both None")
    if key is not None:
        try:
            q_shape, k_shape, bm, bn = key
            q_shape, k_shape, bm, bn = tuple(int(x) for x in q_shape), tuple(int(x) for x in k_shape), int(bm), int(bn)
            assert len(q_shape) == len(k_shape) == 4 and bm > 0 and bn > 0
        except Exception:
            raise ValueError(f"{where}: mask_key should be [q shape (4 ints), k shape (4 ints), block_m, block_n], got {key!r}") from None
        b, h, s_q, _ = q_shape
        n_kb = -(-k_shape[2] // bn)
        want = (b, h, -(-s_q // bm), -(-n_kb // 32))  # (B, H, nQB, words of nKB bits)
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.int32 or tuple(bits.shape) != want:
            got = f"{tuple(bits.shape)} {bits.dtype}" if isinstance(bits, torch.Tensor) else type(bits).__name__
            raise ValueError(f"{where}: its mask should be an int32 bitmap of shape {want} for the shapes it was saved "
                             f"for, got {got}")
        key = (q_shape, k_shape, bm, bn)
    order = entry.get("order")  # absent in files written before query_order
    if (order is not None) != (key is not None and config.query_order != "none"):
        raise ValueError(f"{where}: a mask made with query_order={config.query_order!r} should come with its query order "
                         f"(and only such a mask), got {'one' if order is not None else 'none'}")
    if order is not None:
        want = (b, h, s_q)
        if (not isinstance(order, torch.Tensor) or order.dtype != torch.int32 or tuple(order.shape) != want
                or not torch.equal(order.sort(-1).values, torch.arange(s_q, dtype=torch.int32).expand(want))):
            got = f"{tuple(order.shape)} {order.dtype}" if isinstance(order, torch.Tensor) else type(order).__name__
            raise ValueError(f"{where}: its query order should be an int32 permutation of the {s_q} queries per "
                             f"batch item and head, shape {want}, got {got}")
    return config, calls, tuple(counts), key, bits, order


def load_state(model: Any, path: str) -> None:
    """Load state saved by ``save_state`` into a compiled model that has run once (so its sites
    exist): each site's schedule position, cached mask and settings. The file's settings replace
    those the model was compiled or configured with (they are the calibration: predictor, alpha,
    density, block sizes, ...; a warning lists what changed), except ``mask_storage``, which stays
    this model's. Raises ValueError when the file is not fgcompile state, its version is unknown,
    an entry is malformed (a mask that does not fit the shapes it was saved for), or its sites or
    shapes do not match the model's; nothing is loaded then."""
    _check_path(path)
    st = state_of(model)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"path: {path!r} is not an fgcompile state file ({type(e).__name__}: {e})") from e
    if not isinstance(blob, dict) or blob.get("format") != "fgcompile-state":
        raise ValueError(f"path: {path!r} is not an fgcompile state file")
    if blob.get("version") != STATE_VERSION:
        raise ValueError(f"path: state version {blob.get('version')!r} is not supported (expected {STATE_VERSION})")
    if not isinstance(blob.get("sites"), dict):
        raise ValueError(f"path: {path!r} is not an fgcompile state file (no sites)")
    entries = {name: _saved_entry(name, entry) for name, entry in blob["sites"].items()}
    saved, have = set(entries), set(st.sites)
    if saved != have:
        raise ValueError(
            f"path: the saved state's sites do not match the model's: missing in the model {sorted(saved - have)}, "
            f"not in the file {sorted(have - saved)}"
        )
    for name, (_, _, _, key, _, _) in entries.items():
        last = st.sites[name].last_shapes
        if key is None or last is None:
            continue
        (b, h, s_q, d), (_, _, s_kv, _) = key[0], key[1]
        (b2, h2, s_q2, d2), (_, _, s_kv2, _) = last
        if (b, h, s_q, s_kv, d) != (b2, h2, s_q2, s_kv2, d2):  # a mask holds one row set per batch item
            raise ValueError(
                f"path: site {name!r} was saved for a different shape: (batch, heads, S_q, S_kv, head_dim) = "
                f"{(b, h, s_q, s_kv, d)} in the file, {(b2, h2, s_q2, s_kv2, d2)} in the model's last call"
            )
    changed: set = set()
    for name, (saved, calls, counts, key, bits, order) in entries.items():
        site = st.sites[name]
        site.full_name = name  # its path in the model: dense_sites patterns of the file match it here
        saved = saved.replace(mask_storage=site.config.mask_storage)  # where masks live: this machine's choice
        changed |= {f.name for f in fields(FGAttnConfig) if getattr(saved, f.name) != getattr(site.config, f.name)}
        site.config = saved
        site.reset()
        site.calls = calls
        site.n_dense, site.n_profiled, site.n_sparse = counts
        if bits is not None:
            q_shape, k_shape, bm, bn = key
            from .kernels.packing import popcount_rows

            site.mask = bits
            if site.config.mask_storage != "device" and torch.cuda.is_available() and not site._pin_failed:
                # no pinned memory to be had: the mask goes to the device at first use
                pinned = site._pinned(site.mask.pin_memory, "cannot pin its loaded mask (%s); it will stay on the GPU")
                if pinned is not None:
                    site.mask = pinned
            site.mask_key = (tuple(q_shape), tuple(k_shape), bm, bn)
            n_kb = -(-k_shape[2] // bn)
            rows = popcount_rows(site.mask)
            site.mask_density = float(rows.double().mean()) / n_kb
            site.mask_cap = int(rows.max()) if rows.numel() else None
            site.order = order  # moves to the device at its first sparse call
    if changed:
        log.warning("fgcompile: load_state(%s): the file's settings replace the model's for %s", path, sorted(changed))


def plan_site(
    handle: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: Optional[torch.Tensor],
    scale: float,
    owner: Optional[torch.Tensor] = None,
    index_cap: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[Any]]:
    """Entry point of the ``fgcompile::site_plan`` op (the CUDA lowering): one schedule step of
    the site (``SiteState.plan``). Returns ``(None, PackedSlices)`` for a sparse call (the kernel
    in the compiled graph computes the output), ``(out, None)`` for a dense call, and ``(out,
    PackedSlices)`` for the site's first profiled call (since its state began or was reset): the
    exact output plus the packing of the mask it just made. The graph selects ``out``; the kernel
    still runs on a real mask, so that the autotuner (``mode="max-autotune"``), which tunes on the
    first launch, sees real work. Later profiled calls return ``(out, None)``: the kernel then
    keeps nothing (a few microseconds) instead of a pass at the mask's density.

    ``index_cap``: the index columns the compiled graph holds (``ops.plan_shapes``). A sparse call
    whose mask's bound is larger (a ``configure()`` that raised the density budget after
    compiling, a loaded mask) cannot fit: the kernel runs here, directly, and the call returns
    ``(out, None)``, the graph selecting it like a dense output. So does a sparse call of a site
    whose mask is in its own query order (``query_order``): the graph's kernel reads q as it is."""
    site = _site(handle, owner)
    out, packed = site.plan(q, k, v, key_padding, scale, index_cap)
    bits, site._profiled_bits = site._profiled_bits, None
    if bits is not None and site.n_profiled == 1:  # the first profiled call: the packing of its mask
        try:
            packed = site.packed(bits, k, index_cap)
        except Exception as e:  # only the autotuner's view of the call depends on it
            log.warning("fgcompile: site %s: packing the profiled mask failed (%s); the kernel sees no work", site.name, e)
            packed = None
        if packed is not None and index_cap is not None and packed.indices.shape[-1] != index_cap:
            packed = None  # does not fit the graph's buffers: the kernel sees no work this time
    elif out is None and (site.order is not None or (index_cap is not None and packed.indices.shape[-1] != index_cap)):
        # reordered queries (query_order): the compiled graph's kernel reads q in the model's order
        out, packed = site.run_sparse(q, k, v, key_padding, scale, packed, direct=True), None
    return out, packed


def template_of(handle: int) -> SiteTemplate:
    """The site template registered under ``handle`` (compile time: the lowering reads its config)."""
    template = _TEMPLATES.get(handle)
    if template is None:
        raise RuntimeError(f"fgcompile: unknown attention site handle {handle}")
    return template
