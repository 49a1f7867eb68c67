"""GradientReducer: data-parallel gradient averaging for any optimizer, without DDP.

Owns the public face of BucketReducer for users who keep their own optimizer:

    reducer = zeroshard.GradientReducer(model.parameters())        # mode="all_reduce"
    loss.backward(); reducer.wait(); opt.step(); opt.zero_grad()

"all_reduce": after wait(), every p.grad holds the mean over ranks (a view into one flat
buffer). "reduce_scatter": after wait(), `reducer.grad_shard` holds this rank's shard of the
averaged flat gradient (see `reducer.layouts` for where it sits) and p.grad stays None.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import torch.distributed as dist

from .sharding.bucket_reducer import BucketReducer
from .comm.communicator_factory import make_communicator
from .comm.simulated_communicator import simulated_if_asked
from .sharding.flat_group import FlatGroup
from .sharding.param_lists import reject_ddp_wrapped


class GradientReducer:
    def __init__(self, params, *, process_group: Optional[dist.ProcessGroup] = None,
                 bucket_mb: float = 25, mode: str = "all_reduce", overlap: bool = True) -> None:
        if mode not in ("all_reduce", "reduce_scatter"):
            raise ValueError(f"mode must be 'all_reduce' or 'reduce_scatter', got {mode!r}")
        if not (isinstance(bucket_mb, (int, float)) and bucket_mb > 0):
            raise ValueError(f"bucket_mb must be a positive number, got {bucket_mb!r}")
        if isinstance(params, torch.nn.parallel.DistributedDataParallel):
            raise ValueError("the model is wrapped in DistributedDataParallel, which already "
                             "reduces gradients; pass the bare module's parameters")
        if isinstance(params, torch.nn.Module):
            params = params.parameters()
        seen, trainable = set(), []
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a tensor")
            if id(p) in seen:
                raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is given twice")
            seen.add(id(p))
            if p.requires_grad:
                trainable.append(p)
        if not trainable:
            raise ValueError("no parameter requires grad: nothing to reduce")
        devices = {p.device for p in trainable}
        if len(devices) > 1:
            raise ValueError(f"parameters are on several devices {sorted(map(str, devices))}")
        device = devices.pop()
        reject_ddp_wrapped(trainable, {})
        self.mode = mode
        self.comm = simulated_if_asked(make_communicator(process_group, device), device)
        bucket_elems = max(1, int(bucket_mb * 2 ** 20) // 4)
        stage = 0 if mode == "all_reduce" else 2
        by_dtype = {}
        for p in trainable:
            by_dtype.setdefault(p.dtype, []).append(p)
        self.groups: List[FlatGroup] = [
            FlatGroup(ps, [f"param (shape {tuple(p.shape)})" for p in ps], 0,
                      rank=self.comm.rank, world_size=self.comm.world_size, stage=stage,
                      bucket_elems=bucket_elems, reduce_dtype=torch.float32)
            for ps in by_dtype.values()]
        self._reducer = BucketReducer(self.groups, self.comm, mode=mode, overlap=overlap)
        self._reducer.on_round_start = self._start_round

    def _start_round(self) -> None:
        # The previous round's results may still be in use as p.grad views; give them their own
        # storage and start this round's sums in fresh buffers.
        for g in self.groups:
            g.reduced_grads = torch.zeros_like(g.reduced_grads)
            g.has_reduced = False

    def wait(self) -> None:
        """Finishes the reductions of every backward since the last wait()."""
        self._reducer.wait()
        self._reducer.consume()
        if self.mode == "all_reduce":
            for g in self.groups:
                for p, (start, end) in zip(g.params, g.param_ranges):
                    p.grad = g.reduced_grads[start:end].view_as(p).to(p.dtype)

    finish = wait

    @property
    def grad_shard(self) -> List[torch.Tensor]:
        """reduce_scatter mode: this rank's averaged gradient shard, one per dtype group."""
        return [g.reduced_grads for g in self.groups]

    @property
    def layouts(self):
        return [g.layout for g in self.groups]

    @contextlib.contextmanager
    def no_sync(self):
        with self._reducer.no_sync():
            yield

    def comm_stats(self):
        return self.comm.stats.as_dict()

    def reset_comm_stats(self) -> None:
        self.comm.stats = type(self.comm.stats)()

    def remove(self) -> None:
        """Removes the autograd hooks (the parameters stay views of the flat buffers)."""
        self._reducer.remove_hooks()
