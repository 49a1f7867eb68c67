"""QuantizedReduceScatter: ZeRO++'s qgZ. A gradient bucket's reduce-scatter over N = nodes x k
ranks in two all-to-all hops, each quantized once, every sum taken in fp32:

1. inside the node: the bucket is cut into k rows, row j holding the slices of the ranks with
   local rank j on every node (nodes x S elements, S = the bucket / N); each row is block-
   quantized alone and sent to local rank j, which dequantizes the k rows it receives and adds
   them up in fp32, in local-rank order: its node's sum of those slices;
2. across nodes: that sum, cut into one row per node (S elements each), quantized again and sent
   to the rank with the same local rank on each node, which dequantizes the rows it receives
   and adds them up in fp32, in node order: its slice of the sum over every rank.

So the bytes that cross between nodes are S x (nodes - 1) quantized elements a rank (int4: an
eighth of an fp32 ring reduce-scatter's), and no reduction runs on quantized values. Each hop
is counted in the sub-communicator's stats as reduce_scatter bytes (node hops intra-node, cross
hops inter-node). Deterministic: the same rows are added in the same order on every run.
"""
from __future__ import annotations

import torch

from .. import ops
from ..comm.communicator import Communicator, Work
from .quantized_gather import QUANT_BLOCK, message_piece


class _Rows:
    """`rows` rows of `n` elements each, block-quantized row by row into one byte buffer: each
    row is its bytes (padded to 4) then its fp32 scales, the layout an all_to_all moves as is,
    in one collective."""

    def __init__(self, rows: int, n: int, bits: int, block: int, device) -> None:
        self.rows, self.n, self.bits, self.block = rows, n, bits, block
        self.q_bytes, self.q_stride, self.blocks = message_piece(n, bits, block)
        self.stride = self.q_stride + 4 * self.blocks
        self.buffer = torch.zeros(rows * self.stride, dtype=torch.int8, device=device)

    def like(self) -> "_Rows":
        return _Rows(self.rows, self.n, self.bits, self.block, self.buffer.device)

    def _row(self, r: int):
        start = r * self.stride
        return (self.buffer[start:start + self.q_bytes],
                self.buffer[start + self.q_stride:start + self.stride].view(torch.float32))

    def quantize(self, values: torch.Tensor) -> "_Rows":
        for r in range(self.rows):
            ops.quantize(values[r], bits=self.bits, block=self.block, out=self._row(r))
        return self

    def row_values(self, r: int) -> torch.Tensor:
        q, scales = self._row(r)
        return ops.dequantize(q, scales, self.n, bits=self.bits, block=self.block)

    def add_into(self, acc: torch.Tensor) -> None:
        """acc += every row, dequantized, in row order (fp32)."""
        for r in range(self.rows):
            q, scales = self._row(r)
            ops.dequantize_add_(acc, q, scales, bits=self.bits, block=self.block)

    def exchange(self, comm: Communicator, into: "_Rows") -> Work:
        return comm.all_to_all(into.buffer.view(torch.float16), self.buffer.view(torch.float16))


class _TwoHops(Work):
    """Hop 1 in flight; wait() finishes it, runs hop 2 and leaves the slice in `part`."""

    def __init__(self, owner: "QuantizedReduceScatter", work: Work, sent: _Rows,
                 received: _Rows, part: torch.Tensor, own_row: torch.Tensor) -> None:
        self._owner, self._work, self._received, self._part = owner, work, received, part
        self._sent = sent  # read by the exchange in flight
        self._own_row = own_row  # the row this rank sent itself: its hop-1 error is reported

    def wait(self) -> None:
        if self._work is None:
            return
        self._work.wait()
        owner, part = self._owner, self._part
        node_sum = torch.zeros(owner.nodes * part.numel(), dtype=torch.float32,
                               device=part.device)
        self._received.add_into(node_sum)
        node_comm, cross_comm = owner.node_comm, owner.cross_comm
        node_comm.stats.record_quantization(
            "reduce_scatter", self._own_row, self._received.row_values(node_comm.rank))
        out = _Rows(owner.nodes, part.numel(), owner.bits, owner.block, part.device)
        rows = node_sum.view(owner.nodes, -1)
        out.quantize(rows)
        received = out.like()
        out.exchange(cross_comm, received).wait()
        cross_comm.stats.record_quantization("reduce_scatter", rows[cross_comm.rank],
                                             received.row_values(cross_comm.rank))
        acc = torch.zeros(part.numel(), dtype=torch.float32, device=part.device)
        received.add_into(acc)
        part.copy_(acc)
        self._work = self._received = self._sent = self._own_row = None

    def is_completed(self) -> bool:
        # hop 1 done: wait() runs hop 2 without waiting on any rank that is not in it too
        return self._work is None or self._work.is_completed()


class QuantizedReduceScatter:
    def __init__(self, node_comm: Communicator, cross_comm: Communicator, bits: int,
                 block: int = QUANT_BLOCK) -> None:
        self.node_comm, self.cross_comm = node_comm, cross_comm
        self.k, self.nodes = node_comm.world_size, cross_comm.world_size
        self.bits, self.block = bits, block

    def reduce_scatter(self, part: torch.Tensor, full: torch.Tensor) -> Work:
        """part = this rank's slice of the sum of `full` over every rank (as
        Communicator.reduce_scatter, ranks numbered node by node), through the two hops."""
        slice_numel = part.numel()
        if full.numel() != slice_numel * self.k * self.nodes:
            raise ValueError(f"collective sizes disagree: full has {full.numel()} elements, part "
                             f"{slice_numel} x {self.k * self.nodes} ranks")
        # row j: the slices of local rank j on every node, in node order
        rows = full.float().view(self.nodes, self.k, slice_numel).transpose(0, 1).reshape(
            self.k, self.nodes * slice_numel)
        sent = _Rows(self.k, self.nodes * slice_numel, self.bits, self.block, full.device)
        sent.quantize(rows)
        received = sent.like()
        return _TwoHops(self, sent.exchange(self.node_comm, received), sent, received, part,
                        rows[self.node_comm.rank])
