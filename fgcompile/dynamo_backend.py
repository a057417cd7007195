"""The ``fgattn`` torch.compile backend.

``torch.compile(model, backend="fgattn")`` (found through the ``torch_dynamo_backends`` entry
point, no import needed) or ``torch.compile(model, backend=fgcompile.backend(config))``.

What it does with each graph Dynamo captures:

1. expands nn.MultiheadAttention's fused call into projections around an SDPA call
   (``fgcompile.passes.expand_mha``), then finds every attention site
   (``fgcompile.passes.find_attention``) and decides, per site, sparse
   or dense, with a reason;
2. registers the sparse sites with the model's run-time state (``fgcompile.runtime``) and replaces
   each by ``torch.ops.fgcompile.site_attention`` (``fgcompile.passes.rewrite``); dense sites stay
   as they are;
3. on CUDA, splits each sparse site the kernel can take into the stateful schedule step
   (``fgcompile::site_plan``, opaque, kept out of CUDA graphs) and the sparse kernel
   (``fgcompile::sparse_attention``, a ``triton_op`` whose Triton source Inductor compiles into its
   program and autotunes; ``fgcompile.lowering.cuda``); on the CPU the site stays one opaque op;
4. hands the graph to Inductor (``compile_fx``), so everything else is compiled exactly as by
   ``backend="inductor"``.

Nothing here may crash a user's compile: if the fgcompile passes fail on a graph, the graph is
compiled unchanged (dense) and the failure is logged at WARNING level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from . import runtime
from .config import FGAttnConfig, strict_mode
from .lowering import ops, torch_private

__all__ = ["fgattn", "backend", "FGAttnBackend", "TransformResult", "transform"]

log = torch_private.register_fgcompile_log()


@dataclass
class TransformResult:
    """What the fgcompile passes did to one captured graph."""

    graph: torch.fx.GraphModule
    sites: list = field(default_factory=list)  # list[fgcompile.passes.find_attention.SiteInfo]
    lowered: int = 0  # sites lowered to site_plan + the Triton sparse_attention op (CUDA)
    # (node, "softmax" | "sdpa" | "mha" | "opaque", why) of the softmax / SDPA / nn.MultiheadAttention
    # nodes and the opaque attention kernels that are not attention sites
    rejected: list = field(default_factory=list)
    owner: Optional[torch.Tensor] = None  # the parameter that owns the sites' run-time state (see fgcompile.runtime)
    owner_index: Optional[int] = None  # its place among the graph's inputs
    owner_name: Optional[str] = None  # its path in the compiled module
    # the graph's parameters' paths (what tells graphs apart as anchors, see runtime.anchoring)
    parameter_paths: tuple = ()
    # a graph without a parameter: the owner of the anchor graph that ran before it was compiled
    anchor: Optional[torch.Tensor] = None

    def anchored(self, compiled: Callable) -> Callable:
        """``compiled`` (the graph's compiled callable), made to record the graph as its thread's
        anchor at each call (``runtime.anchoring``) when it has an owner parameter."""
        if self.owner_index is None:
            return compiled
        return runtime.anchoring(compiled, self.owner_index, self.parameter_paths, self.owner_name)


def _grad_needed(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    )


def _on_cuda(example_inputs: Sequence[Any]) -> bool:
    return any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in example_inputs)


def _owner_placeholder(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], matches: Sequence[Any] = ()
) -> Optional[torch.fx.Node]:
    """The parameter placeholder whose identity, at run time, says which model instance (or
    block) the graph is running for (see fgcompile.runtime): the parameter nearest to the first
    site's queries (walking back from q through the graph: the query projection's weight, or a
    query norm's), else the graph's first parameter. Near the attention rather than first, so
    that blocks or models that share some other parameter (a tied embedding, a shared patch
    module) do not share their sites' state."""
    params = {
        node for node, value in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs)
        if isinstance(value, torch.nn.Parameter)
    }
    if not params:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for m in matches:
        seen, frontier = {m.q}, [m.q]
        while frontier:  # breadth first: the fewest ops between the parameter and q
            found = [n for n in frontier if n in params]
            if found:
                return min(found, key=order.__getitem__)
            nxt = []
            for n in frontier:
                for a in n.all_input_nodes:
                    if a not in seen:
                        seen.add(a)
                        nxt.append(a)
            frontier = nxt
    return next(n for n in gm.graph.nodes if n in params)


