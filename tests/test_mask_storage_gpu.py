"""FGAttnConfig.mask_storage="host" on a GPU: cached masks in pinned host memory, brought to the GPU
for each sparse call, prefetched on a side stream one site ahead.

- the masks end up pinned on the host (``SiteStats.mask_bytes`` 0, ``host_mask_bytes`` the bitmap),
  and the outputs are bitwise those of ``mask_storage="device"`` (one compiled model, switched with
  ``configure``: the same kernels);
- every sparse call finds its mask prefetched (no copy on the current stream), from the first
  sparse forward on;
- a loaded state's masks go to pinned memory;
- no host synchronisation in steady-state calls, profiled calls included
  (``set_sync_debug_mode("error")``);
- a host that runs ahead of the GPU holds no more prefetched copies than one that does not (their
  memory is reused in stream order, not after ``record_stream`` events), and never waits for it;
- peak GPU memory of a sparse forward is lower than with device storage, by at least the masks of
  all but two sites.
"""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch

import fgcompile
from fgcompile import FGAttnConfig, runtime
from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT

pytestmark = pytest.mark.gpu
os.environ["FGCOMPILE_STRICT"] = "1"

DT = torch.bfloat16
DEPTH = 4

# profiled at calls 0 and 4, sparse at 1, 2, 3, 5, ...; random weights: sparse whatever the density
CFG = FGAttnConfig(predictor="profile", alpha=0.3, profile_calls=(0, 4), block_m=32, block_n=1, min_seq_len=256,
                   max_density=1.0)


def _model(depth=DEPTH):
    torch.manual_seed(0)
    return ToyVideoDiT(ToyDiTConfig(depth=depth, width=256, heads=4)).eval().cuda().to(DT)


def _inputs(frames=8, hw=64, seed=0):
    # S = 8 * 32 * 32 = 8192 tokens: a bitmap of 4 * 256 * 256 int32 words (1 MiB) per site
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(1, 4, frames, hw, hw, device="cuda", generator=g).to(DT)
    t = torch.rand(1, device="cuda", generator=g).to(DT)
    text = torch.randn(1, 16, 64, device="cuda", generator=g).to(DT)
    return x, t, text


def _compile(m, cfg=CFG):
    return torch.compile(m, backend=fgcompile.backend(cfg), fullgraph=True)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setenv("FGCOMPILE_AUTOTUNE", "0")  # one kernel config
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _restart(c, storage):
    """Switch the compiled model ``c`` to ``storage`` and restart its schedule (masks dropped)."""
    fgcompile.configure(c, mask_storage=storage)
    fgcompile.reset(c)
    torch.cuda.synchronize()


def _spy_copies(monkeypatch) -> list:
    """Records every host-to-device copy of a mask: True for one made on the current stream at the
    call (not prefetched), False for a prefetch on the side stream."""
    copies = []
    orig = runtime.SiteState._copy_mask

    def spy(self, device, stream=None):
        if self.mask.device.type == "cpu":
            copies.append(stream is None)
        return orig(self, device, stream)

    monkeypatch.setattr(runtime.SiteState, "_copy_mask", spy)
    return copies


