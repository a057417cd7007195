#!/usr/bin/env bash
# The GPU work of a session, one call of the device tool per letter (each under 10 minutes), from the
# repository root on the H100 machine, results under $OUT:
#   bash benchmarks/h100_session.sh A   # GPU tests, overhead_bench.py (packing, the pooled selection's search
#                                       # plans), e2e_wan.py (all rows)
#   bash benchmarks/h100_session.sh B   # lowering_bench.py --compile-only, toy DiT: medians of 3 cold compiles
#                                       # per variant, with and without the background JIT (~7 minutes)
#   bash benchmarks/h100_session.sh C   # the compile time of one Wan layer and of Wan2.1-1.3B itself (3 cold
#                                       # compiles per backend, fresh processes)
#   bash benchmarks/h100_session.sh K   # kernel_in_model.py (the kernel on Wan's own masks, in the model and alone)
#   bash benchmarks/h100_session.sh E   # GPU tests, then the runtime ratio and the Wan layer / Wan model compile
#                                       # times (2 cold compiles per variant, FGCOMPILE_PROFILE_FORWARD=sdpa too)
#   bash benchmarks/h100_session.sh G   # compile_profile.py of the Wan layer (inductor, fgattn; raw profiles kept)
#                                       # and its compile times (2 cold compiles each)
#   bash benchmarks/h100_session.sh H   # the Wan layer's compile times: lowered, opaque, without precompile
#   bash benchmarks/h100_session.sh I   # the Wan layer's compile times with their phases (backend_s, Dynamo's table)
#   bash benchmarks/h100_session.sh V   # variant_probe.py (sparse-kernel tile configs, pooled-predictor knobs), then
#                                       # the Wan layer's compile times, REPEATS (5) cold compiles per backend
#   bash benchmarks/h100_session.sh W   # variant_probe.py (layouts, pooled), e2e_wan.py 480p b1 d0.6/d0.3 only,
#                                       # the Wan layer's compile times (REPEATS, default 3)
#   bash benchmarks/h100_session.sh X   # overhead_bench.py, then the Wan layer's compile times (REPEATS, default 5)
#   bash benchmarks/h100_session.sh L   # lowering_bench.py in full: runtime ratios, then toy DiT, Wan layer and
#                                       # Wan2.1-1.3B compile times (REPEATS, default 3, cold compiles per backend)
#   bash benchmarks/h100_session.sh T   # sparse-kernel GPU tests (both tail modes), variant_probe.py --parts kernel,
#                                       # the Wan layer's compile times with PAD_TAIL (the default) and without (REPEATS, default 3)
#   bash benchmarks/h100_session.sh D   # compile_profile.py (where the Wan layer's cold compile goes) and pack_probe.py
#   bash benchmarks/h100_session.sh S   # early-compile and lowering GPU tests (TESTS), then the Wan layer's compile
#                                       # times of VARIANTS (default: inductor, fgattn, the schedule step's kernels
#                                       # compiled on the thread only; REPEATS, default 5)
#   bash benchmarks/h100_session.sh F   # every GPU test, then the Wan layer's and the toy DiT's compile times
#                                       # (REPEATS, default 4, cold compiles per backend)
#   bash benchmarks/h100_session.sh Q   # every GPU test, then the Wan layer's compile times of VARIANTS with the
#                                       # phases of each sample (Dynamo's table: Inductor's rows, fgcompile.*)
#   bash benchmarks/h100_session.sh P   # pack_probe.py (the packing's launch grid) and an ncu profile of it
#   bash benchmarks/h100_session.sh N   # every GPU test, then e2e_wan.py at 480p batch 1, the density budgets with
#                                       # mask_storage "host_lists" against "host" (SETTINGS, REPS)
#   bash benchmarks/h100_session.sh R   # every GPU test, then captured_probe.py (one Wan layer's kernel in the model
#                                       # against alone: in place, copies, after GEMMs, during a copy; clocks)
#   bash benchmarks/h100_session.sh Y   # gap_probe.py (idle gaps of the compute stream in one Wan forward: default
#                                       # compile and fgattn d0.6 per mask storage; their causes, CUDA API calls)
#   bash benchmarks/h100_session.sh Z   # the sparse-kernel GPU tests (PYK: a -k filter), variant_probe.py --parts kernel,
#                                       # e2e_wan.py at 480p batch 1 (SETTINGS, default d0.6,d0.3; REPS; SKIP_E2E=1: none)
#   bash benchmarks/h100_session.sh M   # the mask-storage GPU tests, e2e_wan.py (every row; E2E_ARGS adds options),
#                                       # gap_probe.py (STORAGES, default host_lists: speed and active memory)
#   bash benchmarks/h100_session.sh U   # every GPU test, e2e_wan.py at 480p batch 1 (SETTINGS, default d0.6,d0.3; REPS),
#                                       # overhead_bench.py at 32,760 tokens (the pooled predictor's cost against cuDNN)
#   bash benchmarks/h100_session.sh J   # sm90_probe.py: the Gluon sm_90 sparse kernel's correctness, then its speed
#                                       # against the Triton kernel, cuDNN, flash and FlexAttention; if correct, the
#                                       # kernel and lowering GPU tests (TESTS), with COMPILE=1 the cold compile times of
#                                       # CASES (default wan,wan_model; REPEATS, default 2), and e2e_wan.py 480p b1
#                                       # (SKIP_E2E=1: none)
#   bash benchmarks/h100_session.sh EQ  # equal_error_bench.py (each granularity's time at equal output error on the
#                                       # synthetic suite, Wan 480p; EQ_ARGS), then the GPU tests (TESTS, default all);
#                                       # FLEX_CHECK=1 first runs flex_check.py (FlexAttention's output per BlockMask
#                                       # construction, random and suite inputs; FC_ARGS)
#   bash benchmarks/h100_session.sh FC  # flex_check.py (FlexAttention's output per BlockMask construction; FC_ARGS),
#                                       # then the GPU tests (TESTS, default all; PYK: a -k filter)
#   bash benchmarks/h100_session.sh KB  # FLEX_CHECK=1: flex_check.py first (FC_ARGS); the GPU tests (TESTS, PYK, TEST_LIMIT),
#                                       # then kernel_bench.py --check (KB_ARGS, KB_LIMIT: the Triton and Gluon kernels
#                                       # against cuDNN, flash and FlexAttention with each BlockMask's error recorded)
#   bash benchmarks/h100_session.sh O   # the predictor GPU tests, pooled_select_probe.py (the selection kernel's variants),
#                                       # variant_probe.py --parts kernel (the sparse kernel's tile configs)
#   bash benchmarks/h100_session.sh RT  # every GPU test, the lowered kernel against its direct launch (lowering_bench.py's
#                                       # runtime ratio, toy and Wan sizes), original_wan.py (ORIG_LIMIT)
#   bash benchmarks/h100_session.sh MD  # e2e_models.py: HunyuanVideo and CogVideoX-5B end to end (MD_ARGS, MD_LIMIT)
#   bash benchmarks/h100_session.sh QO  # every GPU test, query_order_bench.py (the order's cost), equal_error_bench.py
#                                       # for QO_GRANS (default 128x1, 128x1-pca, 128x128, 128x128-pca-qk(-full); QO_ARGS),
#                                       # max_density_probe.py (SKIP_MD=1: none)
# diffusers (and importlib_metadata) travel as wheels in .whl/ (see the README, "GPU machine").
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
# results are named after the GPU model: "h100" on an H100, "h200" on an H200
TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
flex_check() {  # FlexAttention's output per BlockMask construction (FC_ARGS, FC_LIMIT)
  timeout ${FC_LIMIT:-200} python3 benchmarks/flex_check.py --suite ${FC_ARGS} --out "$OUT/flex_check_${TAG}.json" > "$OUT/flex_check.txt" 2>&1
  echo "flex_check rc=$?"; grep -E "^\{" "$OUT/flex_check.txt" | sed -E "s/'tile_density': [0-9.]+, //" | cut -c1-200
}
case "$1" in
A)
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 4 --durations=8 > "$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests rc=$?"
  timeout 90 python3 benchmarks/overhead_bench.py --seqs 32760 --no-sweep --out "$OUT/overhead_${TAG}.json" > "$OUT/overhead.txt" 2>&1
  echo "overhead rc=$?"
  timeout 270 python3 benchmarks/e2e_wan.py --reps 3 --out "$OUT/e2e_wan_${TAG}.json" > "$OUT/e2e.txt" 2>&1
  echo "e2e rc=$?"
  grep -E "passed|failed|error" "$OUT/gpu_tests.txt" | tail -15; tail -1 "$OUT/overhead.txt" | cut -c1-1200
  tail -14 "$OUT/e2e.txt"
  ;;
