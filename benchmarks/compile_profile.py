"""Where a cold compile's time goes: the first call of ``benchmarks/lowering_bench.py``'s children
under cProfile (the calling thread) with fgcompile's debug log (the background precompile's
durations and how long the first call waited for it), per variant, fresh caches each.

    python benchmarks/compile_profile.py --case wan --variants inductor,fgattn,fgattn_noprecompile

Prints, per variant: the child's timings, the background compile lines of the log, and the
functions with the largest cumulative time (filtered to compile-related names). Diagnostic only:
the compile-time figures of record come from lowering_bench.py (medians of fresh processes).
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from lowering_bench import VARIANTS  # noqa: E402

#: substrings of the function names worth showing (the rest is import and model-building noise)
KEEP = ("compile_fx", "fx_codegen", "codegen", "async_compile", "wait", "fgcompile", "triton_op", "user_defined",
        "_compile", "autotune", "load_by_key", "precompile", "run_passes", "lower", "backend", "aot", "make_launcher",
        "compile_module", "PyCodeCache", "inductor")


def profile(case: str, variant: str, top: int, save: str = "") -> None:
    backend, extra = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as d:
        prof = os.path.join(d, "prof.out")
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(d, "inductor"), TRITON_CACHE_DIR=os.path.join(d, "triton"),
                   TORCH_LOGS="+fgcompile", **extra)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
        r = subprocess.run([sys.executable, "-m", "cProfile", "-o", prof, os.path.join(HERE, "lowering_bench.py"),
                            "--child", case, backend], env=env, capture_output=True, text=True, timeout=400)
        print(f"===== {case} / {variant}: rc {r.returncode}")
        print("child:", (r.stdout.strip().splitlines() or ["(no output)"])[-1])
        for line in r.stderr.splitlines():
            if "lowering/warmup.py" in line or "Traceback" in line or "Error" in line:  # the precompile's log
                print("log:", line[-200:])
        if r.returncode != 0:
            print(r.stderr[-3000:])
            return
        if save:  # the whole profile, for pstats later (callers, callees)
            os.makedirs(save, exist_ok=True)
            import shutil

            shutil.copy(prof, os.path.join(save, f"{case}_{variant}.prof"))
        st = pstats.Stats(prof)
        rows = []
        for (fn, line, name), (cc, nc, tt, ct, callers) in st.stats.items():
            label = f"{os.path.basename(fn)}:{line}({name})"
            if any(k in label for k in KEEP):
                rows.append((ct, tt, nc, label))
        rows.sort(reverse=True)
        print(f"{'cum s':>8} {'own s':>8} {'calls':>7}  function")
        for ct, tt, nc, label in rows[:top]:
            print(f"{ct:8.2f} {tt:8.2f} {nc:7d}  {label}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="wan", choices=("toy", "wan", "wan_model"))
    ap.add_argument("--variants", default="inductor,fgattn,fgattn_noprecompile")
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--save", default="", help="a folder for the raw cProfile files (CASE_VARIANT.prof)")
    a = ap.parse_args()
    for v in a.variants.split(","):
        profile(a.case, v, a.top, a.save)


if __name__ == "__main__":
    main()
