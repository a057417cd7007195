"""The procedural shapes data set, the label-conditioned toy DiT, the sampler, the training script
(--smoke) and the pretrained loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fgcompile.testing.pretrained import file_size_ok, load_toy_video_dit, read_toy_video_dit_meta
from fgcompile.testing.sampler import euler_sample, null_labels, sample, seeded_noise, timesteps, video_strip, write_png
from fgcompile.testing.shapes_data import COLORS, NUM_LABELS, SHAPES, ShapesConfig, ShapesStream, label_name, make_clips
from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT

REPO = Path(__file__).resolve().parents[1]
SMALL = ShapesConfig(frames=4, size=32)
TINY_CFG = ToyDiTConfig(in_channels=3, width=64, depth=2, heads=1, text_tokens=0, patch=(1, 4, 4), qk_gain=1.0,
                        num_labels=NUM_LABELS, ada_shared=True)


# ---------------------------------------------------------------------------- data
def test_clips_shape_range_dtype():
    v, l = make_clips(5, seed=0)
    assert v.shape == (5, 3, 16, 64, 64) and v.dtype == torch.float32
    assert l.shape == (5,) and l.dtype == torch.int64
    assert float(v.min()) >= -1.0 and float(v.max()) <= 1.0
    assert bool(((l >= 0) & (l < NUM_LABELS)).all())
    assert NUM_LABELS == len(SHAPES) * len(COLORS) == 12
    v, _ = make_clips(2, seed=0, config=SMALL)
    assert v.shape == (2, 3, 4, 32, 32)


def test_clips_deterministic_and_seeded():
    a, la = make_clips(4, seed=7, config=SMALL)
    b, lb = make_clips(4, seed=7, config=SMALL)
    c, _ = make_clips(4, seed=8, config=SMALL)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    s1, s2 = ShapesStream(3, seed=1, config=SMALL), ShapesStream(3, seed=1, config=SMALL, start=1)
    next(s1)
    assert torch.equal(next(s1)[0], next(s2)[0])  # batch i does not depend on the batches before it


def test_clips_move_and_are_not_blank():
    v, _ = make_clips(8, seed=3)
    # frames differ (motion) and every clip has coloured pixels (saturation > 0.3)
    assert (v[:, :, 0] - v[:, :, -1]).abs().amax(dim=(1, 2, 3)).min() > 0.5
    sat = v.amax(dim=1) - v.amin(dim=1)
    assert bool((sat.flatten(1).amax(dim=1) > 0.3).all())


def test_labels_render_differently():
    # the same seed (same motion, background, other objects) with two labels: shape or colour changes
    n = 6
    base, _ = make_clips(n, seed=11, labels=[0] * n, config=SMALL)
    for lab in (1, 4, 8):  # another colour; another shape (square, triangle)
        other, ol = make_clips(n, seed=11, labels=[lab] * n, config=SMALL)
        assert ol.tolist() == [lab] * n
        diff = (other - base).abs().flatten(1).amax(dim=1)
        assert bool((diff > 0.2).all()), (lab, diff)
    assert label_name(0) == "red circle" and label_name(5) == "green square" and label_name(11) == "yellow triangle"
    with pytest.raises(ValueError):
        make_clips(2, labels=[0, NUM_LABELS])
    with pytest.raises(ValueError):
        label_name(12)


def test_label_colour_is_present():
    # each label's colour is in the clip: some pixel is close to the palette colour
    v, l = make_clips(12, seed=5, labels=list(range(12)), config=SMALL)
    pal = torch.tensor(list(COLORS.values())) * 2 - 1
    for i in range(12):
        want = pal[int(l[i]) % len(COLORS)].view(3, 1, 1, 1)
        assert float((v[i] - want).abs().amax(dim=0).min()) < 0.05


# ---------------------------------------------------------------------------- model
def test_default_toy_dit_unchanged_and_text_optional():
    # the demo's default model still takes text positionally; label options are off
    m = ToyVideoDiT(ToyDiTConfig(depth=1), seed=0)
    assert m.label_emb is None and m.ada_shared is None and m.blocks[0].cross is not None
    x = torch.randn(1, 4, 2, 8, 8)
    assert m(x, torch.rand(1), torch.randn(1, 16, 64)).shape == x.shape
    with pytest.raises(ValueError, match="text"):
        m(x, torch.rand(1))
    lm = ToyVideoDiT(TINY_CFG)
    assert lm.blocks[0].cross is None and lm.blocks[0].ada is None
    with pytest.raises(ValueError, match="labels"):
        lm(torch.randn(1, 3, 2, 8, 8), torch.rand(1))


def test_label_conditioning_changes_output():
    torch.manual_seed(0)
    m = ToyVideoDiT(TINY_CFG).eval()
    x = torch.randn(1, 3, 2, 8, 8).expand(3, -1, -1, -1, -1)
    with torch.no_grad():
        out = m(x, torch.full((3,), 0.5), labels=torch.tensor([0, 5, NUM_LABELS]))
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])


def test_shipped_model_size():
    # the configuration examples/train_toy_video_dit.py trains: bf16 file <= 20 MB
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import train_toy_video_dit as tr
    finally:
        sys.path.pop(0)
    m = ToyVideoDiT(tr.MODEL)
    n = sum(p.numel() for p in m.parameters())
    assert n == 9_473_584
    assert 2 * n < 20_000_000 - 100_000  # bf16 bytes + room for the header
    assert tr.MODEL.head_dim == 64 and tr.MODEL.width == 384 and tr.MODEL.depth == 8
    grid = (tr.DATA.frames // tr.MODEL.patch[0]) * (tr.DATA.size // tr.MODEL.patch[1]) ** 2
    assert grid == 4096


# ---------------------------------------------------------------------------- sampler
def _tiny_model():
    m = ToyVideoDiT(TINY_CFG, seed=3).eval()
    with torch.no_grad():  # non-zero output layer (random init is fine here)
        m.out.weight.normal_(0, 0.05)
    return m


def test_sampler_deterministic_and_seeded():
    m = _tiny_model()
    labels = torch.tensor([1, 7])
    kw = dict(shape=(3, 2, 8, 8), cond_key="labels", steps=3, guidance=3.0)
    a = sample(m, labels, null_labels(labels, NUM_LABELS), seed=5, **kw)
    b = sample(m, labels, null_labels(labels, NUM_LABELS), seed=5, **kw)
    c = sample(m, labels, null_labels(labels, NUM_LABELS), seed=6, **kw)
    assert a.shape == (2, 3, 2, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a seed's noise does not depend on the batch it is in
    assert torch.equal(seeded_noise((3, 2, 8, 8), [5, 6])[1], seeded_noise((3, 2, 8, 8), 6)[0])
    one = sample(m, labels[1:], null_labels(labels[1:], NUM_LABELS), seed=[6], **kw)
    torch.testing.assert_close(one[0], a[1], atol=1e-5, rtol=1e-5)


def test_cfg_scale_one_equals_cond_only():
    m = _tiny_model()
    labels = torch.tensor([2, 9])
    kw = dict(shape=(3, 2, 8, 8), cond_key="labels", steps=4, seed=1)
    cfg1 = sample(m, labels, null_labels(labels, NUM_LABELS), guidance=1.0, **kw)
    cond = sample(m, labels, None, **kw)
    torch.testing.assert_close(cfg1, cond, atol=1e-5, rtol=1e-5)
    cfg3 = sample(m, labels, null_labels(labels, NUM_LABELS), guidance=3.0, **kw)
    assert (cfg3 - cond).abs().max() > 1e-3


def test_sampler_positional_text_like_the_demo():
    # the demo's text model: cond is the third positional argument
    m = ToyVideoDiT(ToyDiTConfig(depth=1), seed=0).eval()
    noise = torch.randn(1, 4, 2, 8, 8)
    text = torch.randn(1, 16, 64)
    out = euler_sample(m, noise, text, torch.zeros_like(text), 2, 5.0)
    # by hand: two Euler steps with CFG
    x = noise
    ts = timesteps(2)
    with torch.no_grad():
        for i in range(2):
            v = m(torch.cat([x, x]), ts[i].expand(2), torch.cat([text, torch.zeros_like(text)]))
            vc, vu = v.chunk(2)
            x = x + (ts[i + 1] - ts[i]) * (vu + 5.0 * (vc - vu))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_timesteps_and_png(tmp_path):
    t = timesteps(4)
    assert t[0] == 1 and t[-1] == 0 and bool((t[1:] < t[:-1]).all())
    ts = timesteps(4, shift=3.0)
    assert ts[0] == 1 and ts[-1] == 0 and bool((ts[1:-1] > t[1:-1]).all())
    v, _ = make_clips(2, seed=0, config=SMALL)
    img = video_strip(v)
    assert img.shape == (2 * 34, 4 * 34, 3) and img.dtype == torch.uint8
    write_png(str(tmp_path / "s.png"), img)
    data = (tmp_path / "s.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND"


# ---------------------------------------------------------------------------- training + loading
def test_missing_weights_error_names_path_and_command(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="train_toy_video_dit.py") as e:
        load_toy_video_dit(missing)
    assert str(missing) in str(e.value)


def test_smoke_training_writes_weights_that_load(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_toy_video_dit.py"), "--smoke", "--steps", "4",
         "--device", "cpu", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    w = tmp_path / "toy_video_dit.safetensors"
    for suffix in (".safetensors", ".json", ".log", "_samples.png"):
        assert (tmp_path / f"toy_video_dit{suffix}").is_file(), suffix
    assert file_size_ok(w)
    log = (tmp_path / "toy_video_dit.log").read_text()
    assert log.count("\nstep ") == 4
    meta = json.loads((tmp_path / "toy_video_dit.json").read_text())
    assert meta["training"]["steps"] == 4 and meta["weights_bytes"] == w.stat().st_size

    from safetensors import safe_open

    with safe_open(str(w), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    model = load_toy_video_dit(w)
    assert model.cfg.num_labels == NUM_LABELS and not model.training
    assert sum(p.numel() for p in model.parameters()) == meta["parameters"]
    assert next(model.parameters()).dtype == torch.float32
    info = read_toy_video_dit_meta(w)
    assert info["sample_shape"] == (3, 4, 16, 16) and info["sampler"]["steps"] == 2
    labels = torch.tensor([3])
    out = sample(model, labels, null_labels(labels, NUM_LABELS), shape=info["sample_shape"], seed=0, steps=2,
                 cond_key="labels")
    assert out.shape == (1, 3, 4, 16, 16) and bool(torch.isfinite(out).all())

    # the demo generates with these weights, dense beside fgattn, and saves the frames
    png = tmp_path / "strip.png"
    r = subprocess.run(
        [sys.executable, str(REPO / "examples" / "toy_video_dit.py"), "--weights", str(w), "--steps", "2",
         "--label", "3", "--png", str(png)],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "toy video DiT (trained)" in r.stdout and "label 3" in r.stdout
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_file_size_helper(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"\0" * 1000)
    assert file_size_ok(p, limit=1000) and not file_size_ok(p, limit=999)


@pytest.mark.skipif(not Path(REPO / "examples/weights/toy_video_dit.safetensors").is_file(),
                    reason="the trained weights are not in the repository yet")
def test_shipped_weights_load_on_cpu():
    w = REPO / "examples/weights/toy_video_dit.safetensors"
    assert file_size_ok(w)
    model = load_toy_video_dit()
    assert model.cfg.num_labels == NUM_LABELS
    x = torch.randn(1, 3, 2, 16, 16)
    with torch.no_grad():
        assert torch.isfinite(model(x, torch.full((1,), 0.5), labels=torch.tensor([0]))).all()


# ---------------------------------------------------------------------------- quality metrics
def _quality_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import quality_video
    finally:
        sys.path.pop(0)
    return quality_video


def test_quality_metrics():
    qv = _quality_module()
    v, _ = make_clips(2, seed=0, config=SMALL)
    assert torch.allclose(qv.psnr_frames(v, v), torch.full((2, 4), 100.0))
    assert torch.allclose(qv.ssim_frames(v, v), torch.ones(2, 4), atol=1e-5)
    noisy = (v + 0.02 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    p = qv.psnr_frames(noisy, v)
    # noise of std 0.02 on [-1, 1] is std 0.01 on [0, 1]: about 40 dB (a little more: clamping)
    assert p.shape == (2, 4) and bool(((p > 39) & (p < 42)).all())
    s = qv.ssim_frames(noisy, v)
    assert bool(((s > 0.5) & (s < 1.0)).all())
    assert qv.ssim_frames(v, -v).mean() < s.mean()


def test_density_at_psnr():
    qv = _quality_module()
    r = qv.density_at_psnr([(0.2, 20.0), (0.6, 40.0), (0.4, 25.0)])
    assert r["bound"] == "interpolated" and abs(r["density"] - (0.4 + 0.2 / 3)) < 1e-9  # 25 dB -> 40 dB
    assert qv.density_at_psnr([(0.3, 31.0), (0.5, 35.0)]) == {"density": 0.3, "bound": "at_or_below"}
    assert qv.density_at_psnr([(0.3, 21.0), (0.5, 25.0)])["bound"] == "not_reached"
    assert qv.density_at_psnr([(None, 50.0)])["bound"] == "not_reached"
