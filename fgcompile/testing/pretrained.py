"""The shipped, trained toy video DiT: ``load_toy_video_dit()``, offline, on any device.

The weights (examples/weights/toy_video_dit.safetensors, bf16, the model config in the file's
metadata) are written by ``python examples/train_toy_video_dit.py --device cuda`` (about 14 minutes
on one H100). The model is label-conditioned: 12 labels (``fgcompile.testing.shapes_data``:
shape x colour, ``label_name``) and the null label 12 for classifier-free guidance.

    model = load_toy_video_dit(device="cuda", dtype=torch.bfloat16)
    labels = torch.tensor([0, 5], device="cuda")
    video = sample(model, labels, null_labels(labels, 12), cond_key="labels",
                   shape=model.meta["sample_shape"], seed=0, **model.meta["sampler"])  # (2, 3, 16, 64, 64)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from .toy_dit import ToyDiTConfig, ToyVideoDiT

__all__ = ["DEFAULT_WEIGHTS", "TRAIN_COMMAND", "load_toy_video_dit", "read_toy_video_dit_meta", "file_size_ok"]

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "examples" / "weights" / "toy_video_dit.safetensors"
TRAIN_COMMAND = "python examples/train_toy_video_dit.py --device cuda"
MAX_WEIGHTS_BYTES = 20_000_000


def file_size_ok(path: str | Path, limit: int = MAX_WEIGHTS_BYTES) -> bool:
    """Whether a weights file is within the repository's size limit (20 MB)."""
    return Path(path).stat().st_size <= limit


def _config_from_dict(d: dict) -> ToyDiTConfig:
    d = dict(d)
    d["patch"] = tuple(d["patch"])
    known = {f for f in ToyDiTConfig.__dataclass_fields__}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"toy video DiT config: unknown field(s) {unknown} (a newer fgcompile wrote these weights?)")
    return ToyDiTConfig(**d)


def read_toy_video_dit_meta(path: Optional[str | Path] = None) -> dict[str, Any]:
    """The metadata of a weights file: ``config`` (ToyDiTConfig), ``data`` (ShapesConfig fields),
    ``sampler`` (steps, guidance, shift), ``training`` (summary), ``sample_shape`` (C, F, H, W),
    plus whatever the JSON written beside it holds (``json``)."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"toy video DiT weights not found: {path}. Train them with `{TRAIN_COMMAND}` "
            f"(about 14 minutes on one H100; --out-dir DIR to write elsewhere), or pass path=."
        )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if "config" not in raw:
        raise ValueError(f"{path}: no model config in the safetensors metadata (not written by examples/train_toy_video_dit.py)")
    meta: dict[str, Any] = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "model")}
    meta["config"] = _config_from_dict(meta["config"])
    data = meta.get("data", {})
    meta["sample_shape"] = (meta["config"].in_channels, data.get("frames", 16), data.get("size", 64), data.get("size", 64))
    meta.setdefault("sampler", {"steps": 25, "guidance": 4.0, "shift": 1.0})
    side = path.with_suffix(".json")
    if side.is_file():
        meta["json"] = json.loads(side.read_text())
    return meta


def load_toy_video_dit(
    path: Optional[str | Path] = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_impl: Optional[str] = None,
) -> ToyVideoDiT:
    """The trained toy video DiT in eval mode on ``device`` in ``dtype``; no download.

    ``path``: a safetensors file written by examples/train_toy_video_dit.py (default: the shipped
    examples/weights/toy_video_dit.safetensors). ``attn_impl`` overrides the config's
    self-attention implementation ("sdpa" or "manual"). ``model.meta`` holds the file's metadata
    (see ``read_toy_video_dit_meta``). Raises FileNotFoundError naming the path and the command
    that trains the weights when the file is missing."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    meta = read_toy_video_dit_meta(path)
    cfg: ToyDiTConfig = meta["config"]
    if attn_impl is not None:
        cfg = ToyDiTConfig(**{**cfg.__dict__, "attn_impl": attn_impl})
    model = ToyVideoDiT(cfg)
    state = load_file(str(path), device="cpu")
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {missing}, unexpected {unexpected}")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.meta = meta
    return model
