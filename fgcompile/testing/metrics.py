"""Error metrics the tests, benchmarks and examples compare outputs with."""

from __future__ import annotations

import torch

__all__ = ["rel_err"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ``||out - ref|| / ||ref||`` (Frobenius norms over all elements) as a Python
    float. ``out`` and ``ref`` broadcast together, any dtype and device (one device); computed in
    float64 where either is float64, else in float32. A zero ``ref`` gives ``||out|| / 1e-30``
    (0.0 when ``out`` is zero too)."""
    dt = torch.float64 if torch.float64 in (out.dtype, ref.dtype) else torch.float32
    r = ref.to(dt)
    return float((out.to(dt) - r).norm() / r.norm().clamp_min(1e-30))
