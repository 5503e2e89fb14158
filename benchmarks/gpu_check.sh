#!/usr/bin/env bash
# The checks that need an accelerator, in one run of under 10 minutes:
#
#   1. the tests of the XLA path (what GPUs and TPUs run) on the GPU:
#      the update against the float64 NumPy reference, chex variants,
#      stochastic rounding's statistics, one compile per training loop;
#   2. benchmarks/compile_time.py on the GPU: first call of a jitted train
#      step over 500 leaves x 2,000 and the step time of one 1e7 leaf, ours
#      (float32 and bfloat16 state) against optax.amsgrad, side by side;
#   3. the same for 8-bit state (leaves of 8,192, large enough for 8-bit
#      blocks), where the XLA path's step at 1e7 has its target: within
#      1.5x optax.amsgrad.
#
# It uses the Python that holds JAX with CUDA (no network needed: JAX, Optax,
# chex and pytest must be there already) and the package from this checkout,
# without building the CPU kernel, which GPUs never run.
#
# Run from the repository root:
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]
#
# OUTPUT_DIR (default benchmarks/results/gpu) receives tests.log,
# compile_time_gpu.json (which benchmarks/render.py renders) and
# compile_time_int8_gpu.json.
set -uo pipefail

out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

"$python" - <<'EOF' || exit 1
import jax
import optax_amsgrad
print("devices:", jax.devices(), "jax", jax.__version__)
if jax.default_backend() == "cpu":
  raise SystemExit("no accelerator: JAX's default backend is the CPU")
print("CPU kernel in use:", optax_amsgrad.cpu.in_use())
EOF

# Tests of the XLA path. Those that need the CPU kernel, PyTorch or Keras skip
# themselves where these are missing. Four test processes share the GPU, so
# none may take most of its memory up front, as JAX does by default.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 180 "$python" -m pytest -q -p no:cacheprovider -n 4 \
  tests/test_transform.py tests/test_variants.py tests/test_rounding.py \
  "tests/test_optax_citizen.py::test_a_jitted_training_loop_compiles_once" \
  2>&1 | tee "$out/tests.log" || status=1
# The 8-bit state's tests of the XLA path (its CPU kernel cases deselected).
timeout 90 "$python" -m pytest -q -p no:cacheprovider -n 4 tests/test_int8_state.py \
  -k "not cpu" 2>&1 | tee -a "$out/tests.log" || status=1

# Benchmarks: one process per first-call variant, the step time interleaved;
# JAX's own memory setting again.
unset XLA_PYTHON_CLIENT_PREALLOCATE
timeout 150 "$python" benchmarks/compile_time.py --repeats 1 \
  --out "$out/compile_time_gpu.json" || status=1
timeout 150 "$python" benchmarks/compile_time.py --repeats 1 \
  --solvers optax.amsgrad,ours_int8 --leaf-size 8192 --calls update,apply_step \
  --state-bytes --out "$out/compile_time_int8_gpu.json" || status=1

exit $status