B)
  [ -f benchmarks/results/lowering_${TAG}.json ] && cp benchmarks/results/lowering_${TAG}.json "$OUT/lowering_${TAG}.json"
  timeout 420 python3 benchmarks/lowering_bench.py --compile-only --cases toy --repeats 3 \
      --variants inductor,fgattn,fgattn_noprecompile --out "$OUT/lowering_${TAG}.json" > "$OUT/lowering.txt" 2>&1
  echo "lowering rc=$?"
  tail -12 "$OUT/lowering.txt"
  ;;
C)
  [ -f benchmarks/results/lowering_${TAG}.json ] && cp benchmarks/results/lowering_${TAG}.json "$OUT/lowering_${TAG}_wan.json"
  timeout 540 python3 benchmarks/lowering_bench.py --compile-only --cases wan,wan_model --repeats 3 \
      --variants inductor,fgattn --out "$OUT/lowering_${TAG}_wan.json" > "$OUT/lowering_wan.txt" 2>&1
  echo "lowering (Wan layer, Wan model) rc=$?"
  grep -E "^(wan|wan_model) " "$OUT/lowering_wan.txt"
  ;;
P)
  timeout 200 python3 benchmarks/pack_probe.py --out "$OUT/pack_probe_${TAG}.json" > "$OUT/pack_probe.txt" 2>&1
  echo "pack_probe rc=$?"
  timeout 200 ncu --clock-control none -k regex:_packed_from_bits -c 1 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
      python3 benchmarks/pack_probe.py --once > "$OUT/pack_ncu.txt" 2>&1
  echo "ncu rc=$?"
  grep -E "^d0" "$OUT/pack_probe.txt" | tail -4; grep -vE "^==PROF==|^\s*$" "$OUT/pack_ncu.txt" | tail -60
  ;;