def test_host_masks_are_pinned_prefetched_and_match_device_storage(monkeypatch, tmp_path):
    c = _compile(_model(), dataclasses.replace(CFG, mask_storage="device"))  # "host" is the default
    calls = 7
    outs = {}
    with torch.no_grad():
        outs["device"] = [c(*_inputs(seed=i)).clone() for i in range(calls)]
        sites = runtime.state_of(c).sites
        assert len(sites) == DEPTH
        device_masks = {n: s.mask.clone() for n, s in sites.items()}
        assert all(m.is_cuda for m in device_masks.values())
        _restart(c, "host")
        copies = _spy_copies(monkeypatch)
        outs["host"] = [c(*_inputs(seed=i)).clone() for i in range(calls)]
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(outs["device"], outs["host"])):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"call {i}: {m}")
    # sparse calls 1, 2, 3, 5, 6 of every site: each mask prefetched by the site before it (the
    # first site's by the last site's call of the forward before), none copied at the call; plus
    # the first site's prefetch for call 7, made by the last site's call 6
    assert copies == [False] * (5 * DEPTH + 1), copies
    for name, s in sites.items():
        assert s.mask.device.type == "cpu" and s.mask.is_pinned()
        assert torch.equal(s.host_mask(), device_masks[name].cpu())  # profiled at call 4 on the same inputs
        st = s.stats()
        assert st.mask_bytes == 0 and st.host_mask_bytes == s.mask.numel() * 4 > 0
        assert (st.calls, st.profiled_calls, st.sparse_calls) == (calls, 2, calls - 2)
    order = list(sites)
    for a, b in zip(order, order[1:] + order[:1]):
        assert sites[a].successor is sites[b]

    # a saved state loads into pinned memory; its first sparse call matches device storage
    path = tmp_path / "state.pt"
    fgcompile.save_state(c, str(path))
    fgcompile.load_state(c, str(path))
    for s in sites.values():
        assert s.mask.device.type == "cpu" and s.mask.is_pinned() and s.config.mask_storage == "host"
    with torch.no_grad():
        again = c(*_inputs(seed=calls - 1))  # call `calls` again: sparse, same masks, same inputs
    torch.testing.assert_close(again, outs["device"][-1], rtol=0, atol=0)


def test_no_host_sync_in_steady_state_with_host_masks():
    c = _compile(_model(), dataclasses.replace(CFG, mask_storage="host"))
    with torch.no_grad():
        for i in range(3):  # compile + profiled call 0, sparse calls 1 and 2
            c(*_inputs(seed=i))
        torch.cuda.synchronize()
        x = _inputs(seed=9)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):  # sparse 3, profiled 4 (masks copied to the host), sparse 5 and 6
                out = c(*x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out.float()).all()
    for s in fgcompile.stats(c).values():
        assert (s.profiled_calls, s.sparse_calls) == (2, 5) and s.mask_bytes == 0 and s.host_mask_bytes > 0


def test_host_storage_lowers_peak_memory():
    """Device storage holds every site's mask through a sparse forward; host storage at most the
    call's copy and the next site's prefetched one."""
    c = _compile(_model(), dataclasses.replace(CFG, mask_storage="device"))
    peak, mask_bytes = {}, None
    with torch.no_grad():
        for storage in ("device", "host"):
            if storage != "device":
                _restart(c, storage)
            c(*_inputs(seed=0))  # profiled
            c(*_inputs(seed=1))  # sparse
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            c(*_inputs(seed=2))  # sparse: measured
            torch.cuda.synchronize()
            peak[storage] = _active()
            st = fgcompile.stats(c)
            if storage == "device":
                mask_bytes = st["blocks.0.attn"].mask_bytes
                assert sum(s.mask_bytes for s in st.values()) == DEPTH * mask_bytes > 0
            else:
                assert sum(s.mask_bytes for s in st.values()) == 0
                assert sum(s.host_mask_bytes for s in st.values()) == DEPTH * mask_bytes
    print("peak MiB:", {k: v / 2**20 for k, v in peak.items()}, "mask MiB:", mask_bytes / 2**20)
    assert peak["host"] < peak["device"]
    assert peak["device"] - peak["host"] >= (DEPTH - 2) * mask_bytes


def _active(which: str = "peak") -> int:
    """The allocator's active bytes (``"peak"`` or ``"current"``): allocated memory and freed memory
    that a stream's pending work still uses (``record_stream``), which max_memory_allocated leaves
    out."""
    return torch.cuda.memory_stats()[f"active_bytes.all.{which}"]


