#!/usr/bin/env bash
# GPU check for the Pallas kernels (issue 4): the gpu-marked tests, then the kernel benchmark,
# the INT8 conv products by lowering (CONV_LOWERING=0 skips it), the DA-INT8 ResNet-50 step vs
# bf16 (INT8_STEP=0 skips it), then the binary graph index on the
# GPU (issue 5; ANN_N=0 skips it). PROBE=0 skips the XLA int8 reference probe.
# Run from the repo root with the machine's python3 (jax with CUDA installed; alijax need not
# be installed). Results: ${OUT:-benchmarks/results}/kernels-gpu.json and a table printed last.
# Aimed at ~5 minutes on one H100/H200: config sweeps stop early after --budget-s.
# Shorter: TEST_PATHS=tests/pallas_kernels TEST_TIMEOUT=70 BENCH_BUDGET=55 BENCH_TIMEOUT=150.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"

"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
start=$(date +%s)
# The Mosaic GPU (wgmma) int8 kernel and the tensor-core Hamming distance on it first, on their
# own clock: a kernel that deadlocks on its
# barriers would otherwise eat the whole run. If it fails, the benchmark leaves Mosaic out.
echo "=== gpu-marked tests: Mosaic GPU int8 matmul ==="
timeout "${MOSAIC_TIMEOUT:-150}" "$PY" -m pytest -m gpu tests/pallas_kernels -k "Mosaic or Tensorcore" \
  -q -p no:cacheprovider -o addopts="" --durations=5 2>&1 | tee "$OUT_DIR/gpu-tests-mosaic.log"
mosaic_rc=${PIPESTATUS[0]}
bench_flags=()
if [ "$mosaic_rc" != "0" ]; then bench_flags+=(--no-mosaic); fi
echo "mosaic tests rc=$mosaic_rc in $(( $(date +%s) - start ))s"

echo "=== gpu-marked tests ==="
timeout "${TEST_TIMEOUT:-120}" "$PY" -m pytest -m gpu ${TEST_PATHS:-tests/pallas_kernels tests/ann tests/quant} -k "not Mosaic and not Tensorcore" \
  -q -p no:cacheprovider -o addopts="" --durations=8 2>&1 | tee "$OUT_DIR/gpu-tests.log"
test_rc=${PIPESTATUS[0]}
echo "tests rc=$test_rc in $(( $(date +%s) - start ))s"

if [ "${PROBE:-1}" != "0" ]; then
  echo "=== XLA int8 reference probe ==="
  timeout 40 "$PY" benchmarks/probe_int8_reference.py 2>&1 | tee "$OUT_DIR/probe-int8-reference.log"
fi

echo "=== benchmarks ==="
timeout "${BENCH_TIMEOUT:-250}" "$PY" benchmarks/kernels.py --budget-s "${BENCH_BUDGET:-110}" --out "$OUT_DIR/kernels-gpu.json" \
  "${bench_flags[@]}" "$@" \
  2>&1 | tee "$OUT_DIR/kernels-gpu.log"
bench_rc=${PIPESTATUS[0]}

if [ "${CONV_LOWERING:-1}" != "0" ]; then
  echo "=== INT8 conv products: cuDNN on float codes vs im2col + int8_matmul ==="
  # What Recipe.conv_lowering="auto" should pick on a GPU (it is "conv" there until measured).
  timeout "${CONV_TIMEOUT:-150}" "$PY" benchmarks/conv_lowering.py --preset resnet50 \
    --batch "${CONV_BATCH:-256}" --repeats 3 --out "$OUT_DIR/conv-lowering-gpu.json" \
    2>&1 | tee "$OUT_DIR/conv-lowering-gpu.log"
fi

if [ "${INT8_STEP:-1}" != "0" ]; then
  echo "=== DA-INT8 ResNet-50 train step vs bf16 ==="
  # bf16 first (the baseline), then DA-INT8 with its convs as int8 GEMMs (im2col), then on
  # bf16 codes through cuDNN, then on float32 codes (the slow path, last: run 4 did not finish
  # it in 150 s).
  timeout "${STEP_TIMEOUT:-240}" "$PY" benchmarks/int8_step.py --steps "${STEP_STEPS:-5}" \
    --recipes "${STEP_RECIPES:-bf16,da_int8+im2col,da_int8+bf16conv,da_int8}" \
    --out "$OUT_DIR/int8-step-gpu.json" 2>&1 | tee "$OUT_DIR/int8-step-gpu.log"
fi

# Issue 5's one-GPU targets: build 1M vectors <= 10 s; search >= 10x exact brute force.
if [ "${ANN_N:-1000000}" != "0" ]; then
  echo "=== binary graph index on the GPU ==="
  # ANN_ARGS: more of ann_gpu.py's options, e.g. "--add 0 --batch-sizes 10000 --scans 128".
  timeout "${ANN_TIMEOUT:-200}" "$PY" benchmarks/ann_gpu.py --n "${ANN_N:-1000000}" \
    ${ANN_ARGS:-} --out "$OUT_DIR/ann-gpu.json" 2>&1 | tee "$OUT_DIR/ann-gpu.log"
fi
# The kernel table once more, last (the stages after the benchmark print their own).
echo "=== kernel table (benchmarks/kernels.py, above) ==="
sed -n '/^op  /,/ wrote /p' "$OUT_DIR/kernels-gpu.log"
echo "mosaic tests rc=$mosaic_rc, tests rc=$test_rc, bench rc=$bench_rc, total $(( $(date +%s) - start ))s"
exit $(( mosaic_rc != 0 || test_rc != 0 || bench_rc != 0 ))
