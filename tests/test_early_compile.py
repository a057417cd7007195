"""``fgcompile.lowering.early_compile`` on the CPU: the source it predicts for a launch is
Inductor's kernel definition (its own codegen method, run on stand-ins), numbered as Inductor
numbers a graph's kernels; what it cannot predict is skipped without failing a compile. Whether
Inductor then takes the early compile is tested on CUDA (tests/test_early_compile_gpu.py).

The prediction needs real ``@triton.jit`` functions, not the interpreter's, so it runs in a child
process without ``TRITON_INTERPRET`` (the test suite sets it); the device properties and Triton's
backend hash, which need a GPU driver, are stubbed there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = r"""
import json
from unittest import mock
import torch
import torch._inductor.runtime.hints as hints
import torch.utils._triton as tu
from fgcompile.kernels.triton_sparse import launch_sparse_kernel
from fgcompile.lowering import early_compile as ec
from fgcompile.lowering.ops import plan_shapes

def args(B, H, S, D, dtype):
    q = torch.randn(B, S, H, D, dtype=dtype).transpose(1, 2)  # diffusers' layout
    k, v = torch.randn_like(q), torch.randn_like(q)
    shp = plan_shapes(q, k, v, 64, 1, 16)
    i32 = dict(dtype=torch.int32)
    return (q, k, v, torch.empty_like(q), torch.zeros(shp["counts"], **i32), torch.zeros(shp["indices"], **i32),
            torch.zeros(shp["full_counts"], **i32), torch.zeros(shp["full_tiles"], **i32),
            torch.empty(shp["dense_out"], dtype=dtype), torch.zeros((), dtype=torch.bool))

def launcher(a):
    return lambda wrap: launch_sparse_kernel(*a[:8], 0.125, 64, 1, 16, autotune=False, wrap=wrap, dense_out=a[8], use_dense=a[9])

out = {}
with mock.patch.object(hints.DeviceProperties, "create", classmethod(lambda cls, d: "DEVICE")), \
        mock.patch.object(tu, "triton_hash_with_backend", lambda: "HASH"):
    s = ec.Session(torch.device("cuda", 0))
    a = args(1, 2, 256, 64, torch.float16)
    first = ec.predict_source(s, launcher(a), {"_use_fp64_for_unbacked_floats": False})
    again = ec.predict_source(s, launcher(args(1, 2, 256, 64, torch.float16)), {"_use_fp64_for_unbacked_floats": False})
    other = ec.predict_source(s, launcher(args(1, 2, 384, 64, torch.bfloat16)), {"_use_fp64_for_unbacked_floats": False})
    out["first"] = first
    out["again"] = again
    out["other_names"] = [n for n, _ in other]
    out["other_meta_names"] = [src.split("'kernel_name': '")[1].split("'")[0] for _, src in other]
    # a misaligned q (storage offset of 3 elements) is specialised differently
    base = torch.randn(1 * 2 * 256 * 64 + 3, dtype=torch.float16)
    qm = base[3:].view(1, 2, 256, 64)
    b = (qm,) + a[1:]
    out["misaligned"] = ec.predict_source(ec.Session(torch.device("cuda", 0)), launcher(b), {"_use_fp64_for_unbacked_floats": False})[0][1]
    # an autotuned launch is not predicted, and the lowering entry never raises
    out["autotuned"] = ec.early_compile_site(None, lambda wrap: launch_sparse_kernel(*a[:8], 0.125, 64, 1, 16, autotune=True, wrap=wrap, dense_out=a[8], use_dense=a[9]), {}, torch.device("cuda", 0)) is None
    out["broken"] = ec.early_compile_site(None, lambda wrap: 1 / 0, {}, torch.device("cuda", 0)) is None
# Inductor's pool not up: a forked child compiles (here it fails: no GPU driver), the parent goes on
import time
from torch._inductor.async_compile import AsyncCompile
with mock.patch.object(AsyncCompile, "use_process_pool", classmethod(lambda cls: False)):
    out["started"] = ec.submit(first)
for _ in range(600):
    if ec._CHILDREN and None not in ec._CHILDREN.values():  # the child has ended
        break
    time.sleep(0.1)
out["stats"] = ec.stats()
print(json.dumps(out))
"""


def _child() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_prediction_is_inductors_kernel_definition():
    out = _child()
    names = [n for n, _ in out["first"]]
    # the name the worker looks up: the kernel's own (Inductor's default) or its numbered one
    assert names in (["_fg_sparse_fwd", "_copy_dense"], ["_fg_sparse_fwd_0", "_copy_dense_1"])
    src = dict(out["first"])[names[0]]
    compile(src, "<kernel>", "exec")  # the module Inductor's worker imports
    assert "@triton_heuristics.user_autotune(" in src and f"def {names[0]}(" in src
    assert "'kernel_name': '_fg_sparse_fwd_0'" in src  # Inductor's numbering, in launch order
    assert "'Q': '*fp16'" in src and "'qk_scale': 'fp32'" in src  # the signature Inductor types
    assert "'num_warps': 8" in src or "'num_warps': 4" in src
    # the unit-stride arguments are specialised as constants, as Triton and Inductor do
    assert "'stride_qd': 'constexpr'" in src
    # a repeated launch with the same metadata is Inductor's cache hit: no new source
    assert out["again"] == []
    # another shape/dtype gets the next numbers
    assert out["other_meta_names"] == ["_fg_sparse_fwd_2", "_copy_dense_3"]
    # alignment is part of the specialisation
    assert out["misaligned"] != src
    assert out["autotuned"] and out["broken"]
    st = out["stats"]
    assert out["started"] and st["children"] == 1 and st["pool"] == 0, st
    assert st["children_ok"] in (0, 1)  # no CUDA driver here: the child's compile may fail, harmlessly