def _make_dense(matches: list, reason: str) -> None:
    """Turn every site still decided sparse to dense, with ``reason``."""
    for m in matches:
        if m.info.decision == "sparse":
            m.info.decision, m.info.reason = "dense", reason


def transform(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: FGAttnConfig,
    autotune: bool = False,
    inductor_patches: Optional[Mapping[str, Any]] = None,
) -> TransformResult:
    """Run fgcompile's FX passes on a Dynamo graph, in place: detect, decide, register, rewrite,
    lower (CUDA). ``autotune``: whether the lowered sparse kernel autotunes its configs.
    ``inductor_patches``: the Inductor config patches the graph will be compiled under (the
    lowering starts the sparse kernel's compile early, under them)."""
    from .lowering.ops import site_attention
    from .passes.expand_flash import expand_flash
    from .passes.expand_mha import expand_mha
    from .passes.find_attention import find_attention_sites
    from .passes.rewrite import rewrite_sites

    rejected: list = []
    with torch_private.timed("fgcompile.find_attention"):
        expand_mha(gm, rejected)  # nn.MultiheadAttention's fused call -> projections + SDPA
        expand_flash(gm)  # flash-attn's forward ops -> SDPA
        matches = find_attention_sites(gm, config, rejected)
    if _grad_needed(example_inputs):
        _make_dense(matches, "autograd is recording (inputs require grad): the sparse kernels have no backward; "
                             "run inference under torch.no_grad() or torch.inference_mode()")
    owner = _owner_placeholder(gm, example_inputs, [m for m in matches if m.info.decision == "sparse"] or matches)
    # A graph without a parameter (a graph-break segment holding only the attention, which
    # Dynamo reuses for every layer) takes its sites' state at each call from the graph with
    # parameters that ran before it, its anchor (see fgcompile.runtime).
    anchor = runtime.current_anchor() if owner is None else None
    if owner is None and anchor is None and config.predictor == "profile":
        # No parameter says which model or layer a call is for (a compiled function, a module
        # without parameters, called from code that is not compiled): a cached profile mask
        # could then be applied to another layer's attention.
        _make_dense(matches, "no parameter input owns this graph and no graph with parameters of a running module "
                             "ran before it (a compiled function or a module without parameters, called from code "
                             "that is not compiled): the profile predictor's cached mask could be another layer's; "
                             "use predictor='pooled' (no cached mask) or compile the module whose weights feed the "
                             "attention")
    owner_name = torch_private.placeholder_param_path(owner) if owner is not None else None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs))
    owner_value = values.get(owner) if owner is not None else None
    chosen = [
        (m, runtime.register_site(m.info.name, config, m.info, owner_name=owner_name, anchored=owner is None))
        for m in matches
        if m.info.decision == "sparse"
    ]
    rewrite_sites(gm, chosen)
    if owner is not None:
        op = torch.ops.fgcompile.site_attention.default
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (op, site_attention):
                args = list(node.args) + [None] * (6 - len(node.args))
                node.args = tuple(args[:6]) + (owner,)
    gm.graph.lint()
    gm.recompile()
    from .lowering.cuda import lower_cuda_sites

    with torch_private.timed("fgcompile.lower_cuda_sites"):
        lowered = lower_cuda_sites(gm, autotune, dict(inductor_patches or {}))
    for m in matches:
        i = m.info
        log.info(
            "fgcompile: site %s (%s) B=%s H=%s/%s S_q=%s S_kv=%s D=%s %s mask=%s -> %s: %s",
            i.name, i.pattern, i.batch, i.num_heads, i.num_kv_heads, i.seq_len_q, i.seq_len_kv,
            i.head_dim, i.dtype, i.mask, i.decision, i.reason,
        )
    paths = tuple(torch_private.placeholder_param_path(n) or n.name for n in placeholders
                  if isinstance(values.get(n), torch.nn.Parameter))
    return TransformResult(
        gm, [m.info for m in matches], lowered, rejected, owner_value,
        placeholders.index(owner) if owner is not None else None, owner_name, paths,
        anchor.owner() if anchor is not None else None,
    )


