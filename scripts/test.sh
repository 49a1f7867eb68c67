#!/usr/bin/env bash
# Every test that runs without a GPU, as CI runs them (.ci/run calls this):
#  1. C++ tests (ctest) of the core, normal and with AddressSanitizer + UBSan;
#  2. the CPU variant installed into .venv, and the Python tests against it;
#  3. the CUDA variant compiled and linked with the machine's nvcc (when there is one), then
#     imported on this driverless machine and run on CPU tensors.
# GPU tests skip here; bench/gpu_check.sh runs them on a GPU machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
jobs="${ZEROSHARD_JOBS:-2}"
step() { printf '\n==== %s (%s)\n' "$1" "$(date +%T)"; }

step "python environment + CPU variant"
ZEROSHARD_CUDA=OFF bash scripts/setup_env.sh
py="${ZEROSHARD_VENV:-$root/.venv}/bin/python"
export PATH="$(dirname "$py"):$PATH"

step "C++ tests"
cmake -S . -B build/ctest -G Ninja -DZEROSHARD_CUDA=OFF -DZEROSHARD_BUILD_PYTHON=OFF \
  -DZEROSHARD_BUILD_TESTS=ON -DZEROSHARD_BUILD_BENCH=ON >/dev/null
ninja -C build/ctest -j"$jobs"
ctest --test-dir build/ctest --output-on-failure

step "C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer"
cmake -S . -B build/asan -G Ninja -DZEROSHARD_CUDA=OFF -DZEROSHARD_BUILD_PYTHON=OFF \
  -DZEROSHARD_BUILD_TESTS=ON -DZEROSHARD_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
ninja -C build/asan -j"$jobs"
ctest --test-dir build/asan --output-on-failure

step "Python tests (CPU variant)"
"$py" -m pytest -q tests/python

if command -v nvcc >/dev/null 2>&1; then
  step "CUDA variant: compile, link, import without a driver"
  "$py" -m pip install -q nvidia-nccl-cu13
  rm -rf build/cuda-wheel-out
  ZEROSHARD_CUDA=ON "$py" -m pip wheel -q --no-build-isolation --no-deps \
    -Cbuild-dir=build/wheel-cu -w build/cuda-wheel-out .
  rm -rf build/cuda-site
  "$py" -m pip install -q --no-deps --target build/cuda-site build/cuda-wheel-out/*.whl
  PYTHONPATH=build/cuda-site "$py" -m zeroshard.env
  PYTHONPATH=build/cuda-site "$py" -c "import zeroshard; assert zeroshard._core.build_info()['variant'].startswith('cu'), 'not the CUDA variant'"
  PYTHONPATH=build/cuda-site "$py" -m pytest -q -p no:cacheprovider tests/python/test_ops.py
else
  step "CUDA variant skipped: no nvcc on PATH"
fi
step "all tests passed"
