"""How long Triton takes to compile the sparse kernel for sm_90, per compiler stage, on this machine's
CPU (no GPU needed: an AOT compile through ``triton_sparse.compile_for_target``), for the variants
that matter to a compiled model's cold compile (issue 6):

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/compile_stages.py

The first line warms Triton up (imports, the backend's libraries) and is not a figure. Stage times
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
from fgcompile.kernels.triton_sparse import compile_for_target
for label, kw in [("warmup", dict(offs_64=False, has_dense=False, full_tile=0, head_dim=64)),
                  ("lowered, no dense epilogue A", dict(offs_64=False, has_dense=False, full_tile=0)),
                  ("lowered, num_stages=2", dict(offs_64=False, has_dense=True, full_tile=0, num_stages=2)),
                  ("lowered (dense epilogue)", dict(offs_64=False, has_dense=True, full_tile=0))]:
    args = dict(dtype="bf16", head_dim=128, block_m=128, key_block=1, block_n=128, num_warps=8, num_stages=3); args.update(kw)
    T.clear(); t = time.perf_counter(); ck = compile_for_target(90, **args)
    print(f"{time.perf_counter()-t:5.2f} s {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in T.items()), flush=True)
