"""Test helpers: one Dynamo graph of a model, and its fake values re-propagated on CUDA (the
lowering passes decide on the device of the fake tensors, so a CPU machine can test them)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


def capture(m, *inputs):
    """(graph module, example inputs) of the one graph Dynamo captures from ``m(*inputs)`` (fullgraph)."""
    graphs = []

    def be(gm, ex):
        graphs.append((gm, list(ex)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(m, backend=be, fullgraph=True)(*inputs)
    assert len(graphs) == 1
    return graphs[0]


def as_fake_cuda(gm, example_inputs):
    """Re-propagate the Dynamo graph's fake values with every input faked on CUDA."""
    mode = FakeTensorMode()
    fakes = []
    for t in example_inputs:
        with mode:
            f = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
        fakes.append(nn.Parameter(f, requires_grad=False) if isinstance(t, nn.Parameter) else f)
    with mode:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    for n in gm.graph.nodes:
        if "val" in n.meta:
            n.meta["example_value"] = n.meta["val"]
    return fakes
