"""FGAttnConfig.mask_storage on the CPU: the option's validation and plumbing, "host" giving exactly
the outputs of "device" (on the CPU both keep the mask in host memory), the call order the sites
learn (each site's successor, whose mask a call prefetches on CUDA), stats' host_mask_bytes, and
saving/loading and configure() with either storage. The CUDA side (pinned masks, prefetch on a side
stream, no host sync, peak memory) is tests/test_mask_storage_gpu.py."""

import os

import pytest
import torch

import fgcompile
from fgcompile import FGAttnConfig, runtime
from fgcompile.testing.toy_dit import ToyDiTConfig, ToyVideoDiT, toy_inputs

os.environ["FGCOMPILE_STRICT"] = "1"

SMALL = ToyDiTConfig(depth=3, width=128, heads=2)
SITES = ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]


def _inputs(batch=1, frames=2, hw=16, seed=0):
    return toy_inputs(SMALL, batch, frames, hw, seed)


def _cfg(**kw):
    base = dict(min_seq_len=64, block_m=64, profile_every=3, max_density=1.0)
    base.update(kw)
    return FGAttnConfig(**base)


def _run(storage, calls=5, seed=7, **kw):
    model = ToyVideoDiT(SMALL, seed=seed).eval()
    c = torch.compile(model, backend=fgcompile.backend(_cfg(mask_storage=storage, **kw)))
    with torch.no_grad():
        outs = [c(*_inputs(seed=i)) for i in range(calls)]
    return c, outs


def test_mask_storage_is_validated_and_plumbed():
    with pytest.raises(ValueError, match=r"FGAttnConfig\.mask_storage: expected one of \('device', 'host', 'host_lists'\)"):
        FGAttnConfig(mask_storage="gpu")
    assert FGAttnConfig().mask_storage == "host"
    assert FGAttnConfig.from_options({"mask_storage": "device"}).mask_storage == "device"
    assert FGAttnConfig.from_options({"mask_storage": "host"}).mask_storage == "host"
    assert fgcompile.backend(mask_storage="host").config.mask_storage == "host"
    assert FGAttnConfig(mask_storage="host").to_dict()["mask_storage"] == "host"


def test_host_storage_gives_exactly_the_device_outputs():
    # profiled at calls 0 and 3, sparse with the cached masks at 1, 2 and 4
    cd, dev = _run("device")
    ch, host = _run("host")
    for a, b in zip(dev, host):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for s in fgcompile.stats(ch).values():
        assert (s.calls, s.profiled_calls, s.sparse_calls) == (5, 2, 3)


def test_host_lists_give_exactly_the_device_outputs_without_packing(monkeypatch):
    """mask_storage="host_lists": the first sparse call after each profiled call packs the bitmap
    and keeps the lists; the other sparse calls use them (no packing) and give bitwise the outputs
    of "device"."""
    from fgcompile.kernels import packing

    packs = []
    real = packing.packed_from_bits
    monkeypatch.setattr(packing, "packed_from_bits", lambda *a, **kw: packs.append(1) or real(*a, **kw))
    # profiled at calls 0 and 3; sparse at 1, 2 (lists of call 0's mask), 4 (call 3's)
    _, dev = _run("device")
    n_dev = len(packs)
    packs.clear()
    ch, lists = _run("host_lists")
    for a, b in zip(dev, lists):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert n_dev == 3 * len(SITES) and len(packs) == 2 * len(SITES)  # calls 1 and 4 pack; call 2 does not
    for name, s in fgcompile.stats(ch).items():
        site = runtime.state_of(ch).sites[name]
        assert (s.profiled_calls, s.sparse_calls) == (2, 3) and s.fallback is None
        assert site._lists_usable() and site._lists.indices.dtype == torch.int32
        assert s.host_list_bytes == site._lists.indices.numel() * 4 > 0
    # another storage drops to packing the bitmap; back to host_lists: the lists of the mask stay valid
    fgcompile.configure(ch, mask_storage="host")
    assert all(v.host_list_bytes == 0 for v in fgcompile.stats(ch).values())
    # a new profiled call forgets the lists of the old mask
    fgcompile.configure(ch, mask_storage="host_lists")
    site = runtime.state_of(ch).sites[SITES[0]]
    assert site._lists_usable()
    with torch.no_grad():
        ch(*_inputs(seed=5))  # call 5: sparse with the lists
        ch(*_inputs(seed=6))  # call 6: profiled
    assert site._lists is None and not site._lists_usable()


def test_host_storage_without_pinned_memory_keeps_masks_where_they_are(monkeypatch, caplog):
    """Where no pinned memory can be had (here: the CPU build, with host storage forced on), the
    mask stays on the device, one warning per site says why, and the outputs are unchanged: the
    site does not fall back to dense attention."""
    _, dev = _run("device")

    def forced(self, device):
        return self.config.mask_storage == "host" and not self._pin_failed

    monkeypatch.setattr(runtime.SiteState, "_host_storage", forced)
    with caplog.at_level("WARNING", logger="fgcompile"):
        ch, host = _run("host")
    for a, b in zip(dev, host):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    warned = [r for r in caplog.records if "cannot pin" in r.getMessage()]
    assert len(warned) == len(SITES)
    for s in fgcompile.stats(ch).values():
        assert s.fallback is None and (s.profiled_calls, s.sparse_calls) == (2, 3) and s.mask_bytes > 0


