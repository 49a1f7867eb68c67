"""SecondaryShards: ZeRO++'s hpZ. After a unit's forward gather over every rank, each rank keeps
a second, node-local shard of the unit's full parameters (of each bucket, the 1/k part its local
rank stands for, k the node's ranks), copied from the gathered buffer: no extra traffic. The
unit's gathers in backward (and the recomputation of checkpointed activations) then all-gather
those parts among the node's ranks only, so backward's parameter traffic never crosses between
nodes. Optimizer state and masters stay partitioned over every rank; the price is the unit's
parameter bytes / k a rank, held from the forward to the step.

With quantize_weights, as in ZeRO++, the copy is of the forward's dequantized weights, and
backward computes at those. Dropped whenever gathered copies would be stale (the step, a load):
a unit without one gathers over every rank, as without hpZ.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..comm.communicator import Communicator


class SecondaryShards:
    def __init__(self, node_comm: Communicator) -> None:
        self.comm = node_comm
        self._parts: Dict[int, torch.Tensor] = {}  # id(FlatGroup) -> its node-local parts

    def _ranges(self, fg) -> List[Tuple[int, int, int]]:
        """(buffer start, buffer end, offset in the parts tensor) of this rank's part of each
        bucket: buckets hold a multiple of every rank's count, so of the node's too."""
        k, j = self.comm.world_size, self.comm.rank
        out, offset = [], 0
        for b_start, b_end in fg.bucket_ranges:
            n = (b_end - b_start) // k
            out.append((b_start + j * n, b_start + (j + 1) * n, offset))
            offset += n
        return out

    def keep(self, groups) -> None:
        """Copies this rank's node-local parts out of the gathered buffers of `groups`."""
        for fg in groups:
            ranges = self._ranges(fg)
            total = sum(e - s for s, e, _ in ranges)
            parts = self._parts.get(id(fg))
            if parts is None or parts.numel() != total:
                parts = torch.empty(total, dtype=fg.dtype, device=fg.device)
            for s, e, o in ranges:
                parts[o:o + (e - s)].copy_(fg.flat_param[s:e])
            self._parts[id(fg)] = parts

    def has(self, groups) -> bool:
        return all(id(fg) in self._parts for fg in groups)

    def gather_pairs(self, groups) -> list:
        """(full bucket, this rank's part) pairs for an all_gather among the node's ranks."""
        pairs = []
        for fg in groups:
            parts = self._parts[id(fg)]
            for (b_start, b_end), (s, e, o) in zip(fg.bucket_ranges, self._ranges(fg)):
                pairs.append((fg.flat_param[b_start:b_end], parts[o:o + (e - s)]))
        return pairs

    def drop(self) -> None:
        self._parts.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._parts.values())
