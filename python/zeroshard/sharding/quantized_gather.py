"""quantized_all_gather: ZeRO++'s qwZ. Each rank block-quantizes its slice of every bucket
(ops.quantize: int8, one fp32 scale per block), the ranks all-gather the bytes and scales of all
the buckets in one collective, and every rank dequantizes each rank's slices into the full
buffers, in the buffers' dtype. About a quarter of an fp32 gather's bytes (half of a bf16 one's),
at the price of rounding each weight to 1/254 of its block's largest magnitude; what the slices
came from (the shards, the masters) is never changed.

A rank's message is, bucket after bucket, the slice's bytes (padded to 4) then its scales; it
travels as 2-byte elements, so every backend carries it, NCCL included, with no arithmetic on it.
Slices are quantized independently: blocks never straddle two ranks' slices.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .. import ops
from ..comm.communicator import Communicator, Work


QUANT_BLOCK = 2048  # elements a scale covers, unless a caller says otherwise


def message_piece(n: int, bits: int, block: int = QUANT_BLOCK) -> Tuple[int, int, int]:
    """(q bytes, q bytes padded to 4, scales) of n quantized values in a message: the bytes,
    padded so the fp32 scales after them stay aligned, then one scale a block. The layout
    of qwZ's messages and of qgZ's rows (quantized_reduce.py), and of comm_model's bytes."""
    q_bytes = ops.quantized_bytes(n, bits)
    return q_bytes, -(-q_bytes // 4) * 4, ops.quantized_blocks(n, block)


class _Layout:
    """Where each bucket's bytes and scales sit in one rank's message."""

    def __init__(self, numels: Sequence[int], bits: int, block: int) -> None:
        self.entries = []  # (numel, q_offset, q_bytes, scales_offset, blocks)
        offset = 0
        for n in numels:
            q_bytes, q_stride, blocks = message_piece(n, bits, block)
            self.entries.append((n, offset, q_bytes, offset + q_stride, blocks))
            offset += q_stride + 4 * blocks
        self.nbytes = offset

    @staticmethod
    def views(message: torch.Tensor, entry) -> Tuple[torch.Tensor, torch.Tensor]:
        n, q_offset, q_bytes, s_offset, blocks = entry
        return (message[q_offset:q_offset + q_bytes],
                message[s_offset:s_offset + 4 * blocks].view(torch.float32))


class _DequantizeAfter(Work):
    """The gather of every rank's message, then each rank's slices dequantized into the full
    buffers."""

    def __init__(self, work: Work, fulls: List[torch.Tensor], layout: _Layout,
                 gathered: torch.Tensor, sent: torch.Tensor, world_size: int, bits: int,
                 block: int, comm: Communicator, parts: List[torch.Tensor]) -> None:
        self._comm, self._parts = comm, parts
        self._work, self._fulls, self._layout = work, fulls, layout
        self._gathered, self._sent = gathered, sent
        self._world_size, self._bits, self._block = world_size, bits, block

    def wait(self) -> None:
        if self._work is None:
            return
        self._work.wait()
        size = self._layout.nbytes
        for r in range(self._world_size):
            message = self._gathered[r * size:(r + 1) * size]
            for full, entry in zip(self._fulls, self._layout.entries):
                n = entry[0]
                q, scales = _Layout.views(message, entry)
                ops.dequantize(q, scales, n, bits=self._bits, block=self._block,
                               out=full[r * n:(r + 1) * n])
        me = self._comm.rank  # this rank's own slices: what quantizing did to them
        for full, part in zip(self._fulls, self._parts):
            n = part.numel()
            self._comm.stats.record_quantization("all_gather", part, full[me * n:(me + 1) * n])
        self._work = self._fulls = self._gathered = self._sent = self._parts = None

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()


def quantized_all_gather(comm: Communicator, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                         *, bits: int = 8, block: int = QUANT_BLOCK) -> Work:
    """all_gather(full, part) for each pair, through block quantization, as one collective (see
    the module note). Counted in comm.stats as one all_gather of the messages."""
    pairs = list(pairs)
    if not pairs:
        return Work()
    device = pairs[0][1].device
    layout = _Layout([part.numel() for _, part in pairs], bits, block)
    sent = torch.zeros(layout.nbytes, dtype=torch.int8, device=device)
    for (_, part), entry in zip(pairs, layout.entries):
        ops.quantize(part.detach(), bits=bits, block=block, out=_Layout.views(sent, entry))
    gathered = torch.empty(comm.world_size * layout.nbytes, dtype=torch.int8, device=device)
    work = comm.all_gather(gathered.view(torch.float16), sent.view(torch.float16))
    return _DequantizeAfter(work, [full for full, _ in pairs], layout, gathered, sent,
                            comm.world_size, bits, block, comm, [part for _, part in pairs])
