"""GradientChecks: the questions a step asks of the reduced gradient shards of every rank, each
answered with one small control collective: the global norm (clip_grad_norm_), whether any rank
overflowed (fp16 loss scaling), and which parameters got a gradient on some rank (torch.optim
skips the others).

Its inputs are the flat groups (the optimizer's list, which add_param_group extends), the
communicator (and the one whose ranks must agree on the flags: every rank's, with hybrid
sharding), the device the collectives run on, the host offload (None without offload: then the
gradients are on the device) and whether every rank holds the whole gradient (stage 0).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import ops


class GradientChecks:
    def __init__(self, flat_groups: list, comm, device: torch.device, offload=None,
                 replicated: bool = False, flags_comm=None) -> None:
        self.flat_groups = flat_groups
        self.comm = comm
        # Which parameters got a gradient must agree on every rank, replicas of a hybrid shard
        # group included (their gradients and so norms agree already after the reduction).
        self.flags_comm = flags_comm if flags_comm is not None else comm
        self.device = device
        self.offload = offload
        self.replicated = replicated

    def pieces(self):
        """This rank's reduced gradient, piece by piece (every flat group, every bucket slice)."""
        for fg in self.flat_groups:
            for b0, b1, s0 in fg.shard_slices():
                if b1 > b0:
                    yield fg.shard_grads(b0, b1, s0)

    def _host_sums_of_squares(self):
        """Offload: (sum of squares as a 0-dim fp32 tensor, non-finite) of each piece of
        pieces(), in its order, mostly computed already while the gradients landed on the host
        (HostOffload.partials: the same kernel on the same slice)."""
        for fg in self.flat_groups:
            for b, (b0, b1, s0) in enumerate(fg.shard_slices()):
                if b1 > b0:
                    known = self.offload.partial(fg, b)
                    if known is None:
                        flag = torch.zeros(1, dtype=torch.int32)
                        known = (ops.l2_norm_sq(fg.shard_grads(b0, b1, s0), nonfinite=flag),
                                 bool(flag.item()))
                    yield known

    def _host_nonfinite(self) -> bool:
        return any(bad for _, bad in self._host_sums_of_squares())

    def global_norm(self, norm_type: float) -> float:
        """The norm of order norm_type of every rank's reduced gradients (still loss-scaled).
        Partial results stay where the gradients are (offload: summed on the host, then one copy
        to the device for the all-reduce); one host sync for the whole norm."""
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.offload is not None and norm_type == 2.0:
            on_host = torch.zeros(1, dtype=torch.float64)
            for sum_sq, _ in self._host_sums_of_squares():
                on_host += sum_sq.to(torch.float64)
            total.copy_(on_host)
        else:
            self._accumulate_norm(norm_type, total)
        if not self.replicated:
            op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
            self.comm.control_all_reduce(total, op)
        value = total.item()
        return value if math.isinf(norm_type) else value ** (1.0 / norm_type)

    def _accumulate_norm(self, norm_type: float, total: torch.Tensor) -> None:
        """Adds each piece's norm ** norm_type into total (the maximum for inf), on its device."""
        for g in self.pieces():
            if norm_type == 2.0:
                total += ops.l2_norm_sq(g).to(device=self.device, dtype=torch.float64)
            elif math.isinf(norm_type):
                torch.maximum(total, g.abs().max().double().to(self.device), out=total)
            else:
                total += (torch.linalg.vector_norm(g.double(), norm_type) ** norm_type
                          ).to(self.device)

    def overflowed(self) -> bool:
        """True when any rank's gradient shard holds inf/NaN (one small all-reduce)."""
        flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        if self.offload is not None:
            flag.fill_(int(self._host_nonfinite()))
        else:
            for g in self.pieces():
                ops.l2_norm_sq(g, nonfinite=flag)
        self.comm.control_all_reduce(flag, dist.ReduceOp.MAX)
        return flag.item() > 0

    def agree(self, got: List[List[bool]], check_overflow: bool
              ) -> Tuple[bool, List[List[bool]]]:
        """(overflow, updated): whether any rank's gradient shard holds inf/NaN (only looked at
        with check_overflow), and per flat group which parameters got a gradient on some rank
        (`got`: this rank's flags since the last step). One small control all-reduce (MAX) for
        both; none at world size 1."""
        if self.flags_comm.world_size == 1:
            overflow = check_overflow and self.overflowed()
            return overflow, [list(flags) for flags in got]
        sizes = [len(flags) for flags in got]
        host_bad = check_overflow and self.offload is not None and self._host_nonfinite()
        vector = torch.tensor([int(host_bad)] + [int(f) for flags in got for f in flags],
                              dtype=torch.int32)
        vector = vector.to(self.device)
        if check_overflow and self.offload is None:
            flag = vector[:1]
            for g in self.pieces():
                ops.l2_norm_sq(g, nonfinite=flag)
        self.flags_comm.control_all_reduce(vector, dist.ReduceOp.MAX)
        values = vector.tolist()
        updated, at = [], 1
        for n in sizes:
            updated.append([v > 0 for v in values[at:at + n]])
            at += n
        return values[0] > 0, updated


def clip_arguments(max_norm, norm_type) -> Tuple[float, float]:
    max_norm, norm_type = float(max_norm), float(norm_type)
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if not (norm_type > 0):
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
    return max_norm, norm_type


def clip_coefficient(norm: float, max_norm: float, norm_type: float,
                     error_if_nonfinite: bool) -> Optional[float]:
    """What the next step scales gradients by (at most 1, as torch.nn.utils.clip_grad_norm_),
    or None for a non-finite norm (an error here with error_if_nonfinite)."""
    if not math.isfinite(norm):
        if error_if_nonfinite:
            raise RuntimeError(
                f"the total norm of order {norm_type} of the gradients is {norm}, so they "
                "cannot be clipped; set error_if_nonfinite=False to leave it to step()")
        return None
    coef = max_norm / (norm + 1e-6)
    return coef if coef < 1.0 else 1.0
