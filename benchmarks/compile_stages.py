"""How long Triton takes to compile the sparse kernel for sm_90, per compiler stage, on this machine's
CPU (no GPU needed: an AOT compile through ``triton_sparse.compile_for_target``), for the variants
that matter to a compiled model's cold compile (issue 6):

    REPEATS=5 python benchmarks/compile_stages.py

Each compile gets a fresh cache directory; a first compile warms Triton up and is not counted. Stage times
come from wrapping the CUDA backend's stages (``CUDABackend.add_stages``); the AST-to-TTIR front end
is the rest of the total. Diagnostic only: prints, writes nothing.
"""
import time, functools
from triton.backends.nvidia.compiler import CUDABackend
orig = CUDABackend.add_stages
T = {}
def add_stages(self, stages, options, *a, **kw):
    orig(self, stages, options, *a, **kw)
    for k, fn in list(stages.items()):
        def wrap(*x, _fn=fn, _k=k):
            t = time.perf_counter(); r = _fn(*x); T[_k] = T.get(_k, 0) + time.perf_counter() - t; return r
        stages[k] = wrap
CUDABackend.add_stages = add_stages
import os
import statistics
import tempfile

from fgcompile.kernels.triton_sparse import compile_for_target

VARIANTS = {
    "lowered (the compiled model's variant)": dict(offs_64=False, full_tile=0),
    "lowered, num_stages=2": dict(offs_64=False, full_tile=0, num_stages=2),
    "direct (full-tile loop)": dict(offs_64=False, full_tile=128),
}


def once(kw: dict) -> tuple:
    """One cold compile (a fresh cache directory): (seconds, {stage: seconds})."""
    args = dict(dtype="bf16", head_dim=128, block_m=128, key_block=1, block_n=128, num_warps=8, num_stages=3)
    args.update(kw)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
    T.clear()
    t = time.perf_counter()
    compile_for_target(90, **args)
    return time.perf_counter() - t, dict(T)


once(dict(offs_64=False, full_tile=0, head_dim=64))  # warm-up: imports, libraries
REPEATS = int(os.environ.get("REPEATS", "5"))
runs = {k: [] for k in VARIANTS}
for _ in range(REPEATS):  # interleaved, so that drift of the machine hits every variant alike
    for k, kw in VARIANTS.items():
        runs[k].append(once(kw))
for k, r in runs.items():
    tot = [x[0] for x in r]
    stages = {s: statistics.median(x[1][s] for x in r) for s in r[0][1]}
    print(f"{statistics.median(tot):5.2f} s median of {len(tot)} (min {min(tot):.2f}) {k}: "
          + ", ".join(f"{s} {v:.2f}" for s, v in stages.items()), flush=True)