E)
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 4 > "$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests rc=$?"
  timeout 330 python3 benchmarks/lowering_bench.py --compile-only --cases wan,wan_model --repeats 2 \
      --variants inductor,fgattn,fgattn_sdpa_forward --out "$OUT/lowering_${TAG}.json" > "$OUT/lowering_wan.txt" 2>&1
  echo "lowering (Wan layer, Wan model) rc=$?"
  grep -E "passed|failed" "$OUT/gpu_tests.txt" | tail -3; grep -E "^FAILED" "$OUT/gpu_tests.txt" | head
  grep -E "^(wan|wan_model) |runtime_ratio|compile_time_ratio" "$OUT/lowering_wan.txt" | tail -12
  ;;
G)
  timeout 150 python3 benchmarks/compile_profile.py --case wan --variants inductor,fgattn --top 25 --save "$OUT/prof" > "$OUT/compile_profile.txt" 2>&1
  echo "compile_profile rc=$?"
  timeout 200 python3 benchmarks/lowering_bench.py --compile-only --cases wan --repeats 2 \
      --variants inductor,fgattn --out "$OUT/lowering_${TAG}_wan.json" > "$OUT/lowering_wan.txt" 2>&1
  echo "lowering (Wan layer) rc=$?"
  grep -E "^wan |compile_time_ratio\"" "$OUT/lowering_wan.txt" | tail -3
  grep -E "^(=====|child|log)" "$OUT/compile_profile.txt" | cut -c1-220
  ;;
H)
  timeout 300 python3 benchmarks/lowering_bench.py --compile-only --cases wan --repeats 2 \
      --variants inductor,fgattn,fgattn_opaque,fgattn_noprecompile --out "$OUT/lowering_${TAG}_wan.json" > "$OUT/lowering_wan.txt" 2>&1
  echo "lowering (Wan layer) rc=$?"
  grep -E "^wan |compile_time_ratio" "$OUT/lowering_wan.txt" | tail -8
  ;;
