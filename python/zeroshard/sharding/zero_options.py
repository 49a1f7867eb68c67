"""The checks on a ZeroOptimizer's keyword arguments, made before anything is built, each naming
what was wrong and what to pass instead. ZeroOptimizer.__init__'s signature is the list of
options; this file says which values and combinations are refused.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

# The loss scaler's keyword arguments, which ZeroOptimizer passes through (loss_scaler.py)
SCALER_KWARGS = ("initial_scale", "growth_interval", "hysteresis", "min_scale")


def check_options(*, stage: int, offload, offload_grad_dtype, module, units, prefetch,
                  reshard_after_forward, partition_frozen, bucket_mb, reduce_dtype, timeout_s,
                  topology, scaler_kwargs: Dict[str, Any]) -> None:
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    if offload not in (None, "none", "cpu"):
        raise ValueError(f"offload must be None, 'none' or 'cpu', got {offload!r}")
    if offload == "cpu" and stage == 0:
        raise ValueError("offload='cpu' partitions the optimizer state it moves to the host: "
                         "use stage=1, 2 or 3 (stage 0 replicates it on every rank)")
    if offload_grad_dtype is not None and offload != "cpu":
        raise ValueError("offload_grad_dtype= is the dtype gradients cross to the host in, "
                         "so it needs offload='cpu'")
    if offload_grad_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"offload_grad_dtype must be None (bf16 for bf16 parameters, else "
                         f"the reduce dtype), torch.float32 or torch.bfloat16, got "
                         f"{offload_grad_dtype!r}")
    if module is not None and not isinstance(module, torch.nn.Module):
        raise TypeError(f"module= must be the model (an nn.Module), got {type(module).__name__}")
    if stage != 3 and (units is not None or prefetch != 1 or not reshard_after_forward):
        raise ValueError("units=, prefetch= and reshard_after_forward= apply to stage 3 "
                         f"only (this optimizer has stage={stage})")
    if not isinstance(partition_frozen, bool):
        raise ValueError(f"partition_frozen must be True or False, got {partition_frozen!r}")
    if not (isinstance(prefetch, int) and prefetch >= 0):
        raise ValueError(f"prefetch must be a whole number of units >= 0, got {prefetch!r}")
    if bucket_mb is not None and not (isinstance(bucket_mb, (int, float)) and bucket_mb > 0):
        raise ValueError(f"bucket_mb must be a positive number or None (automatic: 25 MiB, "
                         f"at most an eighth of the gradients), got {bucket_mb!r}")
    if reduce_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"reduce_dtype must be None, float32, bfloat16 or float16, got {reduce_dtype}")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    topology.check(stage, reshard_after_forward)
    unknown = set(scaler_kwargs) - set(SCALER_KWARGS)
    if unknown:
        raise TypeError(
            f"unexpected keyword arguments {sorted(unknown)}; zeroshard's own are stage, "
            "process_group, bucket_mb, overlap, reduce_dtype, loss_scale, timeout_s, module, "
            "units, prefetch, reshard_after_forward, offload, offload_grad_dtype, "
            "partition_frozen, node_size, shard_size, quantize_weights, quantize_grads, "
            "secondary_shard and the "
            f"loss scaler's {', '.join(SCALER_KWARGS)}")


def model_of(params, module: Optional[torch.nn.Module], stage: int
             ) -> Optional[torch.nn.Module]:
    """The model the optimizer serves: module=, or params when it is the model itself; stage 3
    cannot work without one."""
    if isinstance(params, torch.nn.Module):
        if module is not None and module is not params:
            raise ValueError("module= names a different model than the one passed as params")
        module = params
    if stage == 3 and module is None:
        raise ValueError(
            "stage 3 gathers parameters module by module, so it needs the model: pass the "
            "module itself (ZeroAdamW(model, ..., stage=3)), or with param groups add "
            "module=model (ZeroAdamW(groups, ..., stage=3, module=model))")
    return module

