"""rank_agreement: what the ranks of a ZeroOptimizer settle together at construction, so that
they train one model: rank 0's weights broadcast to every rank, and one small collective that
fails at once, naming the difference, when ranks were given different models or settings.
Functions of a ZeroOptimizer (flat_groups, param_groups, modules, comm, process_group, ...).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from . import sharded_init
from .communicator import _TorchWork
from .flat_group import FlatGroup
from .rendezvous import rendezvous_for

# Ranks reach the optimizer's construction after loading data and models at their own pace, so
# its collectives wait at least this long even when timeout_s (meant for training-step
# collectives) is short; it still bounds a rank that never builds its optimizer.
CONSTRUCTION_TIMEOUT_S = 600.0


def broadcast_from_rank0(opt, groups: Optional[List[FlatGroup]] = None,
                          flat: bool = True) -> None:
    """Every rank starts from rank 0's weights, as DDP makes it at construction: scripts
    that seed each rank differently would otherwise train an average of mismatched
    models. At construction this covers the flat parameters, the other (frozen)
    parameters and the buffers of the models found; add_param_group covers its groups."""
    if opt.world_size == 1:
        return
    if groups is None:
        groups = opt.flat_groups if flat else []
        flat_ids = {id(p) for fg in opt.flat_groups + opt.frozen_groups for p in fg.params}
        others, seen = [], set(flat_ids)
        candidates = [p for g in opt.param_groups for p in g["params"]]
        for m in opt.modules:
            candidates += list(m.parameters()) + list(m.buffers())
        for t in candidates:
            if id(t) not in seen and t.device == opt.device and t.numel() > 0 and \
                    not sharded_init.is_sharded(t):
                seen.add(id(t))
                others.append(t)
    else:
        others = []
    tensors = [fg.flat_param for fg in groups] + [t.data for t in others]
    src = dist.get_global_rank(opt.process_group, 0) if opt.process_group is not None else 0
    works = []
    with torch.no_grad():
        for t in tensors:
            staged = t if t.is_contiguous() else t.contiguous()
            opt.comm.stats.control_bytes += staged.numel() * staged.element_size()
            works.append((t, staged, _TorchWork(
                dist.broadcast(staged, src=src, group=opt.process_group, async_op=True),
                "broadcast of rank 0's parameters", opt.rank,
                max(opt.timeout_s, CONSTRUCTION_TIMEOUT_S))))
        for t, staged, work in works:
            work.wait()
            if staged is not t:
                t.copy_(staged)


def check_ranks_agree(opt, params) -> None:
    """One small collective so that ranks with different models or settings fail at once,
    naming the difference, instead of hanging or corrupting a later collective."""
    if opt.world_size == 1:
        return
    process_group = opt.process_group
    mine = {
        "stage": opt.stage, "bucket_mb": opt.bucket_mb, "reduce_dtype": str(opt.reduce_dtype),
        "offload": opt.offload is not None,
        "params": [(opt._names[id(p)], tuple(sharded_init.whole_shape(p)), str(p.dtype),
                    bool(p.requires_grad))
                   for p in params],
    }
    # With the timeout: a rank that never builds its optimizer must not hang the others.
    everyone = rendezvous_for(process_group, max(opt.timeout_s, CONSTRUCTION_TIMEOUT_S)
                              ).all_gather_object(mine)
    ref = everyone[0]
    for r, other in enumerate(everyone):
        for key in ("stage", "bucket_mb", "reduce_dtype", "offload"):
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