I)
  timeout ${LIMIT:-200} python3 benchmarks/lowering_bench.py --compile-only --cases wan --repeats ${REPEATS:-2} \
      --variants inductor,fgattn --out "$OUT/lowering_${TAG}_wan_phases.json" > "$OUT/lowering_wan.txt" 2>&1
  echo "lowering (Wan layer) rc=$?"
  grep -E "^wan |compile_time_ratio\"" "$OUT/lowering_wan.txt" | tail -3
  ;;
V)
  timeout 200 python3 benchmarks/variant_probe.py --out "$OUT/variant_probe_${TAG}.json" > "$OUT/variant_probe.txt" 2>&1
  echo "variant_probe rc=$?"
  timeout ${LIMIT:-240} python3 benchmarks/lowering_bench.py --compile-only --cases wan --repeats ${REPEATS:-5} \
      --variants inductor,fgattn --out "$OUT/lowering_${TAG}_wan.json" > "$OUT/lowering_wan.txt" 2>&1
  echo "lowering (Wan layer) rc=$?"
  grep -vE "Warning|warn" "$OUT/variant_probe.txt" | tail -30
  grep -E "^wan |compile_time_ratio\"" "$OUT/lowering_wan.txt" | tail -3
  ;;
W)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_lowering_gpu.py -n 4 -x > "$OUT/gpu_tests_lowering.txt" 2>&1
  echo "lowering gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests_lowering.txt" | head -8
  timeout 100 python3 benchmarks/variant_probe.py --parts layout,pooled --out "$OUT/variant_probe_${TAG}.json" > "$OUT/variant_probe.txt" 2>&1
  echo "variant_probe rc=$?"
  timeout 200 python3 benchmarks/e2e_wan.py --reps 3 --skip-720p --skip-b2 --settings d0.6,d0.3 --out "$OUT/e2e_wan_${TAG}.json" > "$OUT/e2e.txt" 2>&1
  echo "e2e rc=$?"
  timeout ${LIMIT:-150} python3 benchmarks/lowering_bench.py --compile-only --cases wan --repeats ${REPEATS:-3} \
      --variants inductor,fgattn --out "$OUT/lowering_${TAG}_wan.json" > "$OUT/lowering_wan.txt" 2>&1
  echo "lowering (Wan layer) rc=$?"
  grep -E "^(layout|pooled_bits)" "$OUT/variant_probe.txt"; tail -5 "$OUT/e2e.txt"
  grep -E "^wan |compile_time_ratio\"" "$OUT/lowering_wan.txt" | tail -3
  ;;
X)
  timeout 100 python3 benchmarks/overhead_bench.py --seqs 32760 --no-sweep --out "$OUT/overhead_${TAG}.json" > "$OUT/overhead.txt" 2>&1
  echo "overhead rc=$?"
  timeout ${LIMIT:-300} python3 benchmarks/lowering_bench.py --compile-only --cases wan --repeats ${REPEATS:-5} \
      --variants inductor,fgattn --out "$OUT/lowering_${TAG}_wan.json" > "$OUT/lowering_wan.txt" 2>&1
  echo "lowering (Wan layer) rc=$?"
  tail -1 "$OUT/overhead.txt" | cut -c1-1500
  grep -E "^wan |compile_time_ratio\"" "$OUT/lowering_wan.txt" | tail -3
  ;;
D)
  timeout 240 python3 benchmarks/compile_profile.py --case wan > "$OUT/compile_profile.txt" 2>&1
  echo "compile_profile rc=$?"
  timeout 200 python3 benchmarks/pack_probe.py --out "$OUT/pack_probe_${TAG}.json" > "$OUT/pack_probe.txt" 2>&1
  echo "pack_probe rc=$?"
  grep -E "^(=====|child|log)" "$OUT/compile_profile.txt" | cut -c1-300; grep -E "^d0" "$OUT/pack_probe.txt" | tail -4
  ;;
K)
  timeout 300 python3 benchmarks/kernel_in_model.py --out "$OUT/kernel_in_model_${TAG}.json" > "$OUT/kernel_in_model.txt" 2>&1
  echo "kernel_in_model rc=$?"
  grep -vE "Warning|warn|^ *$|float32:" "$OUT/kernel_in_model.txt" | tail -60
  ;;