class FGAttnBackend:
    """A torch.compile backend object bound to one ``FGAttnConfig``.

    ``torch.compile(model, backend=FGAttnBackend(cfg), mode=...)``; ``mode`` is handed to Inductor
    as by ``backend="inductor"``."""

    def __init__(self, config: Optional[FGAttnConfig] = None):
        if config is not None and not isinstance(config, FGAttnConfig):
            raise ValueError(f"config: expected an FGAttnConfig or None, got {type(config).__name__}")
        self.config = config or FGAttnConfig()
        self.__name__ = "fgattn"

    def __repr__(self) -> str:
        return f"FGAttnBackend({self.config!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FGAttnBackend) and other.config == self.config

    def __hash__(self) -> int:
        return hash(self.config)

    def __call__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        *,
        mode: Optional[str] = None,
        options: Optional[Mapping[str, Any]] = None,
    ) -> Callable:
        config = self.config if options is None else FGAttnConfig.from_options({"config": self.config, **options})
        if _on_cuda(example_inputs):  # the pool compiles Triton kernels: useless to CPU graphs
            with torch_private.timed("fgcompile.warm_compile_pool"):
                torch_private.warm_compile_pool()
        patches = torch_private.inductor_mode_options(mode)
        result = None
        try:
            from .kernels.triton_sparse import autotune_wanted
            from .lowering.inductor import kernel_config_patches, max_autotune_enabled

            autotune = autotune_wanted(bool(patches.get("max_autotune")) or max_autotune_enabled())
            with torch_private.timed("fgcompile.transform"):
                result = transform(gm, example_inputs, config, autotune, {**patches, **kernel_config_patches()})
            # for stats' error and explain (a graph without parameters: under its anchor's owner)
            runtime.record_compile(result.owner if result.owner is not None else result.anchor, config, result.sites)
        except Exception as e:  # never crash a user's compile: sites not yet rewritten stay dense
            log.warning(
                "fgcompile: the attention passes failed (%s: %s); the sites not rewritten yet stay dense",
                type(e).__name__, e,
            )
            if strict_mode():
                raise
        if any(n.op == "call_function" and n.target is ops.site_plan._opoverload for n in gm.graph.nodes):
            from .lowering.inductor import kernel_config_patches, partition_config_patches

            patches.update(kernel_config_patches())
            patches.update(partition_config_patches(bool(patches.get("triton.cudagraphs", False))))
        compiled = torch_private.compile_fx(gm, list(example_inputs), patches)
        return result.anchored(compiled) if result is not None else compiled


def backend(config: Optional[FGAttnConfig] = None, **fields: Any) -> FGAttnBackend:
    """A backend for ``torch.compile(model, backend=fgcompile.backend(...))``: pass an
    ``FGAttnConfig``, or its fields as keywords (``fgcompile.backend(alpha=0.6)``), or both (the
    keywords replace the config's fields)."""
    if config is not None and not isinstance(config, FGAttnConfig):
        raise ValueError(f"config: expected an FGAttnConfig or None, got {type(config).__name__}")
    cfg = config or FGAttnConfig()
    if fields:
        cfg = FGAttnConfig.from_options({"config": cfg, **fields})
    return FGAttnBackend(cfg)


def fgattn(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
) -> Callable:
    """The ``"fgattn"`` backend registered as a ``torch_dynamo_backends`` entry point.
    ``options`` (from ``torch.compile(..., options={...})``) are FGAttnConfig fields."""
    return FGAttnBackend(FGAttnConfig.from_options(options))(gm, example_inputs, mode=mode)
