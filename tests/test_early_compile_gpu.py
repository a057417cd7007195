"""The early compile of the lowered sparse kernel (``fgcompile.lowering.early_compile``), on CUDA:
the source fgcompile predicts at its passes is the one Inductor generates, so Inductor's program
takes the compile started early instead of starting its own. Each case runs in a fresh process
with fresh Inductor and Triton caches (the in-process future cache is per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

pytestmark = pytest.mark.gpu

_CHILD = r"""
import ast, difflib, json, sys
import torch
import fgcompile
from fgcompile.lowering import early_compile
from fgcompile.lowering.inductor import run_and_get_code

B, H, S, D, depth = (int(x) for x in sys.argv[1:6])
torch.manual_seed(0)

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)
        self.proj = torch.nn.Linear(H * D, H * D)
    def forward(self, x):
        q, k, v = self.qkv(x).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.proj(o.transpose(1, 2).reshape(B, S, H * D))

m = torch.nn.Sequential(*[Block() for _ in range(depth)]).cuda().to(torch.bfloat16).eval()
x = torch.randn(B, S, H * D, device="cuda", dtype=torch.bfloat16)
c = torch.compile(m, backend=fgcompile.backend(predictor="profile", alpha=0.3, profile_calls=(0,), min_seq_len=256), fullgraph=True)
with torch.no_grad():
    _, codes = run_and_get_code(c, x)
    c(x)
stats = early_compile.stats()
actual = []
for code in codes:
    for node in ast.walk(ast.parse(code)):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "triton" and len(node.args) >= 2
                and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith(("_fg_sparse_fwd", "_copy_dense"))):
            actual.append(node.args[1].value)
diff = []
for src in [s for s in early_compile._PREDICTED if s not in actual][:1]:
    if actual:
        best = max(actual, key=lambda a: difflib.SequenceMatcher(None, a, src).quick_ratio())
        diff = list(difflib.unified_diff(best.splitlines(), src.splitlines(), "inductor", "predicted", lineterm="", n=0))[:60]
        break
import os
cache = os.environ["TRITON_CACHE_DIR"]
entries = {n: sum(os.path.exists(os.path.join(cache, d, n + ".json")) for d in os.listdir(cache)) for n in ("_fg_sparse_fwd", "_copy_dense")}
print(json.dumps({"stats": stats, "n_actual": len(actual), "diff": diff, "cache_entries": entries}))
"""


def _run(*sizes: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(d, "inductor"), TRITON_CACHE_DIR=os.path.join(d, "triton"))
        env.pop("TRITON_INTERPRET", None)
        env["TORCH_LOGS"] = "+fgcompile"
        env["FGCOMPILE_SM90_KERNEL"] = "0"  # the Triton kernel: Inductor compiles no Gluon kernel
        r = subprocess.run([sys.executable, "-c", _CHILD, *map(str, sizes)], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out["log"] = [ln for ln in r.stderr.splitlines() if "early compile" in ln or "lowered" in ln][-10:]
        return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sizes", [(1, 2, 1024, 64, 1), (2, 4, 640, 128, 2)], ids=["one_site", "two_sites"])
def test_inductor_takes_the_early_compile(sizes):
    out = _run(*sizes)
    stats = out["stats"]
    assert out["n_actual"] == 2, out  # the sparse kernel and the dense copy, once each
    # a cold process: Inductor's pool is not up, so a child process compiled both kernels
    assert stats["children"] == 1 and stats["children_ok"] == 1, out
    assert not out["diff"], "\n".join(out["diff"])  # the prediction is Inductor's source
    # ... and Inductor's own compile of it found the child's binaries: one cache entry each
    assert out["cache_entries"] == {"_fg_sparse_fwd": 1, "_copy_dense": 1}, out