@pytest.mark.parametrize("storage", ["host", "host_lists"])
def test_prefetched_copies_do_not_pile_up_when_the_host_runs_ahead(storage):
    """The host enqueues a whole sparse forward while the GPU is still busy (a spin kernel queued
    first), as it does in a large model. Each site's prefetched copy (mask or index lists) is freed
    on the host right after its call is enqueued; with ``record_stream`` its block would stay in use
    until the GPU ran that call, so every site's copy would be held at once. Reused in stream order,
    the forward holds no more than when the host trails the GPU, and the host does not wait: the
    forward is enqueued well within the spin."""
    depth = 6
    cfg = dataclasses.replace(CFG, mask_storage=storage, profile_calls=(0,))
    c = _compile(_model(depth), cfg)
    peaks, host_s = {}, []
    spin_cycles = 400_000_000  # ~0.2 s of GPU time before the forward's first kernel
    with torch.no_grad():
        for i in range(3):  # profiled call 0; sparse 1 (host_lists: makes the lists) and 2
            c(*_inputs(seed=i))
        x = _inputs(seed=5)
        for ahead in (False, True, False, True):
            torch.cuda.synchronize()
            base = _active("current")
            torch.cuda.reset_peak_memory_stats()
            if ahead:
                torch.cuda._sleep(spin_cycles)
            t0 = time.perf_counter()
            c(*x)
            host_s.append((ahead, time.perf_counter() - t0))
            torch.cuda.synchronize()
            peaks.setdefault(ahead, []).append(_active() - base)
    sites = runtime.state_of(c).sites.values()
    assert all(s.n_sparse >= 5 for s in sites)
    copy = max(s._lists.indices.numel() * 4 if storage == "host_lists" else s.mask.numel() * 4 for s in sites)
    print(storage, "active peak MiB:", {k: [x / 2**20 for x in v] for k, v in peaks.items()}, "copy MiB:", copy / 2**20,
          "host s:", host_s)
    assert max(peaks[True]) - min(peaks[False]) < copy
    # the host ran ahead: the spin (0.1-0.2 s at 1.4-2 GHz) was still running when the forward returned
    spin = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    spin[0].record()
    torch.cuda._sleep(spin_cycles)
    spin[1].record()
    torch.cuda.synchronize()
    assert max(t for ahead, t in host_s if ahead) < 0.5 * spin[0].elapsed_time(spin[1]) / 1e3


def _kernel_names(fn) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_host_lists_match_device_storage_without_packing_or_sync():
    """mask_storage="host_lists": index lists pinned on the host, made by the first sparse call
    after each profiled call; the other sparse calls run no packing kernel, copy the lists in
    (prefetched on the side stream) and give bitwise the outputs of device storage; no host sync."""
    c = _compile(_model(), dataclasses.replace(CFG, mask_storage="device"))
    calls = 8  # profiled at 0 and 4
    with torch.no_grad():
        ref = [c(*_inputs(seed=i)).clone() for i in range(calls)]
        _restart(c, "host_lists")
        got = []
        for i in range(calls):
            if i == 3:  # sparse calls 2 and 3 used the lists of call 0's mask: nothing packs
                names = _kernel_names(lambda: got.append(c(*_inputs(seed=i)).clone()))
                assert not any("packed_from_bits" in n for n in names), names
                assert any("_fg_sparse_fwd" in n for n in names) and any("Memcpy HtoD" in n for n in names), names
            elif i >= 5:  # call 5 packs call 4's mask; 6 and 7 use its lists
                torch.cuda.set_sync_debug_mode("error")
                try:
                    got.append(c(*_inputs(seed=i)).clone())
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            else:
                got.append(c(*_inputs(seed=i)).clone())
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(ref, got)):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"call {i}: {m}")
    for name, s in runtime.state_of(c).sites.items():
        assert s._lists_usable() and s._lists.indices.is_pinned() and s._lists.indices.dtype == torch.int32
        st = s.stats()
        assert st.host_list_bytes == s._lists.indices.numel() * 4 > 0 and st.mask_bytes == 0
        assert (st.profiled_calls, st.sparse_calls) == (2, calls - 2)
