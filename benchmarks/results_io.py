"""Where the benchmark scripts write their JSON: ``benchmarks/results/<name>_<device tag>.json``
unless told otherwise (the tag is the GPU model in lower case, e.g. "h100", or "cpu")."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_tag() -> str:
    """"h100" for an "NVIDIA H100 80GB HBM3", "cpu" without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name().split()[1].lower()


def write_result(result: dict, name: str, out: Optional[str] = None) -> str:
    """Write ``result`` as indented JSON to ``out`` or the default path for ``name``; returns the path."""
    path = out or os.path.join(RESULTS, f"{name}_{device_tag()}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print("wrote", path)
    return path
