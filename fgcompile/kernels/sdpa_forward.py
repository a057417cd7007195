"""The profiled call's dense forward through PyTorch's fused attention: output and log-sum-exp.

A profiled call needs dense attention (its output) and each query row's log-sum-exp (the block
maxima pass, ``triton_profile._profile_probs``, turns scores into probabilities with it).
``triton_profile._profile_fwd`` computes both in Triton, which costs a Triton compile of a
flash-attention kernel (seconds, on the critical path of a compiled model's first call). PyTorch's
own fused kernels return the log-sum-exp too and need no compile:

- CUDA: ``aten._scaled_dot_product_cudnn_attention`` (logsumexp (B, H, S_q, 1) float32), then
  ``aten._scaled_dot_product_flash_attention`` (logsumexp (B, H, S_q) float32);
- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (logsumexp (B, H, S_q) float32), which
  lets the CPU tests run this path.

These ``aten._*`` ops are private PyTorch operators: touched here only, feature-detected (a missing
op is skipped), and each checked once per process, device type, dtype and head dim against a
float32 reference on a small random problem (output and natural-log log-sum-exp) before it is
used; an op that fails the check, raises, or lacks the inputs' support (key padding, head dims
it rejects) is skipped, and the caller falls back to the Triton forward.

Opt in with ``FGCOMPILE_PROFILE_FORWARD=sdpa`` (default ``triton``): not yet measured on a GPU.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch

from .triton_common import LOG2E

__all__ = ["dense_forward_lse", "wanted"]

log = logging.getLogger("fgcompile")

_CHECKED: dict[tuple, bool] = {}  # (backend, device type, dtype, head dim) -> passed the check


def wanted() -> bool:
    """Whether ``FGCOMPILE_PROFILE_FORWARD`` asks for this path ("sdpa"; default "triton")."""
    v = os.environ.get("FGCOMPILE_PROFILE_FORWARD", "triton")
    if v not in ("triton", "sdpa"):
        log.warning("fgcompile: FGCOMPILE_PROFILE_FORWARD: expected 'triton' or 'sdpa', got %r; using 'triton'", v)
        return False
    return v == "sdpa"


def _cudnn(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
    return out, lse


def _flash(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse


def _flash_cpu(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
    return out, lse


#: (name, aten op name, call) per device type, in order of preference
_BACKENDS: dict[str, list[tuple[str, str, Callable]]] = {
    "cuda": [("cudnn", "_scaled_dot_product_cudnn_attention", _cudnn),
             ("flash", "_scaled_dot_product_flash_attention", _flash)],
    "cpu": [("flash_cpu", "_scaled_dot_product_flash_attention_for_cpu", _flash_cpu)],
}


def _run(call: Callable, q, k, v, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse float32 (B, H, S_q), natural log) of one backend; raises what the op raises."""
    B, H, S_q, _ = q.shape
    out, lse = call(q, k, v, scale)
    if tuple(out.shape) != (B, H, S_q, v.shape[-1]) or lse.numel() != B * H * S_q:
        raise RuntimeError(f"unexpected shapes: out {tuple(out.shape)}, logsumexp {tuple(lse.shape)}")
    return out, lse.reshape(B, H, S_q).to(torch.float32)


def _passes_check(name: str, call: Callable, like: torch.Tensor, head_dim: int) -> bool:
    """Once per (backend, device type, dtype, head dim): the backend's output and log-sum-exp on a
    small random problem against float32 math (a host sync, at first use only)."""
    key = (name, like.device.type, like.dtype, head_dim)
    ok = _CHECKED.get(key)
    if ok is not None:
        return ok
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, 2, n, head_dim, generator=g).to(device=like.device, dtype=like.dtype) for n in (96, 80, 80))
        scale = head_dim ** -0.5
        out, lse = _run(call, q, k, v, scale)
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        ref_lse = torch.logsumexp(s, -1)
        ref_out = torch.softmax(s, -1) @ v.float()
        tol = 1e-4 if like.dtype == torch.float32 else 3e-2
        ok = bool(torch.allclose(lse, ref_lse, atol=tol, rtol=0) and torch.allclose(out.float(), ref_out, atol=tol, rtol=tol))
        if not ok:
            log.info("fgcompile: %s attention's log-sum-exp or output differs from float32 math; not used for "
                     "profiled calls", name)
    except Exception as e:  # a missing kernel, an unsupported dtype or head dim
        log.info("fgcompile: %s attention is not used for profiled calls: %s: %s", name, type(e).__name__, e)
        ok = False
    _CHECKED[key] = ok
    return ok


def dense_forward_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Dense attention and its base-2 log-sum-exp through PyTorch's fused attention, or None where
    no backend serves these inputs (the caller then runs the Triton forward).

    q (B, H, S_q, D), k / v (B, H_kv, S_kv, D) (GQA: H a multiple of H_kv; k and v are repeated
    per query head here), any float dtype the backend takes; no key padding (callers with a
    padding mask do not come here). Returns (out (B, H, S_q, D) in q.dtype, any strides;
    lse2 float32 (B, H, S_q) = log2 of the sum over keys of 2 ** (q . k * scale * log2(e)),
    i.e. the natural log-sum-exp times log2(e): the ``lse2`` of ``triton_profile._profile_fwd``).
    """
    backends = _BACKENDS.get(q.device.type, [])
    H, H_kv, D = q.shape[1], k.shape[1], q.shape[-1]
    if H != H_kv:
        k = k.repeat_interleave(H // H_kv, dim=1)
        v = v.repeat_interleave(H // H_kv, dim=1)
    for name, op_name, call in backends:
        if not hasattr(torch.ops.aten, op_name) or not _passes_check(name, call, q, D):
            continue
        try:
            out, lse = _run(call, q, k, v, float(scale))
        except Exception as e:  # e.g. strides or sizes this backend rejects
            log.debug("fgcompile: %s attention declined a profiled call: %s: %s", name, type(e).__name__, e)
            continue
        return out, lse * LOG2E
    return None

