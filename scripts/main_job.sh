#!/usr/bin/env bash
# The main job: a small GPT trained data-parallel with ZeRO stage 2 under torchrun.
# CPU: 2 ranks over gloo. With GPUs (torch sees CUDA): one rank per GPU over NCCL.
# Extra arguments go to examples/train_gpt.py (e.g. --stage 1 --steps 200 --dtype bf16).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
ZEROSHARD_CUDA="${ZEROSHARD_CUDA:-AUTO}" bash scripts/setup_env.sh >/dev/null
py="${ZEROSHARD_VENV:-$root/.venv}/bin/python"
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 0 ]; then
  device=cuda; nproc=$gpus; model=small
else
  device=cpu; nproc=2; model=tiny
fi
exec "$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
  examples/train_gpt.py --device "$device" --model "$model" --stage 2 "$@"