L)
  timeout ${LIMIT:-540} python3 benchmarks/lowering_bench.py --cases toy,wan,wan_model --repeats ${REPEATS:-3} ${EXTRA} \
      --out "$OUT/lowering_${TAG}.json" > "$OUT/lowering.txt" 2>&1
  echo "lowering (runtime ratio; toy, Wan layer, Wan model compile) rc=$?"
  grep -E "^(toy|wan|wan_model) |runtime_ratio_lowered_vs_direct\"|compile_time_ratio" "$OUT/lowering.txt" | tail -12
  ;;
T)
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py -n 4 > "$OUT/gpu_tests_kernels.txt" 2>&1
  echo "kernel gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests_kernels.txt" | head -12
  timeout 150 python3 benchmarks/variant_probe.py --parts kernel --out "$OUT/variant_probe_${TAG}.json" > "$OUT/variant_probe.txt" 2>&1
  echo "variant_probe rc=$?"
  timeout ${LIMIT:-240} python3 benchmarks/lowering_bench.py --compile-only --cases wan --repeats ${REPEATS:-3} \
      --variants inductor,fgattn,fgattn_masked_tail --out "$OUT/lowering_${TAG}_wan.json" > "$OUT/lowering_wan.txt" 2>&1
  echo "lowering (Wan layer) rc=$?"
  grep -vE "Warning|warn" "$OUT/variant_probe.txt" | tail -14
  grep -E "^wan |compile_time_ratio" "$OUT/lowering_wan.txt" | tail -6
  ;;
S)
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_early_compile_gpu.py ${TESTS:-tests/test_lowering_gpu.py} -n 4 \
      > "$OUT/gpu_tests_early.txt" 2>&1
  echo "early-compile + lowering gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E |^[-+@]" "$OUT/gpu_tests_early.txt" | head -60
  timeout ${LIMIT:-330} python3 benchmarks/lowering_bench.py --compile-only --cases wan --repeats ${REPEATS:-5} \
      --variants ${VARIANTS:-inductor,fgattn,fgattn_thread_precompile} --out "$OUT/lowering_${TAG}_wan_early.json" > "$OUT/lowering_wan.txt" 2>&1
  echo "lowering (Wan layer) rc=$?"
  python3 - "$OUT/lowering_${TAG}_wan_early.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))["wan"]["compile"]
for v, xs in c["compile_s_samples"].items():
    print(f"{v:18s}", " ".join(f"{x:5.2f}" for x in xs), f"median {c['compile_s'][v]:.2f}")
    for e, p in zip(c.get("early_compile_samples", {}).get(v, []), c.get("precompile_samples", {}).get(v, [])):
        print("   early", {k: x for k, x in (e or {}).items() if k != "skipped"}, "precompile", p)
print({k: round(v, 3) for k, v in c.items() if k.startswith("compile_time_ratio")})
PY
  ;;
F)
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 6 > "$OUT/gpu_tests_final.txt" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests_final.txt" | head -12
  timeout ${LIMIT:-260} python3 benchmarks/lowering_bench.py --compile-only --cases wan,toy --repeats ${REPEATS:-4} \
      --variants inductor,fgattn --out "$OUT/lowering_${TAG}_final.json" > "$OUT/lowering_final.txt" 2>&1
  echo "lowering (Wan layer, toy DiT) rc=$?"
  grep -E "^(wan|toy) " "$OUT/lowering_final.txt" | tail -4
  ;;
Q)
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 6 > "$OUT/gpu_tests_all.txt" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests_all.txt" | head -12
  timeout ${LIMIT:-200} python3 benchmarks/lowering_bench.py --compile-only --cases wan --repeats ${REPEATS:-3} \
      --variants ${VARIANTS:-inductor,fgattn} --out "$OUT/lowering_${TAG}_wan_phases.json" > "$OUT/lowering_wan.txt" 2>&1
  echo "lowering (Wan layer) rc=$?"
  python3 - "$OUT/lowering_${TAG}_wan_phases.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))["wan"]["compile"]
for v, xs in c["compile_s_samples"].items():
    print(f"{v:18s}", " ".join(f"{x:5.2f}" for x in xs), f"median {c['compile_s'][v]:.2f}")
    for ph, pc in zip(c["phase_samples"][v], c.get("precompile_samples", {}).get(v) or [None] * len(xs)):
        print("   ", {k.replace("fgcompile.", "fg."): v for k, v in ph.items()}, pc or "")
