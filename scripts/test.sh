#!/usr/bin/env bash
# Every test that runs without a GPU, as CI runs them (.ci/run calls this):
#  1. C++ tests (ctest) of the core, normal and with AddressSanitizer + UBSan;
#  2. the CPU variant installed into .venv, and the Python tests against it, then the stage 1-3,
#     offload, drop-in and HF Trainer suites again under ZEROSHARD_SIMULATE_ASYNC=1;
#  3. a plain `pip install .` into a fresh venv (build isolation on, no nvcc: the CPU variant);
#  4. the release wheels (scripts/build_wheel.sh cpu, cu13 where nvcc is) and `auditwheel show`
#     on each; the CUDA wheel installed into that venv, imported on this driverless machine and
#     run on CPU tensors.
# GPU tests skip here; bench/gpu_check.sh runs them on a GPU machine. `--quick`: the set-up, then
# only tests/python/quick.txt (a few tests of every module) for the edit-test loop.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
jobs="${ZEROSHARD_JOBS:-2}"
step() { printf '\n==== %s (%s)\n' "$1" "$(date +%T)"; }

step "python environment + CPU variant"
ZEROSHARD_CUDA=OFF bash scripts/setup_env.sh
py="${ZEROSHARD_VENV:-$root/.venv}/bin/python"
export PATH="$(dirname "$py"):$PATH"

if [ "${1:-}" = "--quick" ]; then
  # The edit-test loop: a few tests of every module (tests/python/quick.txt), a few minutes.
  step "Python tests, quick subset (tests/python/quick.txt)"
  mapfile -t quick < <(grep -v '^\s*#' tests/python/quick.txt | grep -v '^\s*$')
  "$py" -m pytest -q "${quick[@]}"
  step "quick subset passed (CI runs everything: scripts/test.sh)"
  exit 0
elif [ -n "${1:-}" ]; then
  echo "usage: scripts/test.sh [--quick]" >&2
  exit 2
fi

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

# The same suites with every side-stream collective and copy run late (see [Note: simulated
# asynchrony] in python/zeroshard/comm/simulated_async.py): a missing wait shows as a wrong result.
# A seed per run, printed, repeats its delays.
seed="${ZEROSHARD_SIMULATE_ASYNC_SEED:-$RANDOM}"
step "Python tests under simulated asynchrony (ZEROSHARD_SIMULATE_ASYNC_SEED=$seed)"
ZEROSHARD_SIMULATE_ASYNC=1 ZEROSHARD_SIMULATE_ASYNC_SEED="$seed" "$py" -m pytest -q \
  tests/python/test_zero_numerics.py tests/python/test_zero_stage3.py \
  tests/python/test_stage3_sharded_params.py tests/python/test_stage3_user_scripts.py \
  tests/python/test_zero_offload.py tests/python/test_dropin.py tests/python/test_hf_trainer.py \
  tests/python/test_hybrid_sharding.py tests/python/test_quantized_weights.py \
  tests/python/test_quantized_grads.py tests/python/test_secondary_shards.py \
  tests/python/test_stage1_overlap.py tests/python/test_zero_accumulation.py

# `pip install .` as a new user types it: a fresh venv that has torch, build isolation on, the
# build requirements from the package index. Here on a machine without nvcc (nvcc hidden from
# PATH), so the CPU variant; the CUDA path of the same backend is the cu13 wheel below.
step "plain pip install . (fresh venv, build isolation, no nvcc: CPU variant)"
plain_venv="$root/build/plain-venv"
rm -rf "$plain_venv" build/wheel-cp* dist
python3 -m venv "$plain_venv"
plain_py="$plain_venv/bin/python"
"$plain_py" -m pip install -q "torch==2.13.0" pytest pytest-timeout
no_nvcc_path=""
IFS=: read -ra path_dirs <<<"$PATH"
for dir in "${path_dirs[@]}"; do
  if [ -x "$dir/nvcc" ]; then  # the same folder without nvcc in it
    shadow="$root/build/no-nvcc/$(echo "$dir" | tr / _)"
    mkdir -p "$shadow"
    for tool in "$dir"/*; do [ "$(basename "$tool")" = nvcc ] || ln -sf "$tool" "$shadow/"; done
    dir="$shadow"
  fi
  no_nvcc_path="${no_nvcc_path:+$no_nvcc_path:}$dir"
done
PATH="$no_nvcc_path" bash -c '! command -v nvcc' >/dev/null
(cd "$root" && PATH="$no_nvcc_path" "$plain_py" -m pip install -q .)
(cd /tmp && "$plain_py" -m zeroshard.env && "$plain_py" -c "import zeroshard
assert zeroshard._core.build_info()['variant'] == 'cpu', zeroshard._core.build_info()")
"$plain_py" -m pytest -q -p no:cacheprovider tests/python/test_ops.py

# The main job where the Python at hand already has torch, offline as on the GPU machine: a venv
# over that Python's packages (here .venv's CPU torch stands in for a CUDA one), nothing fetched.
step "main job on the host Python's torch, offline (ZEROSHARD_HOST_PYTHON)"
rm -rf build/host-venv
PIP_NO_INDEX=1 ZEROSHARD_HOST_PYTHON="$py" ZEROSHARD_VENV="$root/build/host-venv" \
  bash scripts/main_job.sh --steps 2 --log-every 1
host_prefix="$("$py" -c "import sys; print(sys.prefix)")"
build/host-venv/bin/python -c "import os, torch, zeroshard
assert torch.__file__.startswith('$host_prefix'), torch.__file__
assert zeroshard.__file__.startswith('$root/build/host-venv'), zeroshard.__file__"

# The release wheels, repaired by auditwheel; `auditwheel show` must call each manylinux.
check_manylinux() {
  local wheel="$1" shown
  shown=$("$root/build/wheel-tools/bin/auditwheel" show "$wheel" 2>&1)
  case "$(basename "$wheel")" in *manylinux*) ;; *) echo "not a manylinux wheel: $wheel" >&2; return 1 ;; esac
  # auditwheel wraps its text at the terminal's width: join the lines before matching.
  echo "$shown" | tr -s ' \n' ' ' | grep -o "$(basename "$wheel") is consistent with the following platform tag: \"manylinux[^\"]*\"" \
    || { echo "$shown" >&2; return 1; }
}
step "CPU wheel: scripts/build_wheel.sh cpu + auditwheel"
bash scripts/build_wheel.sh cpu
check_manylinux dist/zeroshard-*.whl

if command -v nvcc >/dev/null 2>&1; then
  # Built as `pip install .` builds with nvcc (isolation on, nvidia-nccl-cu13 as a dynamic build
  # requirement), then installed into the fresh venv and run on this driverless machine.
  step "CUDA variant: scripts/build_wheel.sh cu13 (pip install . with nvcc) + auditwheel, import without a driver"
  bash scripts/build_wheel.sh cu13
  check_manylinux dist/zeroshard_cu13-*.whl
  "$plain_py" -m pip uninstall -q -y zeroshard
  "$plain_py" -m pip install -q dist/zeroshard_cu13-*.whl
  (cd /tmp && "$plain_py" -m zeroshard.env && "$plain_py" -c "import zeroshard
assert zeroshard._core.build_info()['variant'] == 'cu13', 'not the CUDA variant'")
  "$plain_py" -m pytest -q -p no:cacheprovider tests/python/test_ops.py
else
  step "CUDA variant skipped: no nvcc on PATH"
fi
step "all tests passed"