def test_sites_learn_the_call_order():
    model = ToyVideoDiT(SMALL).eval()
    c = torch.compile(model, backend=fgcompile.backend(_cfg(mask_storage="host")))
    with torch.no_grad():
        c(*_inputs())
    sites = runtime.state_of(c).sites
    assert list(sites) == SITES
    for a, b in zip(SITES, SITES[1:]):
        assert sites[a].successor is sites[b]
    with torch.no_grad():
        c(*_inputs())
    assert sites[SITES[-1]].successor is sites[SITES[0]]  # the next forward starts over


def test_call_order_links_blocks_compiled_one_by_one():
    """Regional compilation: every block has its own ModelState; the order still links them."""
    model = ToyVideoDiT(SMALL).eval()
    be = fgcompile.backend(_cfg(mask_storage="host"))
    for blk in model.blocks:
        blk.compile(backend=be)
    with torch.no_grad():
        model(*_inputs())
        model(*_inputs())
    sites = runtime.state_of(model).sites
    assert list(sites) == SITES
    order = SITES + SITES[:1]
    for a, b in zip(order, order[1:]):
        assert sites[a].successor is sites[b]


def test_stats_host_mask_bytes():
    ch, _ = _run("host", calls=2)
    cd, _ = _run("device", calls=2)
    for (n, h), (_, d) in zip(fgcompile.stats(ch).items(), fgcompile.stats(cd).items()):
        site = runtime.state_of(ch).sites[n]
        assert h.mask_bytes == d.mask_bytes == site.mask.numel() * 4 > 0  # the CPU: no pinned memory
        assert h.host_mask_bytes == d.host_mask_bytes == 0


def _saved_state(tmp_path, storage):
    """A model profiled once and run sparse once, its state saved: (inputs, the sparse call's
    output, the file)."""
    x = _inputs()
    ca = torch.compile(ToyVideoDiT(SMALL, seed=3).eval(), backend=fgcompile.backend(_cfg(profile_every=50, mask_storage=storage)))
    with torch.no_grad():
        ca(*x)
        expected = ca(*x)
    path = tmp_path / "state.pt"
    fgcompile.save_state(ca, str(path))
    return x, expected, path


def _loading_model(storage):
    """The same model compiled with ``storage``, run once (its state exists) on other inputs."""
    cb = torch.compile(ToyVideoDiT(SMALL, seed=3).eval(), backend=fgcompile.backend(_cfg(profile_every=50, mask_storage=storage)))
    with torch.no_grad():
        cb(*_inputs(seed=5))
    return cb


@pytest.mark.parametrize("saved,loaded", [("device", "host"), ("host", "device")])
def test_save_load_across_storages(tmp_path, saved, loaded):
    """A loaded mask goes where the loading model's config says (its mask_storage is kept)."""
    x, expected, path = _saved_state(tmp_path, saved)
    cb = _loading_model(loaded)
    with torch.no_grad():
        fgcompile.load_state(cb, str(path))
        got = cb(*x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for s in runtime.state_of(cb).sites.values():
        assert s.config.mask_storage == loaded and s.n_sparse == 2


def test_load_state_without_pinned_memory(tmp_path, monkeypatch, caplog):
    """Loading into host storage where pinning fails (here: a CPU build that claims CUDA while
    loading) warns once per site and keeps the mask usable; outputs are the saved model's."""
    x, expected, path = _saved_state(tmp_path, "host")
    cb = _loading_model("host")
    with torch.no_grad():
        with monkeypatch.context() as m, caplog.at_level("WARNING", logger="fgcompile"):
            m.setattr(torch.cuda, "is_available", lambda: True)
            fgcompile.load_state(cb, str(path))
        got = cb(*x)
    assert sum("cannot pin its loaded mask" in r.getMessage() for r in caplog.records) == len(SITES)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for s in runtime.state_of(cb).sites.values():
        assert s._pin_failed and s.fallback is None and s.n_sparse == 2


def test_configure_switches_storage_and_drops_prefetched_copies():
    cd, dev = _run("device", calls=5)
    model = ToyVideoDiT(SMALL, seed=7).eval()
    c = torch.compile(model, backend=fgcompile.backend(_cfg(mask_storage="device")))
    outs = []
    with torch.no_grad():
        for i in range(5):
            if i == 2:
                fgcompile.configure(c, mask_storage="host")
            if i == 4:
                fgcompile.configure(c, mask_storage="device")
            outs.append(c(*_inputs(seed=i)))
    for a, b in zip(dev, outs):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for s in runtime.state_of(c).sites.values():
        assert s.config.mask_storage == "device" and s.mask is not None and s._prefetched is None
    with pytest.raises(ValueError, match="mask_storage"):
        fgcompile.configure(c, mask_storage="disk")
    fgcompile.reset(c)
    for s in runtime.state_of(c).sites.values():
        assert s.mask is None and s._prefetched is None and s._mask_ready is None
