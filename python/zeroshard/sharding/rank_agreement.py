"""RankAgreement: what the ranks of an optimizer settle together at construction, so that they
train one model: rank 0's weights broadcast to every rank, and one small collective that fails at
once, naming the difference, when ranks were given different models or settings.

Its inputs are the communicator, the process group and the timeout; the optimizer says which
tensors to broadcast (`construction_tensors`) and which settings and parameters must agree.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from ..sharded_params import sharded_init
from ..comm.communicator import _TorchWork
from ..comm.rendezvous import rendezvous_for

# Ranks reach the optimizer's construction after loading data and models at their own pace, so
# its collectives wait at least this long even when timeout_s (meant for training-step
# collectives) is short; it still bounds a rank that never builds its optimizer.
CONSTRUCTION_TIMEOUT_S = 600.0
SETTINGS = ("stage", "bucket_mb", "reduce_dtype", "offload", "node_size", "shard_size",
            "quantize_weights", "quantize_grads", "secondary_shard")


def construction_tensors(flat_groups, partitioned_groups, param_groups, modules,
                         device: torch.device) -> List[torch.Tensor]:
    """What DDP makes equal at construction: the flat parameter buffers of `flat_groups`, and
    every other parameter and buffer of the param groups and the models (on `device`, not
    already in one of `partitioned_groups`, not sharded by sharded_init)."""
    seen = {id(p) for fg in partitioned_groups for p in fg.params}
    candidates = [p for g in param_groups for p in g["params"]]
    for m in modules:
        candidates += list(m.parameters()) + list(m.buffers())
    others = []
    for t in candidates:
        if id(t) not in seen and t.device == device and t.numel() > 0 and \
                not sharded_init.is_sharded(t):
            seen.add(id(t))
            others.append(t.data)
    return [fg.flat_param for fg in flat_groups] + others


class RankAgreement:
    def __init__(self, comm, process_group, timeout_s: float) -> None:
        self.comm = comm
        self.process_group = process_group
        self.timeout_s = max(timeout_s, CONSTRUCTION_TIMEOUT_S)

    def broadcast(self, tensors: Sequence[torch.Tensor]) -> None:
        """Every rank starts from rank 0's values of `tensors`, as DDP makes it at construction:
        scripts that seed each rank differently would otherwise train an average of mismatched
        models."""
        if self.comm.world_size == 1:
            return
        pg = self.process_group
        src = dist.get_global_rank(pg, 0) if pg is not None else 0
        works = []
        with torch.no_grad():
            for t in tensors:
                staged = t if t.is_contiguous() else t.contiguous()
                self.comm.stats.control_bytes += staged.numel() * staged.element_size()
                works.append((t, staged, _TorchWork(
                    dist.broadcast(staged, src=src, group=pg, async_op=True),
                    "broadcast of rank 0's parameters", self.comm.rank, self.timeout_s)))
            for t, staged, work in works:
                work.wait()
                if staged is not t:
                    t.copy_(staged)

    def check(self, settings: Dict[str, Any],
              params: List[Tuple[str, tuple, str, bool]]) -> None:
        """One small collective so that ranks with different models or settings fail at once,
        naming the difference, instead of hanging or corrupting a later collective. `settings`
        holds SETTINGS; `params` is (name, whole shape, dtype, requires_grad) per parameter."""
        if self.comm.world_size == 1:
            return
        mine = {**{k: settings[k] for k in SETTINGS}, "params": [tuple(p) for p in params]}
        # With the timeout: a rank that never builds its optimizer must not hang the others.
        everyone = rendezvous_for(self.process_group, self.timeout_s).all_gather_object(mine)
        ref = everyone[0]
        for r, other in enumerate(everyone):
            for key in SETTINGS:
                if other[key] != ref[key]:
                    raise ValueError(f"ranks disagree on {key}: rank 0 has {ref[key]!r}, "
                                     f"rank {r} has {other[key]!r}")
            if len(other["params"]) != len(ref["params"]):
                raise ValueError(f"ranks disagree on the parameter list: rank 0 has "
                                 f"{len(ref['params'])} parameters, rank {r} has "
                                 f"{len(other['params'])}")
            for i, (a, b) in enumerate(zip(ref["params"], other["params"])):
                if a[1:] != b[1:]:
                    raise ValueError(f"ranks disagree on parameter {i}: rank 0 has {a[0]} "
                                     f"shape {a[1]} {a[2]} requires_grad={a[3]}, rank {r} has "
                                     f"{b[0]} shape {b[1]} {b[2]} requires_grad={b[3]}")
