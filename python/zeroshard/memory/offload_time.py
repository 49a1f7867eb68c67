"""The offloaded step's time, predicted from the model's size, host memory bandwidth and the
device-host link (PCIe) bandwidth: what offload="cpu" adds to a step the device alone would take.

[Note: offloaded step time] Per rank, with a shard of S = Ψ/N parameters (Ψ the model's, N the
world size), one backward per step and offload's pipeline (host_offload.py, [Note: offload
pipeline]):
- landing: S gradients cross to the host in the landing dtype (bf16 for bf16 parameters, else the
  reduce dtype; `offload_grad_dtype`), overlapped with backward; only what outlasts backward (a
  share `backward_share` of the device step) adds to the step. A bf16 landing is upcast into the
  fp32 shard on the host (2 B read, 4 B written per parameter, also under backward).
- update: the CPU kernel streams its state once: the gradient read (reduce dtype, g bytes), the
  fp32 master and each fp32 moment read and written, and for bf16/fp16 parameters their new
  values written to a staging buffer (p bytes; fp32 parameters go up from the master): AdamW
  g + 8 + 16 (+ p) bytes a parameter, SGD with momentum g + 8 + 8 (+ p), at the host
  bandwidth; with clipping, one more read of the gradient for its norm.
- upload: S parameters in their dtype go back, piece by piece, each piece's copy overlapping the
  next piece's update: the slower of the two sets the pace, plus one piece's copy at the end.
Nothing else overlaps the update (the next forward waits for it), so the step is the device step
plus the exposed landing, the update and the upload tail. The byte counts are those the library
reports (comm_stats()["d2h"/"h2d"]); the bandwidths are the caller's (measure them: `python
bench/bench_host_update.py` prints the host's, `bench/bench_offload_time.py` both).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .estimate import STATE_TENSORS
from ..offload.host_offload import landing_dtype

# bytes a parameter of the fp32 master and optimizer state, each read and written once an update
STATE_BYTES = {name: 8 + 8 * tensors for name, tensors in STATE_TENSORS.items()}


def _size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def offloaded_step_time(num_params: int, *, world_size: int, host_bytes_per_s: float,
                        link_bytes_per_s: float, device_step_s: float = 0.0,
                        param_dtype: torch.dtype = torch.bfloat16,
                        reduce_dtype: torch.dtype = torch.float32,
                        offload_grad_dtype: Optional[torch.dtype] = None,
                        optimizer: str = "adamw", clip: bool = False, pieces: int = 64,
                        backward_share: float = 2 / 3) -> Dict[str, float]:
    """Seconds (and bytes) of one offloaded step per rank; see [Note: offloaded step time].
    `pieces`: the update's kernel runs (about buckets x units), whose last copy is not hidden."""
    if optimizer not in STATE_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(STATE_BYTES)}, got {optimizer!r}")
    if not (world_size >= 1 and num_params >= 0 and host_bytes_per_s > 0
            and link_bytes_per_s > 0 and device_step_s >= 0 and pieces >= 1):
        raise ValueError("num_params >= 0, world_size >= 1, pieces >= 1, positive bandwidths and "
                         "device_step_s >= 0 are needed")
    shard = -(-num_params // world_size)
    land = landing_dtype(param_dtype, reduce_dtype, offload_grad_dtype)
    p, g = _size(param_dtype), _size(reduce_dtype)
    d2h_bytes = shard * _size(land)
    upcast_bytes = shard * (_size(land) + g) if land != reduce_dtype else 0
    landing_s = d2h_bytes / link_bytes_per_s + upcast_bytes / host_bytes_per_s
    exposed_landing_s = max(0.0, landing_s - backward_share * device_step_s)
    staged = p if param_dtype != torch.float32 else 0
    update_bytes = shard * (g + STATE_BYTES[optimizer] + staged + (g if clip else 0))
    update_s = update_bytes / host_bytes_per_s
    h2d_bytes = shard * p
    upload_s = h2d_bytes / link_bytes_per_s
    paced_s = max(update_s, upload_s) + upload_s / pieces
    return {"d2h_bytes": d2h_bytes, "h2d_bytes": h2d_bytes, "host_update_bytes": update_bytes,
            "landing_s": landing_s, "exposed_landing_s": exposed_landing_s,
            "update_s": update_s, "upload_s": upload_s,
            "step_s": device_step_s + exposed_landing_s + paced_s,
            "added_s": exposed_landing_s + paced_s}
