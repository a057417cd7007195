"""``fgcompile.explain``: what the fgattn backend finds and decides on a model, without running it
sparse.

    report = fgcompile.explain(model, *example_args, config=FGAttnConfig(min_seq_len=1024))
    print(report)            # a table of the attention sites, then the rewritten code
    report.sites             # list[SiteInfo]: name, pattern, shapes, mask, decision, reason
    report.rejected          # (node, "softmax" | "sdpa" | "mha" | "opaque", why) of nodes that are no site
    report.graph             # the rewritten torch.fx.GraphModule (the first, if Dynamo made several)
    report.graphs, report.graph_breaks

``explain`` captures the model with Dynamo (``torch.compile`` with a capturing backend: no
``torch._dynamo.reset()``, the user's other compiled models keep their caches), runs fgcompile's
passes on a copy of each captured graph, and runs the ORIGINAL graphs (dense, uncompiled) to
finish the call, so no sparse kernel and no Inductor compile runs. Runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from .config import FGAttnConfig
from .lowering import torch_private

__all__ = ["Report", "explain"]

_COLUMNS = (
    ("name", "name"),
    ("pattern", "pattern"),
    ("B", "batch"),
    ("H/H_kv", None),
    ("S_q", "seq_len_q"),
    ("S_kv", "seq_len_kv"),
    ("D", "head_dim"),
    ("dtype", "dtype"),
    ("mask", "mask"),
    ("decision", "decision"),
    ("reason", "reason"),
)


@dataclass
class Report:
    """The attention sites fgcompile found in a model and the rewritten graph(s).

    ``sites``: every site of every captured graph, in graph order (``SiteInfo``);
    ``graphs``: the rewritten ``torch.fx.GraphModule`` of each graph Dynamo captured;
    ``graph``: the first of them (None when nothing was captured);
    ``graph_breaks``: how many graph breaks Dynamo reported while capturing;
    ``graph_break_reasons``: Dynamo's reasons for them, and for frames it ran eagerly (an
    unsupported context manager, a ``torch.compiler.disable``d call): attention there is no site;
    ``rejected``: ``(node name, "softmax", "sdpa", "mha" or "opaque", why)`` for every softmax,
    scaled_dot_product_attention or multi_head_attention_forward node of the graphs that the pass
    did not take as an attention site (a spelling it does not follow, a softmax that is no
    attention, an nn.MultiheadAttention call with arguments it does not expand), and every call to
    an attention kernel it cannot see into (flash-attn, xFormers, FlexAttention...): they run as
    written."""

    sites: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    graphs: list = field(default_factory=list)
    graph_breaks: int = 0
    graph_break_reasons: list = field(default_factory=list)
    config: Optional[FGAttnConfig] = None
    #: {site name: (decision, reason)} the real compiles of the model decided, where that differs
    #: from this capture (e.g. dense under autograd: explain captures under torch.no_grad())
    compiled_otherwise: dict = field(default_factory=dict)

    @property
    def graph(self) -> Optional[fx.GraphModule]:
        return self.graphs[0] if self.graphs else None

    @property
    def sparse_sites(self) -> list:
        return [s for s in self.sites if s.decision == "sparse"]

    def table(self) -> str:
        """The sites as a fixed-width text table."""
        rows = []
        for s in self.sites:
            row = []
            for head, attr in _COLUMNS:
                if attr is None:
                    row.append(f"{s.num_heads}/{s.num_kv_heads}")
                else:
                    row.append(str(getattr(s, attr)))
            rows.append(row)
        heads = [h for h, _ in _COLUMNS]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
        widths[-1] = len(heads[-1])  # the reason column is last: no padding

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        out = [line(heads), line(["-" * w for w in widths[:-1]] + ["-" * 6])]
        out += [line(r) for r in rows]
        return "\n".join(out)

    def __str__(self) -> str:
        n_sparse = len(self.sparse_sites)
        head = (
            f"fgcompile: {len(self.sites)} attention site(s), {n_sparse} sparse, "
            f"{len(self.sites) - n_sparse} dense; {len(self.graphs)} graph(s), "
            f"{self.graph_breaks} graph break(s)"
        )
        parts = [head, ""]
        if not self.graphs:
            parts += ["Dynamo captured no graph: the call ran eagerly, so no attention can be rewritten (Dynamo skips "
                      "a frame it cannot trace, e.g. one that breaks the graph inside a loop); "
                      "TORCH_LOGS=graph_breaks,recompiles says why", ""]
        if self.graph_break_reasons:
            parts.append("graph breaks and frames run eagerly (Dynamo's reasons; attention there is not compiled):")
            parts += [f"  {r[:300]}" for r in self.graph_break_reasons]
            parts.append("")
        if self.sites:
            parts += [self.table(), ""]
        if self.compiled_otherwise:
            parts.append("when the compiled model ran, fgcompile decided otherwise:")
            parts += [f"  {name}: {d} ({r})" for name, (d, r) in self.compiled_otherwise.items()]
            parts.append("")
        if self.rejected:
            parts.append("not attention sites (left as written):")
            parts += [f"  {node} ({kind}): {why}" for node, kind, why in self.rejected]
            parts.append("")
        for i, g in enumerate(self.graphs):
            parts.append(f"# rewritten graph {i}" if len(self.graphs) > 1 else "# rewritten graph")
            parts.append(g.code.strip("\n"))
            parts.append("")
        return "\n".join(parts).rstrip() + "\n"

    def __repr__(self) -> str:
        return (
            f"Report(sites={len(self.sites)}, sparse={len(self.sparse_sites)}, graphs={len(self.graphs)}, "
            f"graph_breaks={self.graph_breaks})"
        )


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph sharing its attributes (parameters are not
    copied); node metadata (fake values, module stacks) is shared shallowly."""
    graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def _compiled_config(model: Any) -> Optional[FGAttnConfig]:
    """The config a model that has run under fgattn was compiled with (its sites' one config), or None."""
    from . import runtime

    try:
        return runtime.state_of(model).single_config(compiled=True)
    except ValueError:  # no site runs sparse: the config its compiles recorded
        configs = {c for c, _, _ in runtime.compiled_decisions(model).values()}
        return next(iter(configs)) if len(configs) == 1 else None


