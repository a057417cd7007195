#!/usr/bin/env bash
# The GPU work of one session, in two calls of the device tool (each under 10 minutes), from the
# repository root on the H100 machine, results under $OUT:
#   bash benchmarks/h100_session.sh A   # GPU tests, then lowering_bench.py --compile-only (toy, Wan layer,
#                                       # Wan2.1-1.3B), then layout_probe.py
#   bash benchmarks/h100_session.sh B   # e2e_wan.py (all rows)
# diffusers (and importlib_metadata) travel as wheels in .whl/ (see the README, "GPU machine").
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
case "$1" in
A)
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests --durations=8 > "$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests rc=$?"
  cp benchmarks/results/lowering_h100.json "$OUT/lowering_h100.json"
  timeout 300 python3 benchmarks/lowering_bench.py --compile-only --out "$OUT/lowering_h100.json" > "$OUT/lowering.txt" 2>&1
  echo "lowering rc=$?"
  timeout 60 python3 benchmarks/layout_probe.py "$OUT/layout_h100.json" > "$OUT/layout.txt" 2>&1
  echo "layout rc=$?"
  grep -E "passed|failed|error" "$OUT/gpu_tests.txt" | tail -15; tail -12 "$OUT/lowering.txt"; cat "$OUT/layout.txt" | tail -12
  ;;
B)
  timeout 560 python3 benchmarks/e2e_wan.py --reps 3 --out "$OUT/e2e_wan_h100.json" > "$OUT/e2e.txt" 2>&1
  echo "e2e rc=$?"
  tail -14 "$OUT/e2e.txt"
  ;;
*) echo "usage: $0 A|B"; exit 2 ;;
esac
