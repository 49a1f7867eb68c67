"""The memory estimator: the bytes a ZeRO optimizer will hold per rank, before anything exists.

Owns: the per-rank byte counts of model states and communication buffers, computed from the same
core Layout that FlatGroup builds and the same ring plan BufferRing follows; ZeRO's closed-form
formulas; the parsing and formatting of counts and sizes. Must not know model architectures
(model_shapes.py) nor allocate a model-sized tensor. The command line (`python -m
zeroshard.estimate --help`) is estimate_cli.py.

[Note: what the estimate covers] One param group of one parameter dtype (one FlatGroup; at
stage 3 one per unit), one backward per step (no `no_sync()` accumulation, which adds a
full-size gradient buffer at stages 0 and 2), and the optimizer's model states and gradient
communication buffers. Activations, temporaries of the forward/backward, the allocator's caching
and CUDA/NCCL context memory are not counted. With offload="cpu" (stages 1-3) the fp32 master
(for fp32 parameters too: the CPU kernel's copy), the optimizer state, the reduced gradient
shard and the staging of updated parameters (two buffers of the largest bucket's slice in the
parameters' dtype, low-precision only) are host memory; the device keeps the parameters, stage 1's full local gradient buffer and the
ring (whose slots, on gloo, then also receive each bucket's slice instead of summing into the
shard). Landing buffers (several reducing backwards per step) are not counted.

[Note: stage 3] Stage 3 builds one FlatGroup per unit (the children of every nn.ModuleList, unit
1, 2, ...; the root unit 0 holds every other parameter, tied ones included), each with its own
Layout (the optimizer's bucket size, computed from the whole model), and keeps only this rank's
shard of the parameters, so the estimator needs each parameter's unit (`units=`, from
`param_units_of(model)` or model_shapes' `*_units`). Between steps (what `total` and
memory_report() count) every key is a sum over the units' shards. Two more keys:
- `live_units`: during forward and backward units are gathered whole, at most the root unit
  plus 1 + `prefetch` non-root units at once (the running one and those prefetched; see
  param_units.py's [Note: unit lifecycle]). live_units is the full buffers (params' dtype,
  padded Layout) of the root and of the 1 + prefetch largest non-root units: an upper bound of
  the gathered parameters at any moment, not part of `total`.
- `peak_total` = total + live_units: the model-state peak of a training step. Still without
  activations, and without the transient full-size gradients autograd makes for one unit's
  parameters before the reduction's hooks copy them into buckets.
The communication buffers are one BufferRing shared by every unit's buckets, planned as stage
2's (planned_ring_bytes over all the units' buckets): BucketReducer sizes every slot for the
largest bucket of any unit, learns the launch order from rank 0's first backward (its [Note:
launch order]) and trims the ring to max_in_flight + 1 slots once it has.

[Note: frozen parameters] Parameters with requires_grad=False (a LoRA's base model, a frozen
embedding; `frozen_numels=`, from `frozen_numels_of(model)`) have no gradients, master or
optimizer state: they are the `frozen_params` key only, part of `total` (device memory, with
offload too). At stages 0-2, and at stage 3 with partition_frozen=False, every rank holds them
whole. At stage 3 with partition_frozen (the optimizer's default) they are partitioned like
the trainable parameters: one FlatGroup per unit (`frozen_units=`, from `frozen_units_of`),
with its own padded Layout, so `frozen_params` is this rank's shards (about their bytes / N),
and each unit's frozen buffer is gathered with the unit, so it is in that unit's `live_units`
bytes. They are of one dtype (`frozen_dtype`, default the trainable ones' `dtype`); the bucket
size is the trainable parameters' alone, as the optimizer's.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Union

import torch

from .. import _core
from ..sharding.buffer_ring import auto_bucket_mb, largest_unit_numel, planned_ring_bytes
from ..sharding.flat_group import ALIGN_BYTES, flat_layout
from .model_shapes import UNIFORM_TENSOR_NUMEL, uniform_numels, uniform_units, units_after

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp32 state tensors the optimizer keeps per shard element (optimizers.py's _init_state).
STATE_TENSORS = {"adamw": 2, "adam": 2, "adamw-amsgrad": 3, "adam-amsgrad": 3,
                 "sgd": 1,                 # momentum buffer (momentum > 0)
                 "sgd-no-momentum": 0}
STAGES = (0, 1, 2, 3)
MODEL_STATE_KEYS = ("model_params", "grads", "master_params", "optimizer_state")
REPORT_KEYS = MODEL_STATE_KEYS + ("frozen_params", "comm_buffers")

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
    if isinstance(stage, bool) or stage not in STAGES:
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if optimizer not in STATE_TENSORS:
        raise ValueError(f"optimizer must be one of {', '.join(STATE_TENSORS)}, got {optimizer!r}")


def bucket_elems(bucket_mb: Optional[float], reduce_dtype: DtypeLike, total_numel: int,
                 unit_numel: int = 0) -> int:
    """Elements per bucket, as ZeroOptimizer computes it from bucket_mb (None: automatic;
    stage 3 passes its largest unit's elements, see auto_bucket_mb)."""
    if bucket_mb is not None and not (isinstance(bucket_mb, (int, float)) and bucket_mb > 0):
        raise ValueError(f"bucket_mb must be a positive number or None (automatic), "
                         f"got {bucket_mb!r}")
    elem = _elem_size(_dtype(reduce_dtype, "reduce_dtype"))
    mb = (float(bucket_mb) if bucket_mb is not None
          else auto_bucket_mb(total_numel, elem, unit_numel))
    return max(1, int(mb * 2 ** 20) // elem)


def build_layout(param_numels: Sequence[int], *, world_size: int, dtype: DtypeLike = "fp32",
                 reduce_dtype: DtypeLike = "fp32",
                 bucket_mb: Optional[float] = None) -> "_core.Layout":
    """The core Layout FlatGroup builds for these parameters: 128-byte aligned starts,
    buckets of bucket_mb in the reduce dtype, padded to world_size shards."""
    numels = _checked_numels(param_numels)
    return _layout(numels, world_size, _dtype(dtype, "dtype"),
                   bucket_elems(bucket_mb, reduce_dtype, sum(numels)))


def _checked_numels(param_numels: Sequence[int], what: str = "param_numels",
                    empty_ok: bool = False) -> List[int]:
    numels = list(param_numels)
    if not numels and not empty_ok:
        raise ValueError(f"{what} is empty: a model needs at least one parameter")
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in numels):
        bad = next(n for n in numels if not isinstance(n, int) or isinstance(n, bool) or n < 0)
        raise ValueError(f"{what} must be non-negative integers, got {bad!r}")
    return numels


def _layout(numels: List[int], world_size: int, dtype: torch.dtype,
            bucket: int) -> "_core.Layout":
    align_elems = max(1, ALIGN_BYTES // _elem_size(dtype))
    return flat_layout(numels, world_size, align_elems, bucket)


def _unit_groups(numels: List[int], units: Optional[Sequence[int]],
                 names: tuple = ("units", "param_numels")) -> List[tuple]:
    """[(unit, [parameter indices in registration order])], root first then units in order:
    the FlatGroups _flatten_units builds for one param group of one dtype. `names` are the
    caller's argument names (units, numels), for the errors."""
    units_name, numels_name = names
    if units is None:
        if units_name == "frozen_units":
            raise ValueError(
                "stage 3 partitions frozen parameters by unit: pass frozen_units= parallel to "
                "frozen_numels (0 = the root unit), e.g. frozen_units=frozen_units_of(model), "
                "or partition_frozen=False to keep them whole on every rank")
        raise ValueError(
            "stage 3 needs each parameter's unit: pass units= parallel to param_numels "
            "(0 = the root unit, i = the i-th unit), e.g. units=param_units_of(model), or "
            "model_shapes' gpt2_units / llama_units / uniform_units")
    units = list(units)
    if len(units) != len(numels):
        raise ValueError(f"{units_name} has {len(units)} entries, {numels_name} {len(numels)}: "
                         "give one unit per parameter")
    if any(not isinstance(u, int) or isinstance(u, bool) or u < 0 for u in units):
        bad = next(u for u in units if not isinstance(u, int) or isinstance(u, bool) or u < 0)
        raise ValueError(f"{units_name} must be non-negative integers (0 = root), got {bad!r}")
    members: Dict[int, List[int]] = {}
    for i, u in enumerate(units):
        members.setdefault(u, []).append(i)
    return [(u, members[u]) for u in sorted(members)]


def estimate_model_states(param_numels: Sequence[int], *, world_size: int, stage: int,
                          dtype: DtypeLike = "fp32", reduce_dtype: DtypeLike = "fp32",
                          bucket_mb: Optional[float] = None, offload: Optional[str] = None,
                          max_in_flight: int = 2, backend: str = "gloo",
                          optimizer: str = "adamw", units: Optional[Sequence[int]] = None,
                          prefetch: int = 1, frozen_numels: Sequence[int] = (),
                          frozen_units: Optional[Sequence[int]] = None,
                          frozen_dtype: Optional[DtypeLike] = None,
                          partition_frozen: bool = True,
                          secondary_shard_ranks: Optional[int] = None) -> Dict[str, int]:
    """Bytes per rank, keyed like ZeroOptimizer.memory_report(): model_params, grads,
    master_params, optimizer_state, frozen_params, comm_buffers, total (their sum), plus
    host_bytes. param_numels are the trainable parameters' element counts (param_numels_of).

    frozen_numels are the element counts of the parameters with requires_grad=False
    (frozen_numels_of(model); none by default), of frozen_dtype (default: dtype); at stage 3
    with partition_frozen (the optimizer's default) they need frozen_units (frozen_units_of).
    frozen_params is their bytes on this rank: partitioned (about their bytes / world_size) at
    stage 3 with partition_frozen, whole otherwise. See [Note: frozen parameters].

    offload="cpu" moves master_params, optimizer_state and the reduced gradient shard to host
    memory (see [Note: what the estimate covers]): the keys keep their values wherever the
    bytes are, host_bytes is the host's sum and `total` counts device bytes only, as
    memory_report() does. Without offload host_bytes is 0. bucket_mb=None is ZeroOptimizer's
    automatic size (25 MiB, at most 1/32 of the gradients' bytes, a small model's up to 1/16
    below 4 MiB, at stage 3 at least the largest unit, at least 1/4 MiB; buffer_ring's
    auto_bucket_mb). See [Note: what the estimate covers].

    Stage 3 needs `units` (each parameter's unit, parallel to param_numels, 0 = root; see
    param_units_of) and takes the optimizer's `prefetch`; `total` is between steps, as
    memory_report() counts it, and two more keys give the training peak: live_units (the
    root and the 1 + prefetch largest other units, whole) and peak_total = total +
    live_units. With hpZ (secondary_shard="node"), secondary_shard_ranks is the node's rank
    count: secondary_params is the node-local copy of every non-root unit (its full buffers /
    that count), held from the forward to the step, so in peak_total and not in total.
    Hybrid sharding (shard_size=k) holds what plain ZeRO holds at world_size=k. See [Note:
    stage 3]."""
    _check_common(world_size, stage, optimizer)
    if offload not in (None, "none", "cpu"):
        raise ValueError(f"offload must be None, 'none' or 'cpu', got {offload!r}")
    if offload == "cpu" and stage == 0:
        raise ValueError("offload='cpu' needs stage 1, 2 or 3 (stage 0 replicates the state)")
    offloaded = offload == "cpu"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
    param_dtype = _dtype(dtype, "dtype")
    grad_elem = _elem_size(_dtype(reduce_dtype, "reduce_dtype"))
    if not isinstance(partition_frozen, bool):
        raise ValueError(f"partition_frozen must be True or False, got {partition_frozen!r}")
    frozen = _checked_numels(frozen_numels, "frozen_numels", empty_ok=True)
    frozen_elem = _elem_size(param_dtype if frozen_dtype is None
                             else _dtype(frozen_dtype, "frozen_dtype"))
    if stage == 3:
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
            raise ValueError(f"prefetch must be a whole number of units >= 0, got {prefetch!r}")
        # unit -> (shard, buffer) bytes of its frozen FlatGroup; none when kept whole
        frozen_groups = (_frozen_groups(frozen, frozen_units, world_size, frozen_elem,
                                        _stage3_bucket(param_numels, units, bucket_mb,
                                                       reduce_dtype))
                         if partition_frozen else {})
        report = _stage3_report(param_numels, units, world_size=world_size,
                                param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                bucket_mb=bucket_mb, max_in_flight=max_in_flight,
                                gloo=(backend == "gloo"), optimizer=optimizer, prefetch=prefetch,
                                offload=offloaded, frozen_full={
                                    u: full for u, (_, full) in frozen_groups.items()},
                                secondary_shard_ranks=secondary_shard_ranks)
        report["frozen_params"] = (sum(shard for shard, _ in frozen_groups.values())
                                   if partition_frozen else sum(frozen) * frozen_elem)
        return _finish(report)
    layout = build_layout(param_numels, world_size=world_size, dtype=param_dtype,
                          reduce_dtype=reduce_dtype, bucket_mb=bucket_mb)
    buffer, shard = layout.buffer_numel, layout.shard_numel
    # FlatGroup: stage 0 reduces into a full-size buffer; stage 1 accumulates a full-size local
    # buffer and reduces into its shard, which lives at that buffer's start; stage 2 keeps
    # only the shard.
    # (offload: stage 1's reduced shard is in host memory, apart from its local buffer)
    grad_numel = {0: buffer, 1: buffer + (shard if offloaded else 0), 2: shard}[stage]
    state_numel = buffer if stage == 0 else shard  # stage 0's "shard" is the whole buffer
    report = {
        "model_params": buffer * _elem_size(param_dtype),
        "grads": grad_numel * grad_elem,
        # fp32 master shard only for low-precision params; fp32 params are their own master
        "master_params": 0 if param_dtype == torch.float32 else state_numel * 4,
        "optimizer_state": state_numel * 4 * STATE_TENSORS[optimizer],
        "comm_buffers": planned_ring_bytes(
            [b.end - b.start for b in layout.bucket_ranges], stage=stage, world_size=world_size,
            elem_size=grad_elem, max_in_flight=max_in_flight, gloo=(backend == "gloo"),
            offload=offloaded),
        "frozen_params": sum(frozen) * frozen_elem,  # whole on every rank below stage 3
    }
    if offloaded:
        _offload(report, shard, param_dtype, grad_elem,
                 [b.end - b.start for b in layout.bucket_ranges], world_size)
    return _finish(report)


def _offload(report: Dict[str, int], shard: int, param_dtype: torch.dtype, grad_elem: int,
             bucket_numels: Sequence[int], world_size: int) -> None:
    """Moves the host's share of report (see [Note: what the estimate covers]) to
    report["host"]; the keys keep every byte wherever it is. Low-precision parameters go up
    through two staging buffers of the largest bucket's slice."""
    largest_slice = -(-max(bucket_numels, default=0) // world_size)
    staging = (0 if param_dtype == torch.float32
               else 2 * largest_slice * _elem_size(param_dtype))
    host = {"master_params": shard * 4, "optimizer_state": report["optimizer_state"],
            "grads": shard * grad_elem, "staging": staging}
    report["master_params"] = host["master_params"]
    report["host"] = host


def _finish(report: Dict[str, int]) -> Dict[str, int]:
    report["total"] = sum(report[k] for k in REPORT_KEYS)
    report["host_bytes"] = 0
    host = report.get("host")
    if host is not None:
        report["host_bytes"] = sum(host.values())
        report["total"] -= host["master_params"] + host["optimizer_state"] + host["grads"]
    if "live_units" in report:
        report["peak_total"] = (report["total"] + report["live_units"]
                                + report.get("secondary_params", 0))
    return report


def _frozen_groups(frozen: List[int], frozen_units: Optional[Sequence[int]], world_size: int,
                   elem: int, bucket: int) -> Dict[int, tuple]:
    """unit -> (this rank's shard bytes, full buffer bytes) of the unit's frozen FlatGroup, as
    the optimizer's _flatten_frozen builds it (with the trainable parameters' bucket size;
    empty tensors are left out, as it leaves them)."""
    if not any(frozen):
        return {}
    groups = _unit_groups(frozen, frozen_units, ("frozen_units", "frozen_numels"))
    layouts = {u: flat_layout([frozen[i] for i in members if frozen[i] > 0], world_size,
                              max(1, ALIGN_BYTES // elem), bucket)
               for u, members in groups}
    return {u: (layout.shard_numel * elem, layout.buffer_numel * elem)
            for u, layout in layouts.items()}


def _stage3_bucket(param_numels, units, bucket_mb, reduce_dtype) -> int:
    """Stage 3's bucket elements: from the whole model and its largest unit."""
    numels = _checked_numels(param_numels)
    _unit_groups(numels, units)  # checks units
    return bucket_elems(bucket_mb, reduce_dtype, sum(numels), largest_unit_numel(numels, units))


def _stage3_report(param_numels, units, *, world_size: int, param_dtype: torch.dtype,
                   reduce_dtype: DtypeLike, bucket_mb: Optional[float], max_in_flight: int,
                   gloo: bool, optimizer: str, prefetch: int, offload: bool = False,
                   frozen_full: Optional[Dict[int, int]] = None,
                   secondary_shard_ranks: Optional[int] = None) -> Dict[str, int]:
    numels = _checked_numels(param_numels)
    groups = _unit_groups(numels, units)
    bucket = _stage3_bucket(numels, units, bucket_mb, reduce_dtype)
    layouts = [_layout([numels[i] for i in members], world_size, param_dtype, bucket)
               for _, members in groups]
    shard = sum(layout.shard_numel for layout in layouts)
    param_elem = _elem_size(param_dtype)
    grad_elem = _elem_size(_dtype(reduce_dtype, "reduce_dtype"))
    full = {u: layout.buffer_numel * param_elem for (u, _), layout in zip(groups, layouts)}
    for u, frozen_bytes in (frozen_full or {}).items():  # gathered with its unit
        full[u] = full.get(u, 0) + frozen_bytes
    others = sorted((b for u, b in full.items() if u != 0), reverse=True)
    report = {
        "model_params": shard * param_elem,  # the full buffers are freed between steps
        "grads": shard * grad_elem,  # reduced like stage 2: the shard only
        "master_params": 0 if param_dtype == torch.float32 else shard * 4,
        "optimizer_state": shard * 4 * STATE_TENSORS[optimizer],
        "comm_buffers": planned_ring_bytes(
            [b.end - b.start for layout in layouts for b in layout.bucket_ranges], stage=2,
            world_size=world_size, elem_size=grad_elem, max_in_flight=max_in_flight, gloo=gloo,
            offload=offload),
        "live_units": full.get(0, 0) + sum(others[:1 + prefetch]),
    }
    if secondary_shard_ranks:  # hpZ: every non-root unit's node-local part
        report["secondary_params"] = sum(others) // secondary_shard_ranks
    if offload:
        _offload(report, shard, param_dtype, grad_elem,
                 [b.end - b.start for layout in layouts for b in layout.bucket_ranges],
                 world_size)
    return report


def _formula_terms(stage: int, dtype: DtypeLike, optimizer: str):
    """(replicated, partitioned) bytes per parameter: per rank = replicated*Ψ + partitioned*Ψ/N.
    As in the ZeRO paper, gradients are in the parameters' precision; the optimizer's K bytes
    are its fp32 state plus an fp32 master copy for low-precision parameters."""
    param = _elem_size(_dtype(dtype, "dtype"))
    grad = param
    k = 4 * STATE_TENSORS[optimizer] + (4 if param < 4 else 0)
    return {0: (param + grad + k, 0), 1: (param + grad, k), 2: (param, grad + k),
            3: (0, param + grad + k)}[stage]


def zero_formula_bytes(num_params: int, *, world_size: int, stage: int, dtype: DtypeLike = "fp32",
                       optimizer: str = "adamw") -> int:
    """ZeRO's closed form per rank for params + grads + master + optimizer state, without
    padding: mixed-precision Adam 16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N, 16Ψ/N (stages 0/1/2/3); fp32 Adam
    16Ψ, 8Ψ+8Ψ/N, 4Ψ+12Ψ/N, 16Ψ/N. Stage 3's is between steps, as the paper counts it: the
    units gathered during forward and backward are not in it (estimate_model_states'
    live_units)."""
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


def frozen_numels_of(module: torch.nn.Module) -> List[int]:
    """Element counts of a module's frozen parameters (requires_grad=False), each shared
    tensor once, in order: estimate_model_states' frozen_numels."""
    return [p.numel() for p in module.parameters() if not p.requires_grad]


def param_units_of(module: torch.nn.Module, units=None) -> List[int]:
    """The stage-3 unit of each of param_numels_of(module)'s parameters, as ZeroOptimizer(module,
    stage=3, units=units) splits them (0 = the root unit; param_units.find_units and
    owning_units)."""
    return _units_of(module, units, trainable=True)


def frozen_units_of(module: torch.nn.Module, units=None) -> List[int]:
    """The stage-3 unit of each of frozen_numels_of(module)'s parameters, the units they are
    partitioned and gathered with (as param_units_of)."""
    return _units_of(module, units, trainable=False)


def _units_of(module: torch.nn.Module, units, trainable: bool) -> List[int]:
    from ..sharding.param_units import find_units, owning_units
    found = find_units(module, units)
    owner = owning_units(module, [m for _, m in found])
    return [owner[id(p)] for p in module.parameters() if p.requires_grad == trainable]


# ---- what fits ------------------------------------------------------------------------------

def _device_peak(report: Dict[str, int]) -> int:
    """The device bytes that must fit: peak_total at stage 3, total otherwise."""
    return report.get("peak_total", report["total"])


def largest_fitting_params(device_bytes: int, *, world_size: int, stage: int,
                           **settings) -> int:
    """The largest parameter count, split as model_shapes.uniform_numels does, whose `total`
    (device bytes of model states and comm buffers) is at most device_bytes; 0 if none fits.
    At stage 3 its `peak_total` must fit, with model_shapes.uniform_units' assumption (each
    tensor its own unit). `settings` are estimate_model_states' keywords; frozen_numels there
    are frozen parameters beside the trainable ones, at stage 3 (without frozen_units) each a
    unit of its own after theirs (model_shapes.units_after)."""
    frozen_count = len(settings.get("frozen_numels", ()))

    def peak(num_params: int) -> int:
        extra = dict(units=uniform_units(num_params)) if stage == 3 else {}
        if stage == 3 and "frozen_units" not in settings:
            extra["frozen_units"] = units_after(extra["units"], frozen_count)
        report = estimate_model_states(uniform_numels(num_params), world_size=world_size,
                                       stage=stage, **settings, **extra)
        return _device_peak(report)

    smallest = peak(1) if device_bytes >= 1 else 0
    if device_bytes < 1 or smallest > device_bytes:
        return 0
    # Every parameter costs at least its own 2 bytes on the device (stage 3: its 2/N-byte shard),
    # so device_bytes (stage 3: device_bytes * N) parameters never fit.
    lo, hi = 1, max(2, device_bytes * (world_size if stage == 3 else 1))
    # The bytes are nearly affine in the count: two secant steps from a probe land close to
    # the answer, and a bracket grown from there leaves a short bisection. The bisection alone
    # decides the result.
    probe = min(hi - 1, 16 * UNIFORM_TENSOR_NUMEL)
    points = [(probe, peak(probe))]
    for _ in range(2):
        n0, b0 = points[-1]
        n1, b1 = points[-2] if len(points) > 1 else (1, smallest)
        if n0 == n1 or b0 == b1:
            break
        guess = int(n0 + (device_bytes - b0) * (n0 - n1) / (b0 - b1))
        guess = max(lo, min(hi - 1, guess))
        points.append((guess, peak(guess)))
    for n, b in points:
        if b <= device_bytes:
            lo = max(lo, n)
        else:
            hi = min(hi, n)
    guess, fits_guess = points[-1][0], points[-1][1] <= device_bytes
    step = 1024  # gallop away from the guess until the answer is bracketed
    while hi - lo > 1:
        n = guess + step if fits_guess else guess - step
        if not lo < n < hi:
            break
        if peak(n) <= device_bytes:
            lo = n
            if not fits_guess:
                break
        else:
            hi = n
            if fits_guess:
                break
        step *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid) <= device_bytes else (lo, mid)
    return lo


# ---- command line ---------------------------------------------------------------------------

_MEMORY_UNITS = {"b": 1, "kb": 10 ** 3, "kib": 2 ** 10, "mb": 10 ** 6, "mib": 2 ** 20,
                 "gb": 10 ** 9, "gib": 2 ** 30, "tb": 10 ** 12, "tib": 2 ** 40}
_COUNT_SUFFIXES = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9, "t": 10 ** 12}
_NUMBER = r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)"


def parse_memory(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), also B/KB/KiB/MB/MiB/TB/TiB -> bytes."""
    match = re.fullmatch(_NUMBER + r"\s*([a-z]+)", text.strip().lower())
    if not match or match.group(2) not in _MEMORY_UNITS:
        raise ValueError(f"cannot read {text!r} as an amount of memory: write a number and a "
                         "unit, e.g. 80GB, 80GiB, 512MiB, 1.5TB")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2)])


def parse_count(text: str) -> int:
    """'1.5e9', '1500000000', '1.5B', '125M', '7b' -> an integer count of parameters."""
    # a sign is read so that "-5" is refused as negative, not as unreadable
    match = re.fullmatch("([+-]?)" + _NUMBER + r"\s*([kmbt]?)",
                         text.strip().lower().replace("_", ""))
    if not match:
        raise ValueError(f"cannot read {text!r} as a parameter count: write e.g. 1.5e9, "
                         "1500000000, 1.5B or 125M")
    count = round(float(match.group(1) + match.group(2)) * _COUNT_SUFFIXES[match.group(3)])
    if count < 1:
        raise ValueError(f"the parameter count must be at least 1, got {text!r}")
    return count


def format_bytes(n: int) -> str:
    if n == 0:
        return "0"
    if n >= 2 ** 30:
        return f"{n / 2 ** 30:.2f} GiB"
    return f"{n / 2 ** 20:.1f} MiB"


def format_count(n: int) -> str:
    for suffix, scale in (("T", 10 ** 12), ("B", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)
