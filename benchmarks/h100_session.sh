#!/usr/bin/env bash
# The GPU work of one session, in two calls of the device tool (each under 10 minutes), from the
# repository root on the H100 machine, results under $OUT:
#   bash benchmarks/h100_session.sh A   # GPU tests || quality_video.py (the trained toy DiT), then overhead_bench.py
#   bash benchmarks/h100_session.sh B   # e2e_wan.py (all rows), then lowering_bench.py --compile-only
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
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_lowering_gpu.py \
      --durations=8 > "$OUT/gpu_tests.txt" 2>&1 &
  tp=$!
  timeout 300 python3 benchmarks/quality_video.py --device cuda --out "$OUT/quality_video" \
      --granularities slices tiles128 pooled tiles64 > "$OUT/quality_video.txt" 2>&1
  echo "quality_video rc=$?"
  wait $tp; echo "gpu tests rc=$?"
  timeout 100 python3 benchmarks/overhead_bench.py --seqs 32760 --no-sweep --out "$OUT/overhead_h100.json" > "$OUT/overhead.txt" 2>&1
  echo "overhead rc=$?"
  tail -3 "$OUT/gpu_tests.txt"; grep -A6 "density at PSNR" "$OUT/quality_video.txt"; tail -2 "$OUT/overhead.txt" | cut -c1-1500
  ;;
B)
  timeout 400 python3 benchmarks/e2e_wan.py --reps 3 --out "$OUT/e2e_wan_h100.json" > "$OUT/e2e.txt" 2>&1
  echo "e2e rc=$?"
  cp benchmarks/results/lowering_h100.json "$OUT/lowering_h100.json"
  timeout 180 python3 benchmarks/lowering_bench.py --compile-only --out "$OUT/lowering_h100.json" > "$OUT/lowering.txt" 2>&1
  echo "lowering rc=$?"
  tail -14 "$OUT/e2e.txt"; tail -12 "$OUT/lowering.txt"
  ;;
*) echo "usage: $0 A|B"; exit 2 ;;
esac
