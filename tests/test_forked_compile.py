"""Background compiles in forked child processes (``fgcompile.lowering.forked``) and the schedule
step's kernels compiled there (``fgcompile.lowering.warmup``), on the CPU.

Triton compiles for a CUDA target without a GPU (its wheel ships ptxas), so the child's compile is
real here: a Triton driver stand-in answers the device queries a GPU driver would, the kernel's
binder is made in the parent as the warmup thread makes it, the child compiles into a temporary
Triton cache, and the parent's own compile of the same launch must then be a cache hit. It runs in
a child interpreter without ``TRITON_INTERPRET`` (the test suite sets it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from fgcompile.lowering import forked

pytestmark = pytest.mark.skipif(not forked.available(), reason="no os.fork on this platform")


def test_child_status(tmp_path):
    mark = tmp_path / "ran"
    assert forked.wait(forked.start(lambda: mark.write_text(str(os.getpid())))) is True
    assert mark.read_text() != str(os.getpid())  # it ran in another process

    def fail() -> None:
        raise ValueError("no")

    assert forked.wait(forked.start(fail)) is False


def test_a_child_past_its_time_is_killed(tmp_path):
    mark = tmp_path / "late"
    t = time.monotonic()
    pid = forked.start(lambda: (time.sleep(30), mark.write_text("x")))
    assert forked.wait(pid, timeout_s=0.5) is None
    assert time.monotonic() - t < 10
    with pytest.raises(ChildProcessError):  # collected: no zombie left
        os.waitpid(pid, os.WNOHANG)
    assert not mark.exists()


def test_alarm_ends_a_hung_child():
    t = time.monotonic()
    assert forked.wait(forked.start(lambda: time.sleep(30), alarm_s=1)) is False
    assert time.monotonic() - t < 10


_CHILD = r"""
import contextlib, functools, glob, json, os, sys
from unittest import mock
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton import knobs
from fgcompile.lowering import warmup

@triton.jit
def _scale(x_ptr, n, S: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * S, mask=i < n)

class Driver:  # what the warmup thread's queries get from a GPU driver in the parent
    def get_current_device(self): return 0
    def get_current_stream(self, *a): return 0
    def get_device_capability(self, *a): return (9, 0)
    def get_current_target(self): return GPUTarget("cuda", 90, 32)

driver.set_active(Driver())
hits = []
knobs.compilation.listener = lambda **kw: hits.append(kw.get("cache_hit"))
x = torch.zeros(1000, dtype=torch.float32)
thunks = [(torch.device("cuda", 0), functools.partial(_scale.warmup, x, 1000, S=s, BLOCK=128, grid=(8,)))
          for s in (2, 3)]
bad = (torch.device("cuda", 0), functools.partial(_scale.warmup, x, 1000, S=4, BLOCK=100, grid=(8,)))  # not a power of 2
with mock.patch.object(torch.cuda, "device", lambda d: contextlib.nullcontext()), \
        mock.patch.object(torch.cuda, "current_device", lambda: 0), \
        mock.patch.object(torch.cuda, "get_device_capability", lambda i=None: (9, 0)):
    warmup._compile_in_children("site", thunks + [bad])
out = {"stats": warmup.stats(), "cubins": len(glob.glob(os.path.join(os.environ["TRITON_CACHE_DIR"], "*", "*.cubin"))),
       "parent_compiled_before": list(hits)}
for _, t in thunks:  # the warmup thread's own compile of each launch: found in the cache
    t()
out["parent_cache_hits"] = hits
# a fork that fails (no memory, process limit) raises, after the children already started are collected
from fgcompile.lowering import forked
real, calls = forked.start, []
def flaky(work, alarm_s=300):
    calls.append(1)
    if len(calls) > 1:
        raise OSError("fork: resource temporarily unavailable")
    return real(work, alarm_s)
more = [(torch.device("cuda", 0), functools.partial(_scale.warmup, x, 1000, S=s, BLOCK=128, grid=(8,))) for s in (5, 6)]
with mock.patch.object(torch.cuda, "device", lambda d: contextlib.nullcontext()), \
        mock.patch.object(torch.cuda, "current_device", lambda: 0), \
        mock.patch.object(torch.cuda, "get_device_capability", lambda i=None: (9, 0)), \
        mock.patch.object(forked, "start", flaky), mock.patch.object(os, "cpu_count", lambda: 4):
    try:
        warmup._compile_in_children("site2", more)
        out["flaky"] = "no error"
    except OSError as e:
        out["flaky"] = str(e)
try:
    os.waitpid(-1, os.WNOHANG)
    out["zombie"] = True
except ChildProcessError:
    out["zombie"] = False
print(json.dumps(out))
"""


def test_schedule_step_kernels_compile_in_children(tmp_path):
    script = tmp_path / "child.py"  # a file: Triton reads a @jit function's source from it
    script.write_text(_CHILD)
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    st = out["stats"]
    # 3 kernels over min(3, cpus - 1) children; the one with the bad launch fails, the others compile
    assert st["children"] >= 1 and st["children_killed"] == 0
    assert st["children_ok"] == st["children"] - 1, st
    assert out["cubins"] == 2  # each good launch's binary, compiled by a child
    assert out["parent_compiled_before"] == []  # the parent compiled nothing itself
    assert out["parent_cache_hits"] == [True, True]
    assert out["flaky"] == "fork: resource temporarily unavailable" and out["zombie"] is False
