"""memory_report: the bytes an optimizer holds per category, where they are (device or host with
offload), and what the process measures. Its inputs are what holds those bytes: the flat groups
and their state, the frozen groups and models, the communication buffers, the host offload and the
stage-3 units (None where absent), and the device.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from . import process_memory


def memory_report(flat_groups, shard_state, *, frozen_groups, modules, comm_buffer_bytes: int,
                  offload, units, device: torch.device) -> Dict[str, Any]:
    """Bytes this rank holds for the model, gradients, fp32 master, optimizer state and
    communication buffers (the ring buffers, allocated once; see [Note: bounded buffers]),
    their total, and under "measured" what the process really holds: peak and current RSS
    on CPU, torch's allocated/reserved counters on CUDA (see process_memory.py).

    With offload="cpu", "host" breaks down the bytes in host memory (master_params,
    optimizer_state, grads: the reduced shard, staging: the parameters on their way to
    the device and the landing buffers), host_bytes is their sum, and total counts the
    device's bytes only; the top-level categories stay each category's bytes wherever
    they are (as zeroshard.estimate reports them)."""
    report = {"model_params": 0, "grads": 0, "master_params": 0, "optimizer_state": 0}
    host = {"master_params": 0, "optimizer_state": 0, "grads": 0, "staging": 0}
    for fg, state in zip(flat_groups, shard_state):
        for key, value in fg.memory_bytes().items():
            if key == "host_grads":
                host["grads"] += value
            else:
                report[key] += value
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                bucket = "master_params" if key == "master" else "optimizer_state"
                report[bucket] += value.numel() * value.element_size()
    report["frozen_params"] = _frozen_bytes(frozen_groups, flat_groups, modules)
    report["comm_buffers"] = comm_buffer_bytes
    report["total"] = sum(report.values())
    if offload is not None:
        host["master_params"] = report["master_params"] + offload.nbytes()["master_params"]
        host["optimizer_state"] = report["optimizer_state"]
        host["staging"] = offload.nbytes()["staging"]
        report["total"] -= report["master_params"] + report["optimizer_state"]
        report["master_params"] = host["master_params"]
        report["grads"] += host["grads"]
        report["host"] = host
        report["host_bytes"] = sum(host.values())
    if units is not None:  # model_params: shards plus the units gathered right now
        report["units"] = {
            "count": len(units.units),
            "gathered": sum(u.gathered for u in units.units),
            "peak_gathered": units.peak_alive,
            "largest_unit_bytes": max(u.full_nbytes for u in units.units),
            # hpZ: the node-local copies kept from the forward to the step
            "secondary_bytes": units.secondary.nbytes if units.secondary is not None else 0}
    report["measured"] = process_memory.measured(device)
    return report


def _frozen_bytes(frozen_groups, flat_groups, modules) -> int:
    """Bytes of the model's parameters that train nothing: at stage 3 (partition_frozen) this
    rank's shards of them plus the units gathered now; otherwise whole on every rank."""
    total = sum(fg.memory_bytes()["model_params"] for fg in frozen_groups)
    partitioned = {id(p) for fg in frozen_groups + flat_groups for p in fg.params}
    seen = set()
    for m in modules:
        for p in m.parameters():
            if id(p) in partitioned or id(p) in seen or p.requires_grad:
                continue
            seen.add(id(p))
            shard = getattr(p, "_zs", None)  # sharded by sharded_init, not adopted
            total += (shard.local.numel() if shard is not None and type(p) is not
                      torch.nn.Parameter else p.numel()) * p.element_size()
    return total
