#!/usr/bin/env bash
# Creates a virtual environment (once), then builds and installs zeroshard into it.
# Usage: scripts/setup_env.sh            (CPU variant; ZEROSHARD_CUDA=AUTO|ON|OFF to choose)
#
# Two kinds of environment:
#  - pinned (default): .venv with torch pinned (ZEROSHARD_TORCH, default torch==2.13.0) and the
#    test tools. An unpinned torch pulls a multi-GB CUDA build on machines without one.
#  - host (ZEROSHARD_HOST_PYTHON=/path/to/python, set by scripts/main_job.sh where that Python
#    already has a CUDA torch): .venv-host, a venv that sees that Python's packages, so the
#    user's torch is used as it is and nothing it already has is downloaded (the GPU machine has
#    no network). Only what the build lacks is installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
host_py="${ZEROSHARD_HOST_PYTHON:-}"

if [ -n "$host_py" ]; then
  venv="${ZEROSHARD_VENV:-$root/.venv-host}"
  if [ ! -x "$venv/bin/python" ]; then
    # --without-pip: no ensurepip needed (nor a download); pip comes from the host's packages.
    "$host_py" -m venv --without-pip "$venv"
    # The host may itself be a venv, which --system-site-packages would not see: add its site
    # directories (and so their .pth files) after the venv's own, so zeroshard here wins.
    host_sites=$("$host_py" -c "import site, sys; print(repr([p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))]))")
    venv_site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "import site; list(map(site.addsitedir, $host_sites))" > "$venv_site/zeroshard_host_site.pth"
  fi
  py="$venv/bin/python"
  if ! "$py" -c "import torch, pybind11, scikit_build_core, pip" 2>/dev/null \
     || ! { command -v ninja >/dev/null || "$py" -c "import ninja" 2>/dev/null; }; then
    "$py" -m pip install -q pybind11 scikit-build-core ninja || {
      echo "setup_env.sh: $host_py lacks pybind11 / scikit-build-core / ninja and they could not be installed" >&2
      exit 1; }
  fi
else
  venv="${ZEROSHARD_VENV:-$root/.venv}"
  torch_spec="${ZEROSHARD_TORCH:-torch==2.13.0}"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  py="$venv/bin/python"
  # transformers and accelerate: the Hugging Face Trainer tests (tests/python/test_hf_trainer.py);
  # pinned because ZeroTrainer overrides Trainer hooks whose names and order change between releases.
  # pytorch-lightning: ZeroStrategy's tests (tests/python/test_lightning.py), pinned likewise.
  # matplotlib: python -m zeroshard.estimate --plot (tests/python/test_estimate.py).
  transformers_version=5.23.0
  accelerate_version=1.15.0
  lightning_version=2.6.6
  if ! "$py" -c "import torch, pybind11, scikit_build_core, pytest, pytest_timeout, numpy, safetensors
import transformers, accelerate, matplotlib, pytorch_lightning
assert transformers.__version__ == '$transformers_version'
assert accelerate.__version__ == '$accelerate_version'
assert pytorch_lightning.__version__ == '$lightning_version'" 2>/dev/null; then
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q "$torch_spec" numpy pybind11 scikit-build-core ninja pytest pytest-timeout \
      safetensors "transformers==$transformers_version" "accelerate==$accelerate_version" \
      "pytorch-lightning==$lightning_version" matplotlib
  fi
fi

variant="${ZEROSHARD_CUDA:-OFF}"
if [ "$variant" != OFF ] && command -v nvcc >/dev/null 2>&1; then
  # The CUDA variant compiles against the NCCL headers of the wheel matching nvcc's major.
  cuda_major=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  "$py" -c "import nvidia.nccl" 2>/dev/null || "$py" -m pip install -q "nvidia-nccl-cu$cuda_major"
fi
build_dir="build/wheel-$(echo "$variant" | tr 'A-Z' 'a-z')"
[ -z "$host_py" ] || build_dir="$build_dir-host"  # another Python: another CMake cache
ZEROSHARD_CUDA="$variant" "$py" -m pip install -q --no-build-isolation --no-deps \
  -Cbuild-dir="$build_dir" "$root"
"$py" -m zeroshard.env