print({k: round(v, 3) for k, v in c.items() if k.startswith("compile_time_ratio")})
PY
  ;;
N)
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 6 > "$OUT/gpu_tests_all.txt" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests_all.txt" | head -12
  timeout ${LIMIT:-300} python3 benchmarks/e2e_wan.py --reps ${REPS:-3} --skip-720p --skip-b2 \
      --settings ${SETTINGS:-d0.6,d0.6-host,d0.3,d0.3-host} --out "$OUT/e2e_wan_${TAG}_storage.json" > "$OUT/e2e_storage.txt" 2>&1
  echo "e2e (480p b1, host_lists vs host) rc=$?"
  python3 - "$OUT/e2e_wan_${TAG}_storage.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    tk = r["top_kernels_fgattn"]
    pk = next((v[0] for k, v in tk.items() if "packed_from_bits" in k), 0.0)
    sp = next((v[0] for k, v in tk.items() if "_fg_sparse" in k), 0.0)
    print(f"{r['setting']:10s} {r['mask_storage']:10s} default {r['ms_default']:.1f} fgattn {r['ms_fgattn']:.1f} "
          f"x{r['speedup']:.3f} sparse {sp:.1f} packing {pk:.1f} mem {r['memory_ratio']:.3f} err {r['rel_err_sparse_call']:.4f}")
PY
  ;;
R)
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 6 > "$OUT/gpu_tests_all.txt" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests_all.txt" | head -12
  timeout ${LIMIT:-300} python3 benchmarks/captured_probe.py ${EXTRA} --out "$OUT/captured_probe_${TAG}.json" \
      > "$OUT/captured_probe.txt" 2>&1
  echo "captured_probe rc=$?"
  grep -vE "Warning|warn|^ *$" "$OUT/captured_probe.txt" | tail -45
  ;;
Y)
  timeout ${LIMIT:-420} python3 benchmarks/gap_probe.py ${EXTRA} --out "$OUT/gap_probe_${TAG}.json" > "$OUT/gap_probe.txt" 2>&1
  echo "gap_probe rc=$?"
  grep -vE "Warning|warn|^ *$" "$OUT/gap_probe.txt" | tail -50
  ;;
Z)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py -n 6 ${PYK:+-k "$PYK"} > "$OUT/gpu_tests_kernels.txt" 2>&1
  echo "gpu kernel tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests_kernels.txt" | head -12
  timeout 150 python3 benchmarks/variant_probe.py --parts kernel --out "$OUT/variant_probe_${TAG}.json" > "$OUT/variant_probe.txt" 2>&1
  echo "variant_probe rc=$?"; grep -E "^d0|cudnn" "$OUT/variant_probe.txt"
  [ -n "$SKIP_E2E" ] && exit 0
  timeout 280 python3 benchmarks/e2e_wan.py --reps ${REPS:-3} --skip-720p --skip-b2 --settings ${SETTINGS:-d0.6,d0.3} \
      --out "$OUT/e2e_wan_${TAG}.json" > "$OUT/e2e.txt" 2>&1
  echo "e2e rc=$?"; tail -6 "$OUT/e2e.txt"
  ;;
M)
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_mask_storage_gpu.py -s > "$OUT/gpu_tests_storage.txt" 2>&1
  echo "gpu storage tests rc=$?"; grep -E "passed|failed|^FAILED|^E |active peak" "$OUT/gpu_tests_storage.txt" | head -12
  timeout ${E2E_LIMIT:-300} python3 benchmarks/e2e_wan.py --reps ${REPS:-3} ${E2E_ARGS} \
      --out "$OUT/e2e_wan_${TAG}.json" > "$OUT/e2e.txt" 2>&1
  echo "e2e rc=$?"; grep -E "^4|^7|memory_ratio|speedup_" "$OUT/e2e.txt"
  timeout ${LIMIT:-150} python3 benchmarks/gap_probe.py --storages ${STORAGES:-host_lists} \
      --out "$OUT/gap_probe_${TAG}.json" > "$OUT/gap_probe.txt" 2>&1
  echo "gap_probe rc=$?"; grep -E "^variant|^default |^fgattn" "$OUT/gap_probe.txt"
  ;;
