"""A synthetic attention suite: q, k, v over a frames x height x width token grid whose heads show
the attention patterns of video diffusion transformers.

    from fgcompile.testing.synthetic import make_attention_inputs
    q, k, v = make_attention_inputs(8, 16, 16, heads=6)          # mixed heads, 2048 tokens
    case = make_attention_inputs(8, 16, 16, heads=6)
    case.info.head_patterns   # ('local', 'temporal', 'sink', 'local+temporal', 'local+sink', 'local')

Construction. Tokens are the video grid in frame-major order (f, h, w), then ``text_tokens`` text
tokens. With the default scale 1 / sqrt(D), every head's logit ``q_t . k_s / sqrt(D)`` is a sum of
components (in nats), each a bilinear feature product:

- ``local`` (3D Gaussian window): ``beta_l * g_l(p_t - p_s)``, with ``g_l`` a random-Fourier-feature
  approximation of ``exp(-|(dt, dh, dw) / sigma|^2 / 2)``: cos/sin features of ``omega . p`` with
  ``omega ~ N(0, diag(sigma)^-2)``, so the product is ``mean_i cos(omega_i . (p_t - p_s))``: 1 at
  distance 0, falling off with 3D distance, with the side lobes and the noise floor RoPE attention
  has. sigma = sigma_eff * sqrt(beta_l), so that the attention itself (``exp(beta_l * g_l)``) is a
  Gaussian window of width sigma_eff = 0.8 frames, 1.2 rows, 1.2 columns near its centre.
- ``temporal`` (the same spatial position across frames): the same with sigma_eff = 3 frames,
  0.3 rows and columns, so a query attends to its own (h, w) position in nearby and far frames.
- ``sink``: ``beta_s`` on a few global sink tokens (4 video tokens at seeded positions) for every
  query.
- text: video queries give text keys ``beta_x`` (weak); text queries attend broadly.
- content noise: a random low-rank product, about 1 nat standard deviation, for every pair (diffuse
  mass and per-query variety); each query also has a random temperature in [0.75, 1.25].
- a shared query component with zero key weight (real queries have large common components): it
  changes no logit but makes neighbouring queries similar, as the pooled predictor expects.

The strengths scale with ln(S), so the attention stays peaky at every size: a local head puts most of
its mass within a few tokens of distance 0, but keeps some diffuse mass. ``v`` is a smooth function
of position plus noise. Everything is generated on the CPU from ``seed`` (deterministic, any size),
then cast and moved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PATTERNS", "HEAD_KINDS", "SyntheticInfo", "AttentionInputs", "make_attention_inputs", "token_positions"]

#: Values of ``make_attention_inputs(pattern=...)``.
PATTERNS = ("local", "temporal", "sink", "mixed")

#: The per-head kinds; "mixed" cycles through them.
HEAD_KINDS = ("local", "temporal", "sink", "local+temporal", "local+sink")

# Effective attention windows (frames, rows, columns): the logit is beta * g(d) ~ beta - beta |d/sigma|^2 / 2
# near d = 0, so the kernel width sigma is set to sigma_eff * sqrt(beta).
_LOCAL_SIGMA = (0.8, 1.2, 1.2)
_TEMPORAL_SIGMA = (3.0, 0.3, 0.3)
_N_SINKS = 4


@dataclass(frozen=True)
class SyntheticInfo:
    """What ``make_attention_inputs`` built.

    grid: (frames, height, width); text_tokens: text tokens appended after the video tokens;
    head_patterns: the kind of every head (one of ``HEAD_KINDS``); sinks: indices of the sink tokens
    (video tokens); strengths: per head, the component strengths in nats (dict kind -> beta).
    """

    grid: tuple[int, int, int]
    text_tokens: int
    head_patterns: tuple[str, ...]
    sinks: tuple[int, ...]
    strengths: tuple[dict, ...]

    @property
    def video_tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text_tokens


class AttentionInputs(tuple):
    """``(q, k, v)``, unpackable as a tuple, with the metadata in ``.info`` (``SyntheticInfo``)."""

    info: SyntheticInfo

    def __new__(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, info: SyntheticInfo):
        obj = super().__new__(cls, (q, k, v))
        obj.info = info
        return obj

    @property
    def q(self) -> torch.Tensor:
        return self[0]

    @property
    def k(self) -> torch.Tensor:
        return self[1]

    @property
    def v(self) -> torch.Tensor:
        return self[2]


def token_positions(frames: int, height: int, width: int) -> torch.Tensor:
    """(frames * height * width, 3) float64 (f, h, w) positions of the video tokens, frame-major."""
    f, h, w = torch.meshgrid(
        torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij"
    )
    return torch.stack([f, h, w], dim=-1).reshape(-1, 3).to(torch.float64)


def _head_kinds(pattern: str, heads: int) -> tuple[str, ...]:
    if pattern == "mixed":
        return tuple(HEAD_KINDS[i % len(HEAD_KINDS)] for i in range(heads))
    return (pattern,) * heads


def _strengths(kind: str, base: float) -> dict:
    """Component strengths (nats) of one head kind; ``base`` = ln(S)."""
    table = {
        "local": {"local": base + 2.5, "sink": 0.0},
        "temporal": {"temporal": base + 2.5, "sink": 0.0},
        "sink": {"sink": base + 1.5, "local": 0.5 * base},
        "local+temporal": {"local": 0.5 * base + 1.5, "temporal": 0.5 * base + 1.5, "sink": 0.0},
        "local+sink": {"local": base + 2.0, "sink": base},
    }
    return dict(table[kind])


def _rff(pos: torch.Tensor, sigma: tuple[float, float, float], n: int, g: torch.Generator) -> torch.Tensor:
    """(N, 2n) features with phi(a) . phi(b) = mean_i cos(omega_i . (a - b)), omega ~ N(0, sigma^-2)."""
    omega = torch.randn(n, 3, generator=g, dtype=torch.float64) / torch.tensor(sigma, dtype=torch.float64)
    ang = pos @ omega.T  # (N, n)
    return torch.cat([ang.cos(), ang.sin()], dim=-1) / math.sqrt(n)


def make_attention_inputs(
    frames: int,
    height: int,
    width: int,
    *,
    heads: int,
    head_dim: int = 64,
    pattern: str = "mixed",
    text_tokens: int = 0,
    batch: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> AttentionInputs:
    """q, k, v of shape (batch, heads, frames*height*width + text_tokens, head_dim) whose attention
    (with scale 1 / sqrt(head_dim)) shows video-DiT patterns; see the module docstring.

    pattern: one of ``PATTERNS``: "local", "temporal", "sink" (every head of that kind) or "mixed"
    (heads cycle through ``HEAD_KINDS``, which include mixtures within a head). The same arguments
    give the same tensors on every call and device. Returns ``AttentionInputs``: unpack it as
    ``q, k, v``; ``.info`` is a ``SyntheticInfo``.
    """
    for name, val in (("frames", frames), ("height", height), ("width", width), ("heads", heads), ("batch", batch)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {val!r}")
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 16:
        raise ValueError(f"head_dim: expected an int >= 16, got {head_dim!r}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern: expected one of {PATTERNS}, got {pattern!r}")
    if not isinstance(text_tokens, int) or isinstance(text_tokens, bool) or text_tokens < 0:
        raise ValueError(f"text_tokens: expected an int >= 0, got {text_tokens!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")

    g = torch.Generator().manual_seed(seed)
    D = head_dim
    n_vid = frames * height * width
    S = n_vid + text_tokens
    base = math.log(S)
    pos = token_positions(frames, height, width)
    kinds = _head_kinds(pattern, heads)
    n_sinks = min(_N_SINKS, n_vid)
    sinks = tuple(sorted(torch.randperm(n_vid, generator=g)[:n_sinks].tolist()))
    is_sink = torch.zeros(n_vid, dtype=torch.float64)
    is_sink[list(sinks)] = 1.0

    # Dimension budget per head: 1 shared-query dim, 1 sink dim, 1 text dim, d_c content dims, the
    # rest cos/sin pairs split between the head's positional components.
    d_c = max(2, D // 8)
    n_pairs = (D - 3 - d_c) // 2
    d_c = D - 3 - 2 * n_pairs  # use every dim
    root = D**0.25  # q . k / sqrt(D) = (root q') . (root k') / sqrt(D) = q' . k'

    qs, ks, strengths = [], [], []
    for h, kind in enumerate(kinds):
        st = _strengths(kind, base)
        st["text"] = base - 3.0 if text_tokens else 0.0
        strengths.append(st)
        comps = [c for c in ("local", "temporal") if st.get(c, 0.0) > 0]
        q_vid, k_vid = [], []
        for ci, c in enumerate(comps):
            n = n_pairs // len(comps) + (1 if ci < n_pairs % len(comps) else 0)
            sigma = _LOCAL_SIGMA if c == "local" else _TEMPORAL_SIGMA
            sigma = tuple(x * math.sqrt(st[c]) for x in sigma)
            phi = _rff(pos, sigma, n, g) * math.sqrt(st[c])
            q_vid.append(phi)
            k_vid.append(phi)
        used = sum(p.shape[1] for p in q_vid)
        if used < 2 * n_pairs:  # unused positional dims: zeros
            q_vid.append(torch.zeros(n_vid, 2 * n_pairs - used, dtype=torch.float64))
            k_vid.append(torch.zeros(n_vid, 2 * n_pairs - used, dtype=torch.float64))
        q_pos = torch.cat(q_vid, dim=-1)
        k_pos = torch.cat(k_vid, dim=-1)
        if text_tokens:
            q_pos = torch.cat([q_pos, torch.zeros(text_tokens, q_pos.shape[1], dtype=torch.float64)])
            k_pos = torch.cat([k_pos, torch.zeros(text_tokens, k_pos.shape[1], dtype=torch.float64)])
        video = torch.zeros(S, dtype=torch.float64)
        video[:n_vid] = 1.0
        text = 1.0 - video
        sink_k = torch.cat([is_sink, torch.zeros(text_tokens, dtype=torch.float64)])
        # Sink dim: every query sqrt(beta_s), sink keys sqrt(beta_s). Text dim: video queries and
        # text keys. Shared dim: queries only (changes no logit).
        q_sink = torch.full((S,), math.sqrt(st.get("sink", 0.0)), dtype=torch.float64)
        k_sink = sink_k * math.sqrt(st.get("sink", 0.0))
        q_text = video * math.sqrt(st["text"])
        k_text = text * math.sqrt(st["text"])
        shared_q = torch.full((S,), 1.2 * math.sqrt(max(st.get("local", 0.0), st.get("temporal", 0.0), 1.0)), dtype=torch.float64)
        heads_q = torch.cat([q_pos, q_sink[:, None], q_text[:, None], shared_q[:, None]], dim=-1)
        heads_k = torch.cat([k_pos, k_sink[:, None], k_text[:, None], torch.zeros(S, 1, dtype=torch.float64)], dim=-1)
        qs.append(heads_q)
        ks.append(heads_k)
    q0 = torch.stack(qs)  # (heads, S, D - d_c)
    k0 = torch.stack(ks)

    # Per batch element: content noise, per-query temperature, values.
    qb, kb, vb = [], [], []
    omega_v = torch.randn(16, 3, generator=g, dtype=torch.float64) / 4.0  # smooth: ~4-token scale
    phase_v = torch.rand(16, generator=g, dtype=torch.float64) * 2 * math.pi
    for _ in range(batch):
        c_scale = d_c**-0.25  # content product ~ N(0, 1) nats
        cq = torch.randn(heads, S, d_c, generator=g, dtype=torch.float64) * c_scale
        ck = torch.randn(heads, S, d_c, generator=g, dtype=torch.float64) * c_scale
        if text_tokens:  # text queries: broader content attention (x2 nats)
            cq[:, n_vid:] *= 2.0
        temp = 0.75 + 0.5 * torch.rand(heads, S, 1, generator=g, dtype=torch.float64)
        q = torch.cat([q0, cq], dim=-1) * temp
        k = torch.cat([k0, ck], dim=-1)
        # Mix the dims by a random orthogonal matrix per head (no logit changes; realistic layout).
        rot = torch.linalg.qr(torch.randn(heads, D, D, generator=g, dtype=torch.float64))[0]
        qb.append((q @ rot) * root)
        kb.append((k @ rot) * root)
        smooth = torch.cos(pos @ omega_v.T + phase_v)  # (n_vid, 16)
        w_v = torch.randn(heads, 16, D, generator=g, dtype=torch.float64) / 4.0
        v_vid = smooth @ w_v  # (heads, n_vid, D), std ~ 0.7
        v = 0.6 * torch.randn(heads, S, D, generator=g, dtype=torch.float64)
        v[:, :n_vid] += v_vid
        vb.append(v)
    info = SyntheticInfo(
        grid=(frames, height, width),
        text_tokens=text_tokens,
        head_patterns=kinds,
        sinks=sinks,
        strengths=tuple(strengths),
    )

    def out(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(ts).to(dtype=dtype, device=device).contiguous()

    return AttentionInputs(out(qb), out(kb), out(vb), info)
