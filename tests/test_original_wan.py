"""The attention code of the original Wan2.1 repository on its SDPA path (fgcompile.testing.original_wan,
a faithful copy of wan/modules/model.py and attention.py, tiny; on CUDA the repository itself calls
flash-attn's varlen op, which tests/test_flash_attn_ops.py covers): ``rope_apply`` reads ``grid_sizes.tolist()`` and
``attention()`` calls ``warnings.warn`` whenever ``k_lens`` is passed, two graph breaks that leave
the attention of every layer in one graph segment without parameters, which serves the
self-attention and the cross-attention alike (Dynamo makes its key length dynamic when the short
cross-attention call comes). The profile predictor must still serve each layer's self-attention
with its own mask."""

import os

import pytest
import torch

import fgcompile
from fgcompile.testing.metrics import rel_err
from fgcompile.testing.original_wan import WanModel, inputs

os.environ["FGCOMPILE_STRICT"] = "1"


def _model_and_inputs(cast):
    torch.manual_seed(0)
    model = WanModel(cast=cast).eval()
    with torch.no_grad():  # sharper attention than random weights give (a trained model's)
        for block in model.blocks:
            for norm in (block.self_attn.norm_q, block.self_attn.norm_k):  # (q and k are RMS-normed)
                norm.weight.mul_(3.0)
    return model, inputs()


@pytest.mark.filterwarnings("ignore:Padding mask is disabled")
@pytest.mark.parametrize(
    "cast,device",
    [(False, "cpu"), (True, "cpu"), pytest.param(True, "cuda", marks=pytest.mark.gpu)],
    ids=["float32", "bfloat16", "cuda-bfloat16"],
)
def test_original_wan_code_runs_sparse_under_the_profile_predictor(cast, device):
    """Every layer's self-attention profiles at its first call (the output is exact) and then
    runs sparse on its own mask; the cross-attention (32 text keys) runs dense. On CUDA the
    sparse calls run the lowered Triton kernel."""
    torch._dynamo.reset()
    model, x = _model_and_inputs(cast)
    model, x = model.to(device), tuple(t.to(device) for t in x)
    # (on CUDA 128-row blocks: the Gluon sm_90 kernel's, in a graph whose key length is symbolic)
    c = torch.compile(model, backend=fgcompile.backend(min_seq_len=64, block_m=64 if device == "cpu" else 128,
                                                      alpha=0.5, dense_calls=0, max_density=1.0))
    with torch.no_grad():
        ref = model(*x)
        errs = [rel_err(c(*x), ref) for _ in range(2)]
        if device == "cuda":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                errs.append(rel_err(c(*x), ref))
            kernels = {e.key for e in prof.key_averages()}
            hopper = torch.cuda.get_device_capability() == (9, 0)
            assert any(k.startswith("_fg_sparse_fwd_sm90" if hopper else "_fg_sparse_fwd") for k in kernels), kernels
        else:
            errs.append(rel_err(c(*x), ref))
    tol = 1e-5 if not cast else 2e-2
    assert errs[0] < tol, errs  # profiled: dense attention
    assert errs[1] < 1e-2 and errs[2] == errs[1], errs
    st = fgcompile.stats(c)
    counts = {n: (s.calls, s.dense_calls, s.profiled_calls, s.sparse_calls) for n, s in st.items()}
    assert counts == {
        **{f"blocks.{i}.self_attn": (3, 0, 1, 2) for i in range(3)},
        **{f"blocks.{i}.cross_attn": (3, 3, 0, 0) for i in range(3)},
    }, counts
    densities = [st[f"blocks.{i}.self_attn"].mean_density for i in range(3)]
    assert max(densities) < 0.9, densities
    # each layer ran on its own mask: the three masks differ
    masks = [fgcompile.runtime.state_of(c).sites[f"blocks.{i}.self_attn"].mask.cpu() for i in range(3)]
    assert all(not torch.equal(a, b) for a, b in ((masks[0], masks[1]), (masks[1], masks[2])))
    fgcompile.reset(c)
    with torch.no_grad():
        assert rel_err(c(*x), ref) < tol  # profiled again


@pytest.mark.filterwarnings("ignore:Padding mask is disabled")
def test_original_wan_code_state_saves_and_loads(tmp_path):
    """The per-layer masks of the parameter-free attention segment save and load by the layers'
    paths: a second copy of the model, loaded, runs sparse on the first copy's masks."""
    torch._dynamo.reset()
    backend = fgcompile.backend(min_seq_len=64, block_m=64, alpha=0.5, dense_calls=0, max_density=1.0,
                                profile_every=100)
    model, x = _model_and_inputs(False)
    c = torch.compile(model, backend=backend)
    with torch.no_grad():
        c(*x)
        sparse_out = c(*x)
    fgcompile.save_state(c, tmp_path / "wan.pt")
    other, _ = _model_and_inputs(False)
    c2 = torch.compile(other, backend=backend)
    with torch.no_grad():
        x2 = (x[0] + 0.5 * torch.randn_like(x[0]),) + x[1:]  # another input: its own profile would differ
        c2(*x2)
        fgcompile.load_state(c2, tmp_path / "wan.pt")
        torch.testing.assert_close(c2(*x), sparse_out, atol=1e-6, rtol=1e-5)
    counts = {n: (s.profiled_calls, s.sparse_calls) for n, s in fgcompile.stats(c2).items() if "self_attn" in n}
    # (the schedule position is saved too: 1 profiled and 1 sparse call, then this sparse one)
    assert counts == {f"blocks.{i}.self_attn": (1, 2) for i in range(3)}, counts
