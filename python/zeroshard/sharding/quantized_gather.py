"""quantized_all_gather: ZeRO++'s qwZ. Each rank block-quantizes its slice (ops.quantize: int8,
one fp32 scale per block), the ranks all-gather the bytes and the scales, and every rank
dequantizes each rank's slice into the full buffer, in the buffer's dtype. About a quarter of an
fp32 gather's bytes (half of a bf16 one's), at the price of rounding each weight to 1/254 of its
block's largest magnitude; what the slice came from (the shard, the master) is never changed.

The bytes travel as 2-byte elements (each slice padded to 4 bytes), so every backend carries
them, NCCL included, with no arithmetic on them. Slices are quantized independently: blocks never
straddle two ranks' slices.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .. import ops
from ..comm.communicator import Communicator, Work


def _padded(n: int) -> int:
    return -(-n // 4) * 4


class _DequantizeAfter(Work):
    """The gather of (q, scales), then each rank's slice dequantized into the full buffer."""

    def __init__(self, work: Work, staged: list, world_size: int, bits: int, block: int) -> None:
        self._work, self._staged = work, staged
        self._world_size, self._bits, self._block = world_size, bits, block

    def wait(self) -> None:
        if self._work is None:
            return
        self._work.wait()
        for full, q_full, s_full, n, q_bytes, q_stride, blocks in self._staged:
            for r in range(self._world_size):
                ops.dequantize(q_full[r * q_stride:r * q_stride + q_bytes],
                               s_full[r * blocks:(r + 1) * blocks], n, bits=self._bits,
                               block=self._block, out=full[r * n:(r + 1) * n])
        self._work = self._staged = None

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()


def quantized_all_gather(comm: Communicator, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                         *, bits: int = 8, block: int = 2048) -> Work:
    """all_gather(full, part) for each pair, through block quantization (see the module note).
    Counted in comm.stats as the all_gathers of the bytes and scales it sends."""
    world = comm.world_size
    staged: List[tuple] = []
    comm_pairs = []
    for full, part in pairs:
        n = part.numel()
        q_bytes, blocks = ops.quantized_bytes(n, bits), ops.quantized_blocks(n, block)
        stride = _padded(q_bytes)
        q_part = torch.zeros(stride, dtype=torch.int8, device=part.device)
        s_part = torch.empty(blocks, dtype=torch.float32, device=part.device)
        ops.quantize(part.detach(), bits=bits, block=block, out=(q_part[:q_bytes], s_part))
        q_full = torch.empty(world * stride, dtype=torch.int8, device=part.device)
        s_full = torch.empty(world * blocks, dtype=torch.float32, device=part.device)
        comm_pairs += [(q_full.view(torch.float16), q_part.view(torch.float16)),
                       (s_full, s_part)]
        staged.append((full, q_full, s_full, n, q_bytes, stride, blocks))
    work = comm.all_gather_buckets(comm_pairs)
    return _DequantizeAfter(work, staged, world, bits, block)
