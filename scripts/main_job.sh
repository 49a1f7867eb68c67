#!/usr/bin/env bash
# The main job: a small GPT trained data-parallel with ZeRO stage 2 under torchrun.
# CPU: 2 ranks over gloo. With GPUs (torch sees CUDA): one rank per GPU over NCCL.
# Extra arguments go to examples/train_gpt.py (e.g. --stage 1 --steps 200 --dtype bf16).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# The CUDA variant where there is a GPU to run it; the CPU variant otherwise (a CUDA compiler
# alone, as on the dev machines, is no reason to build CUDA code for the main job).
if [ -z "${ZEROSHARD_CUDA:-}" ]; then
  if nvidia-smi -L >/dev/null 2>&1; then ZEROSHARD_CUDA=AUTO; else ZEROSHARD_CUDA=OFF; fi
fi
# Where the Python running this script already has a CUDA build of torch (a GPU machine, often
# offline), use that torch: .venv-host sees its packages. Otherwise .venv with the pinned CPU torch.
# ZEROSHARD_TORCH (a pin) or ZEROSHARD_HOST_PYTHON (a Python) chooses explicitly.
host_py="${ZEROSHARD_HOST_PYTHON:-}"
if [ -z "$host_py" ] && [ -z "${ZEROSHARD_TORCH:-}" ] && command -v python3 >/dev/null \
   && python3 -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  host_py="$(python3 -c "import sys; print(sys.executable)")"
fi
if [ -n "$host_py" ]; then
  venv="${ZEROSHARD_VENV:-$root/.venv-host}"
  echo "main_job.sh: using the torch of $host_py (environment $venv)" >&2
else
  venv="${ZEROSHARD_VENV:-$root/.venv}"
fi
ZEROSHARD_HOST_PYTHON="$host_py" ZEROSHARD_VENV="$venv" ZEROSHARD_CUDA="$ZEROSHARD_CUDA" \
  bash scripts/setup_env.sh >/dev/null
py="$venv/bin/python"
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 0 ]; then
  device=cuda; nproc=$gpus; model=small
else
  device=cpu; nproc=2; model=tiny
fi
exec "$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
  examples/train_gpt.py --device "$device" --model "$model" --stage 2 "$@"