def explain(
    model: Callable, *args: Any, config: Optional[FGAttnConfig] = None, dynamic: Optional[bool] = None, **kwargs: Any
) -> Report:
    """Capture ``model(*args, **kwargs)`` with Dynamo and report every attention site fgcompile
    finds and its decision, with the rewritten graph(s). Nothing runs sparse: the captured graphs
    run as they were (dense, uncompiled). ``config`` defaults to the config ``model`` was compiled
    with when it has run under fgattn (with one config), else ``FGAttnConfig()``. ``dynamic``: as
    ``torch.compile``'s (pass the value the model is compiled with: under ``dynamic=True`` sizes
    are symbolic and Python floats are graph inputs, which can change decisions)."""
    from .dynamo_backend import transform

    if config is None:
        config = _compiled_config(model) or FGAttnConfig()
    if not isinstance(config, FGAttnConfig):
        raise ValueError(f"config: expected an FGAttnConfig or None, got {type(config).__name__}")
    if dynamic is not None and not isinstance(dynamic, bool):
        raise ValueError(f"dynamic: expected True, False or None, got {dynamic!r}")
    if not callable(model):
        raise ValueError(f"model: expected a callable (an nn.Module or a function), got {type(model).__name__}")
    target = getattr(model, "_orig_mod", model)  # an already compiled model: explain what it wraps
    module = torch_private.compiled_method_module(target)
    if module is not None:  # torch.compile(module.forward): explain that method
        target = module.forward
    report = Report(config=config)

    def capture(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        work = _copy_graph_module(gm)
        result = transform(work, example_inputs, config)
        report.sites.extend(result.sites)
        report.rejected.extend(result.rejected)
        report.graphs.append(result.graph)
        return result.anchored(gm.forward)  # the original graph: dense, uncompiled (an anchor as compiled)

    capture.__name__ = "fgcompile_explain"
    breaks_before = torch_private.graph_break_count()
    reasons_before = torch_private.graph_break_reasons()
    # A fresh wrapper per call: Dynamo guards each cache entry on its backend, so this capture
    # neither reuses nor evicts what other torch.compile calls compiled.
    compiled = torch.compile(target, backend=capture, fullgraph=False, dynamic=dynamic)
    # (blocks compiled in place run their own compiled code where the capture breaks the graph
    # around them: they run uncompiled here, so that the capture sees them and nothing runs sparse)
    with torch.no_grad(), torch_private.raised_recompile_limits(), \
            torch_private.submodules_uncompiled(module if module is not None else target):
        compiled(*args, **kwargs)
    report.graph_breaks = max(torch_private.graph_break_count() - breaks_before, max(len(report.graphs) - 1, 0))
    report.graph_break_reasons = [
        r for r, n in torch_private.graph_break_reasons().items() if n > reasons_before.get(r, 0)
    ]
    here = {s.name: s.decision for s in report.sites}
    from . import runtime

    for name, (_, decision, reason) in runtime.compiled_decisions(model).items():
        if name in here and here[name] != decision:
            report.compiled_otherwise[name] = (decision, reason)
    return report
