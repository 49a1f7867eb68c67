#!/usr/bin/env bash
# Creates .venv (once) with the pinned tools, then builds and installs zeroshard into it.
# Usage: scripts/setup_env.sh            (CPU variant; ZEROSHARD_CUDA=AUTO|ON|OFF to choose)
# torch is pinned: an unpinned torch pulls a multi-GB CUDA build on machines without one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${ZEROSHARD_VENV:-$root/.venv}"
torch_spec="${ZEROSHARD_TORCH:-torch==2.13.0}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
# transformers and accelerate: the Hugging Face Trainer tests (tests/python/test_hf_trainer.py);
# pinned because ZeroTrainer overrides Trainer hooks whose names and order change between releases.
transformers_version=5.23.0
accelerate_version=1.15.0
if ! "$py" -c "import torch, pybind11, scikit_build_core, pytest, pytest_timeout, numpy, safetensors
import transformers, accelerate
assert transformers.__version__ == '$transformers_version'
assert accelerate.__version__ == '$accelerate_version'" 2>/dev/null; then
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q "$torch_spec" numpy pybind11 scikit-build-core ninja pytest pytest-timeout \
    safetensors "transformers==$transformers_version" "accelerate==$accelerate_version"
fi
variant="${ZEROSHARD_CUDA:-OFF}"
if [ "$variant" != OFF ] && command -v nvcc >/dev/null 2>&1; then
  # The CUDA variant compiles against the NCCL headers of the wheel matching nvcc's major.
  cuda_major=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  "$py" -c "import nvidia.nccl" 2>/dev/null || "$py" -m pip install -q "nvidia-nccl-cu$cuda_major"
fi
build_dir="build/wheel-$(echo "$variant" | tr 'A-Z' 'a-z')"
ZEROSHARD_CUDA="$variant" "$py" -m pip install -q --no-build-isolation --no-deps \
  -Cbuild-dir="$build_dir" "$root"
"$py" -m zeroshard.env
