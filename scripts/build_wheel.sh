#!/usr/bin/env bash
# Builds one wheel per variant into dist/:
#   scripts/build_wheel.sh cpu    -> zeroshard-<ver>-*.whl       (no CUDA)
#   scripts/build_wheel.sh cu13   -> zeroshard_cu13-<ver>-*.whl  (nvcc 13.x, depends on nvidia-nccl-cu13)
#   scripts/build_wheel.sh cu12   -> zeroshard_cu12-<ver>-*.whl  (nvcc 12.x, depends on nvidia-nccl-cu12)
# The package imported is `zeroshard` in every case; only the distribution name differs, as with
# TransformerEngine's and RAPIDS' CUDA-suffixed wheels. Uses the Python in $PYTHON (default: .venv's,
# else python3), which needs scikit-build-core and pybind11 (and nvidia-nccl-cuXX for CUDA).
set -euo pipefail
variant="${1:-}"
case "$variant" in cpu|cu12|cu13) ;; *) echo "usage: $0 cpu|cu12|cu13" >&2; exit 2 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
[ -n "$py" ] || { [ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python" || py=python3; }
src="$(mktemp -d)/zeroshard"
mkdir -p "$src"
# Copy the source tree without build outputs or local environments.
tar -C "$root" --exclude=./build --exclude=./dist --exclude=./.venv --exclude=./.git \
    --exclude='*.so' --exclude=__pycache__ -cf - . | tar -C "$src" -xf -
if [ "$variant" = cpu ]; then
  export ZEROSHARD_CUDA=OFF
else
  major="${variant#cu}"
  have=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  if [ "$have" != "$major" ]; then
    echo "$variant needs nvcc $major.x on PATH; found '${have:-none}'" >&2; exit 2
  fi
  "$py" -m pip install -q "nvidia-nccl-cu$major"
  export ZEROSHARD_CUDA=ON
  # Distribution name and the NCCL wheel it needs at run time.
  sed -i "s/^name = \"zeroshard\"/name = \"zeroshard-$variant\"/" "$src/pyproject.toml"
  sed -i "s/^dependencies = \[\"torch>=2.4\"\]/dependencies = [\"torch>=2.4\", \"nvidia-nccl-cu$major\"]/" \
      "$src/pyproject.toml"
  grep -q "name = \"zeroshard-$variant\"" "$src/pyproject.toml" || { echo "could not rename the distribution" >&2; exit 1; }
fi
mkdir -p "$root/dist"
"$py" -m pip wheel -q --no-build-isolation --no-deps -Cbuild-dir="$src/build" -w "$root/dist" "$src"
ls -1 "$root/dist"