O)
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_predictors.py > "$OUT/gpu_tests_predictors.txt" 2>&1
  echo "gpu predictor tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests_predictors.txt" | head -8
  timeout ${LIMIT:-150} python3 benchmarks/pooled_select_probe.py --out "$OUT/pooled_select_probe_${TAG}.json" > "$OUT/pooled_select_probe.txt" 2>&1
  echo "pooled_select_probe rc=$?"; grep -vE "Warning|warn|^ *$" "$OUT/pooled_select_probe.txt" | tail -14
  timeout 220 python3 benchmarks/variant_probe.py --parts kernel --out "$OUT/variant_probe_${TAG}.json" > "$OUT/variant_probe.txt" 2>&1
  echo "variant_probe rc=$?"; grep -vE "Warning|warn|^ *$" "$OUT/variant_probe.txt" | tail -20
  ;;
RT)
  timeout ${TEST_LIMIT:-240} python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 4 > "$OUT/gpu_tests_all.txt" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests_all.txt" | head -12
  timeout ${LIMIT:-120} python3 -c "
import json, sys; sys.path.insert(0, 'benchmarks'); import lowering_bench as lb
r = lb.runtime_ratios()
json.dump(r, open('$OUT/runtime_ratio_${TAG}.json', 'w'), indent=1)
print({c: round(v['runtime_ratio_lowered_vs_direct'], 4) for c, v in r.items()})" > "$OUT/runtime_ratio.txt" 2>&1
  echo "runtime ratio rc=$?"; tail -1 "$OUT/runtime_ratio.txt"
  timeout ${ORIG_LIMIT:-200} python3 benchmarks/original_wan.py --out "$OUT/original_wan_${TAG}.json" > "$OUT/original_wan.txt" 2>&1
  echo "original_wan rc=$?"; tail -3 "$OUT/original_wan.txt"
  ;;
QO)
  timeout ${TEST_LIMIT:-230} python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 4 > "$OUT/gpu_tests_all.txt" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests_all.txt" | head -12
  timeout ${QOB_LIMIT:-90} python3 benchmarks/query_order_bench.py --out "$OUT/query_order_${TAG}.json" > "$OUT/query_order.txt" 2>&1
  echo "query_order rc=$?"; tail -6 "$OUT/query_order.txt"
  timeout ${EQ_LIMIT:-260} python3 benchmarks/equal_error_bench.py --steps 10 \
      --granularities ${QO_GRANS:-128x1,128x1-pca,128x128,128x128-pca-qk,128x128-pca-qk-full} ${QO_ARGS} \
      --out "$OUT/equal_error_pca_${TAG}.json" > "$OUT/equal_error.txt" 2>&1
  echo "equal_error rc=$?"; tail -8 "$OUT/equal_error.txt"
  if [ -z "$SKIP_MD" ]; then
    timeout ${MDP_LIMIT:-110} python3 benchmarks/max_density_probe.py --out "$OUT/max_density_${TAG}.json" > "$OUT/max_density.txt" 2>&1
    echo "max_density rc=$?"; tail -20 "$OUT/max_density.txt"
  fi
  ;;
MD)
  timeout ${MD_LIMIT:-560} python3 benchmarks/e2e_models.py ${MD_ARGS} --out "$OUT/e2e_models_${TAG}.json" > "$OUT/e2e_models.txt" 2>&1
  echo "e2e_models rc=$?"; grep -vE "float32|^\s*$" "$OUT/e2e_models.txt" | tail -14
  ;;
U)
  timeout ${TEST_LIMIT:-240} python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 4 > "$OUT/gpu_tests_all.txt" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests_all.txt" | head -12
  timeout ${E2E_LIMIT:-200} python3 benchmarks/e2e_wan.py --reps ${REPS:-3} --skip-720p --skip-b2 --settings ${SETTINGS:-d0.6,d0.3} \
      --out "$OUT/e2e_wan_${TAG}.json" > "$OUT/e2e.txt" 2>&1
  echo "e2e rc=$?"; grep -E "^480p|memory_ratio_480p|speedup_480p_d0" "$OUT/e2e.txt"
  timeout ${LIMIT:-100} python3 benchmarks/overhead_bench.py --seqs 32760 --no-sweep --out "$OUT/overhead_${TAG}.json" > "$OUT/overhead.txt" 2>&1
  echo "overhead rc=$?"; grep -oE '"(cudnn_dense_ms|pooled_bits_ms|pooled_over_cudnn|pooled_select_kernel_ms|pooled_parts_kernel_ms)": [0-9.e-]+' "$OUT/overhead_${TAG}.json"
  ;;
