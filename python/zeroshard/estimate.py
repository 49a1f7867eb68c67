"""The memory estimator: the bytes a ZeRO optimizer will hold per rank, before anything exists.

Owns: the per-rank byte counts of model states and communication buffers, computed from the same
core Layout that FlatGroup builds and the same ring plan BufferRing follows; ZeRO's closed-form
formulas; the command line (`python -m zeroshard.estimate --help`). Must not know model
architectures (model_shapes.py) nor allocate a model-sized tensor.

[Note: what the estimate covers] One FlatGroup (one param group, one parameter dtype), one
backward per step (no `no_sync()` accumulation, which adds a full-size gradient buffer at stages
0 and 2), and the optimizer's model states and gradient communication buffers. Activations,
temporaries of the forward/backward, the allocator's caching and CUDA/NCCL context memory are
not counted. offload="cpu" is the design of issue 11 (not built yet): master weights and
optimizer state move to host memory; the numbers for it are that design's prediction.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Dict, List, Optional, Sequence, Union

import torch

from . import _core
from .buffer_ring import planned_ring_bytes
from .flat_group import ALIGN_BYTES

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp32 state tensors the optimizer keeps per shard element (optimizers.py's _init_state).
STATE_TENSORS = {"adamw": 2, "adam": 2, "adamw-amsgrad": 3, "adam-amsgrad": 3,
                 "sgd": 1,                 # momentum buffer (momentum > 0)
                 "sgd-no-momentum": 0}
STAGES = (0, 1, 2)
MODEL_STATE_KEYS = ("model_params", "grads", "master_params", "optimizer_state")
REPORT_KEYS = MODEL_STATE_KEYS + ("comm_buffers",)

DtypeLike = Union[str, torch.dtype]


def _dtype(value: DtypeLike, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in DTYPE_NAMES.values():
        return value
    if isinstance(value, str) and value.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[value.lower()]
    raise ValueError(f"{what} must be one of {', '.join(DTYPE_NAMES)} (or the torch dtype), "
                     f"got {value!r}")


def _elem_size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _check_common(world_size, stage, optimizer) -> None:
    if stage == 3:
        raise ValueError("stage 3 is not built yet (parameter partitioning); estimate stage "
                         "0, 1 or 2")
    if stage not in STAGES:
        raise ValueError(f"stage must be 0, 1 or 2, got {stage!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if optimizer not in STATE_TENSORS:
        raise ValueError(f"optimizer must be one of {', '.join(STATE_TENSORS)}, got {optimizer!r}")


def bucket_elems(bucket_mb: float, reduce_dtype: DtypeLike = "fp32") -> int:
    """Elements per bucket, as ZeroOptimizer computes it from bucket_mb."""
    if not (isinstance(bucket_mb, (int, float)) and bucket_mb > 0):
        raise ValueError(f"bucket_mb must be a positive number, got {bucket_mb!r}")
    elem = _elem_size(_dtype(reduce_dtype, "reduce_dtype"))
    return max(1, int(bucket_mb * 2 ** 20) // elem)


def build_layout(param_numels: Sequence[int], *, world_size: int, dtype: DtypeLike = "fp32",
                 reduce_dtype: DtypeLike = "fp32", bucket_mb: float = 25.0) -> "_core.Layout":
    """The core Layout FlatGroup builds for these parameters: 128-byte aligned starts,
    buckets of bucket_mb in the reduce dtype, padded to world_size shards."""
    numels = list(param_numels)
    if not numels:
        raise ValueError("param_numels is empty: a model needs at least one parameter")
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in numels):
        bad = next(n for n in numels if not isinstance(n, int) or isinstance(n, bool) or n < 0)
        raise ValueError(f"param_numels must be non-negative integers, got {bad!r}")
    align_elems = max(1, ALIGN_BYTES // _elem_size(_dtype(dtype, "dtype")))
    return _core.Layout(numels, world_size, align_elems, bucket_elems(bucket_mb, reduce_dtype))


def estimate_model_states(param_numels: Sequence[int], *, world_size: int, stage: int,
                          dtype: DtypeLike = "fp32", reduce_dtype: DtypeLike = "fp32",
                          bucket_mb: float = 25.0, offload: Optional[str] = None,
                          max_in_flight: int = 2, backend: str = "gloo",
                          optimizer: str = "adamw") -> Dict[str, int]:
    """Bytes per rank, keyed like ZeroOptimizer.memory_report(): model_params, grads,
    master_params, optimizer_state, comm_buffers, total (their sum), plus host_bytes.

    offload="cpu" (issue 11's design, not built yet) moves master_params and optimizer_state to
    host memory: those keys keep their values, host_bytes is their sum and `total` counts device
    bytes only. Without offload host_bytes is 0. See [Note: what the estimate covers]."""
    _check_common(world_size, stage, optimizer)
    if offload not in (None, "none", "cpu"):
        raise ValueError(f"offload must be None, 'none' or 'cpu', got {offload!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
    param_dtype = _dtype(dtype, "dtype")
    grad_elem = _elem_size(_dtype(reduce_dtype, "reduce_dtype"))
    layout = build_layout(param_numels, world_size=world_size, dtype=param_dtype,
                          reduce_dtype=reduce_dtype, bucket_mb=bucket_mb)
    buffer, shard = layout.buffer_numel, layout.shard_numel
    # FlatGroup: stage 0 reduces into a full-size buffer; stage 1 accumulates a full-size local
    # buffer and reduces into its shard; stage 2 keeps only the shard.
    grad_numel = {0: buffer, 1: buffer + shard, 2: shard}[stage]
    state_numel = buffer if stage == 0 else shard  # stage 0's "shard" is the whole buffer
    report = {
        "model_params": buffer * _elem_size(param_dtype),
        "grads": grad_numel * grad_elem,
        # fp32 master shard only for low-precision params; fp32 params are their own master
        "master_params": 0 if param_dtype == torch.float32 else state_numel * 4,
        "optimizer_state": state_numel * 4 * STATE_TENSORS[optimizer],
        "comm_buffers": planned_ring_bytes(
            [b.end - b.start for b in layout.bucket_ranges], stage=stage, world_size=world_size,
            elem_size=grad_elem, max_in_flight=max_in_flight, gloo=(backend == "gloo")),
    }
    report["total"] = sum(report[k] for k in REPORT_KEYS)
    report["host_bytes"] = 0
    if offload == "cpu":
        report["host_bytes"] = report["master_params"] + report["optimizer_state"]
        report["total"] -= report["host_bytes"]
    return report


def _formula_terms(stage: int, dtype: DtypeLike, optimizer: str):
    """(replicated, partitioned) bytes per parameter: per rank = replicated*Ψ + partitioned*Ψ/N.
    As in the ZeRO paper, gradients are in the parameters' precision; the optimizer's K bytes
    are its fp32 state plus an fp32 master copy for low-precision parameters."""
    param = _elem_size(_dtype(dtype, "dtype"))
    grad = param
    k = 4 * STATE_TENSORS[optimizer] + (4 if param < 4 else 0)
    return {0: (param + grad + k, 0), 1: (param + grad, k), 2: (param, grad + k)}[stage]


def zero_formula_bytes(num_params: int, *, world_size: int, stage: int, dtype: DtypeLike = "fp32",
                       optimizer: str = "adamw") -> int:
    """ZeRO's closed form per rank for params + grads + master + optimizer state, without
    padding: mixed-precision Adam 16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N (stages 0/1/2); fp32 Adam 16Ψ,
    8Ψ+8Ψ/N, 4Ψ+12Ψ/N."""
    _check_common(world_size, stage, optimizer)
    if not isinstance(num_params, int) or num_params < 0:
        raise ValueError(f"num_params must be a non-negative integer, got {num_params!r}")
    replicated, partitioned = _formula_terms(stage, dtype, optimizer)
    return replicated * num_params + -(-partitioned * num_params // world_size)


def formula_text(stage: int, dtype: DtypeLike = "fp32", optimizer: str = "adamw") -> str:
    """The closed form as text, e.g. "4Ψ+12Ψ/N"."""
    _check_common(1, stage, optimizer)
    replicated, partitioned = _formula_terms(stage, dtype, optimizer)
    parts = ([f"{replicated}Ψ"] if replicated else []) + ([f"{partitioned}Ψ/N"] if partitioned
                                                         else [])
    return "+".join(parts) or "0"


def param_numels_of(module: torch.nn.Module) -> List[int]:
    """Element counts of a module's trainable parameters, each shared tensor once, in order."""
    return [p.numel() for p in module.parameters() if p.requires_grad]