J)
  timeout ${LIMIT:-220} python3 benchmarks/sm90_probe.py ${PROBE_ARGS} --out "$OUT/sm90_probe_${TAG}.json" > "$OUT/sm90_probe.txt" 2>&1
  echo "sm90_probe rc=$?"; grep -vE "Warning|warn|^ *$" "$OUT/sm90_probe.txt" | tail -${TAIL:-40}
  python3 -c "import json,sys; sys.exit(0 if json.load(open('$OUT/sm90_probe_${TAG}.json'))['correct'] else 1)" || exit 1
  timeout ${TEST_LIMIT:-150} python3 -m pytest -q -p no:cacheprovider -m gpu ${TESTS:-tests/test_kernels_gpu.py tests/test_lowering_gpu.py} -n 4 > "$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests.txt" | head -12
  if [ -n "$COMPILE" ]; then
    timeout ${COMPILE_LIMIT:-240} python3 benchmarks/lowering_bench.py --compile-only --cases ${CASES:-wan,wan_model} \
        --repeats ${REPEATS:-2} --variants inductor,fgattn --out "$OUT/lowering_${TAG}_sm90.json" > "$OUT/lowering.txt" 2>&1
    echo "lowering rc=$?"; grep -E "^(toy|wan|wan_model) |compile_time_ratio" "$OUT/lowering.txt" | tail -8
  fi
  [ -n "$SKIP_E2E" ] && exit 0
  timeout ${E2E_LIMIT:-200} python3 benchmarks/e2e_wan.py --reps ${REPS:-3} --skip-720p --skip-b2 --settings ${SETTINGS:-d0.6,d0.3} \
      --out "$OUT/e2e_wan_${TAG}.json" > "$OUT/e2e.txt" 2>&1
  echo "e2e rc=$?"; grep -E "^480p|memory_ratio_480p|speedup_480p_d0" "$OUT/e2e.txt"
  ;;
EQ)
  [ -n "$FLEX_CHECK" ] && flex_check
  timeout ${LIMIT:-280} python3 benchmarks/equal_error_bench.py ${EQ_ARGS} --out "$OUT/equal_error_${TAG}.json" > "$OUT/equal_error.txt" 2>&1
  echo "equal_error rc=$?"; grep -vE "Warning|warn|^ *$" "$OUT/equal_error.txt" | tail -${TAIL:-12}
  [ -n "$SKIP_TESTS" ] && exit 0
  timeout ${TEST_LIMIT:-270} python3 -m pytest -q -p no:cacheprovider -m gpu ${TESTS:-tests} -n 4 --durations=6 > "$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests.txt" | head -12
  ;;
FC)
  flex_check
  timeout ${TEST_LIMIT:-240} python3 -m pytest -q -p no:cacheprovider -m gpu ${TESTS:-tests} ${PYK:+-k "$PYK"} -n 4 --durations=6 > "$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests.txt" | head -12
  ;;
KB)
  [ "${FLEX_CHECK:-0}" = 1 ] && flex_check
  timeout ${TEST_LIMIT:-240} python3 -m pytest -q -p no:cacheprovider -m gpu ${TESTS:-tests} ${PYK:+-k "$PYK"} -n 4 --durations=6 > "$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|^FAILED|^E " "$OUT/gpu_tests.txt" | head -12
  timeout ${KB_LIMIT:-300} python3 benchmarks/kernel_bench.py --check ${KB_ARGS} --out "$OUT/kernel_${TAG}.json" > "$OUT/kernel_bench.txt" 2>&1
  echo "kernel_bench rc=$?"; grep -vE "^  \{|Warning|warn" "$OUT/kernel_bench.txt" | tail -24
  ;;
*) echo "usage: $0 A|B|C|D|E|EQ|FC|F|G|H|I|J|K|KB|M|N|O|P|Q|R|S|T|U|V|W|X|Y|Z"; exit 2 ;;
esac
