"""Communicator: the collectives the ZeRO layer needs, on flat tensors, with byte counters.

Three implementations behind one interface, chosen by `make_communicator()`
(communicator_factory.py):
- `LocalCommunicator`: world size 1; every collective is a copy (or nothing) and sends 0 bytes.
- `ProcessGroupCommunicator`: a torch.distributed group (gloo on CPU; any backend).
- `NcclCommunicator` (nccl_communicator.py): CUDA tensors through the core's NCCL communicator,
  bootstrapped through the process group (the unique id travels by `broadcast_object_list`), on
  its own stream joined to the caller's stream by events.

Every collective is asynchronous and returns a `Work` whose `wait()` makes the result visible to
the caller's stream (CUDA) or thread (CPU). Reductions are SUM: callers pre-divide by world size.
Bytes are counted with the core's ring model (`ring_bytes_sent`), the same for every backend.
"""
from __future__ import annotations

import atexit
import datetime
import gc
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import _core
from .collective_timeout import CollectiveTimeout  # noqa: F401  (raised here; public name)

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")
# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single and warns on the
# old names; torch before that has only the old ones. Use whichever the running torch recommends.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommStats:
    calls: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    payload_bytes: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    bytes_sent: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    # bytes_sent split by where they went: to a rank of this node or of another (see [Note:
    # bytes across nodes] in topology.py)
    intra_node_bytes: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    inter_node_bytes: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    control_bytes: int = 0
    # Quantized collectives (ZeRO++): per kind, the squared error of this rank's own values
    # after the round trip and their squared size (tensors, added on their device: no sync)
    quantization: Dict[str, list] = field(default_factory=dict)

    def record_quantization(self, kind: str, sent: torch.Tensor, received: torch.Tensor) -> None:
        sent, received = sent.detach().float(), received.detach().float()
        err, ref = (received - sent).square().sum(), sent.square().sum()
        if kind in self.quantization:
            self.quantization[kind][0] += err
            self.quantization[kind][1] += ref
        else:
            self.quantization[kind] = [err, ref]

    def record(self, kind: str, payload_bytes: int, world_size: int,
               crosses_node: bool = False) -> None:
        self.calls[kind] += 1
        self.payload_bytes[kind] += payload_bytes
        sent = _core.gpu.ring_bytes_sent(kind, payload_bytes, world_size)
        self.bytes_sent[kind] += sent
        (self.inter_node_bytes if crosses_node else self.intra_node_bytes)[kind] += sent

    def as_dict(self) -> Dict[str, Dict[str, int]]:
        return {k: {"calls": self.calls[k], "payload_bytes": self.payload_bytes[k],
                    "bytes_sent": self.bytes_sent[k],
                    "intra_node_bytes": self.intra_node_bytes[k],
                    "inter_node_bytes": self.inter_node_bytes[k]} for k in KINDS}


def merged_stats(dicts) -> Dict[str, Dict[str, int]]:
    """CommStats.as_dict() of several communicators, added up kind by kind."""
    out: Dict[str, Dict[str, int]] = {}
    for d in dicts:
        for kind, row in d.items():
            into = out.setdefault(kind, dict.fromkeys(row, 0))
            for key, value in row.items():
                into[key] += value
    return out


class Work:
    """A finished collective: wait() does nothing."""

    def wait(self) -> None:
        return None

    def is_completed(self) -> bool:
        return True

    @property
    def done_event(self):
        """The CUDA event that marks the collective done on the device, or None (finished, or
        not a CUDA collective): offload's copies of its output wait for it alone."""
        return None


class _TorchWork(Work):
    """A torch.distributed work handle, waited with a timeout so that a dead or stuck peer ends
    in CollectiveTimeout on every survivor instead of a hang."""

    def __init__(self, handle, kind: str = "collective", rank: int = 0,
                 timeout_s: Optional[float] = None) -> None:
        self._handle = handle
        self._kind, self._rank, self._timeout_s = kind, rank, timeout_s

    def wait(self) -> None:
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        try:
            if self._timeout_s is None:
                handle.wait()
            else:
                handle.wait(timeout=datetime.timedelta(seconds=self._timeout_s))
        except RuntimeError as e:
            raise CollectiveTimeout(
                f"{self._kind} did not complete on rank {self._rank} (timeout_s="
                f"{self._timeout_s}): {str(e).strip()[:300]}. A peer rank probably died or "
                "stopped responding, or a rank is inside a call that this rank did not make "
                "(e.g. zeroshard.checkpoint.save called on rank 0 only); check the other "
                "ranks' logs.") from e

    def is_completed(self) -> bool:
        return self._handle is None or self._handle.is_completed()


class _SumAfterWork(Work):
    """reduce_scatter through all_to_all: wait for the exchange, then sum the received parts."""

    def __init__(self, work: Work, received: torch.Tensor, part: torch.Tensor,
                 world_size: int, accumulate: bool = False) -> None:
        self._work, self._received, self._part, self._world_size = work, received, part, world_size
        self._accumulate = accumulate

    def wait(self) -> None:
        if self._work is None:
            return
        self._work.wait()
        parts = self._received.view(self._world_size, -1)
        if self._accumulate:  # straight into the destination: no temporary of part's size
            for i in range(self._world_size):
                self._part.add_(parts[i])
        else:
            torch.sum(parts, dim=0, out=self._part)
        self._work = self._received = None

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()


class _AllWork(Work):
    """Several works waited as one (in launch order)."""

    def __init__(self, works: List[Work]) -> None:
        self._works = works

    def wait(self) -> None:
        works, self._works = self._works, []
        for w in works:
            w.wait()

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)


class Communicator:
    """Interface. `full` is the whole buffer (all_reduce's, reduce_scatter's input,
    all_gather's output); `part` is this rank's 1/world_size of it."""

    rank: int = 0
    world_size: int = 1
    # reduce_scatter wants a full-size `scratch` receive buffer (gloo's all-to-all); callers
    # that pass one keep it from allocating one per call.
    reduce_scatter_needs_scratch: bool = False
    # all_gather's `part` must not alias `full` (gloo may overwrite an aliased input while it
    # still reads it); elsewhere a rank's slice of the output is gathered in place.
    all_gather_needs_private_input: bool = False
    # Whether this rank's ring successor in the group is on another node (topology.py): then
    # every byte it sends crosses between nodes. Set by make_communicator.
    crosses_node: bool = False
    # True only inside all_gather_control: _count books the bytes as control bytes. A class
    # default, so that a wrapper (SimulatedAsyncCommunicator forwards unknown attributes to the
    # communicator it wraps) reads its own False, never the wrapped one's flag while another
    # thread runs a control gather there (a bucket launched meanwhile went uncounted).
    _control: bool = False

    def __init__(self) -> None:
        self.stats = CommStats()

    def all_reduce(self, full: torch.Tensor) -> Work:
        raise NotImplementedError

    def reduce_scatter(self, part: torch.Tensor, full: torch.Tensor,
                       scratch: Optional[torch.Tensor] = None, accumulate: bool = False) -> Work:
        """part = (or, with accumulate=True, part +=) this rank's slice of the sum of `full`
        over ranks. accumulate=True needs `scratch` where reduce_scatter_needs_scratch."""
        raise NotImplementedError

    def all_gather(self, full: torch.Tensor, part: torch.Tensor) -> Work:
        raise NotImplementedError

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> Work:
        raise NotImplementedError

    # all_gather_in_place copies this rank's slice first (gloo's ring gather across nodes): a
    # caller bounds how many it has in flight.
    all_gather_in_place_copies: bool = False

    def all_gather_in_place(self, full: torch.Tensor) -> Work:
        """all_gather into `full` from this rank's own slice of it (slice `rank` of world_size
        equal slices, already holding this rank's values): a stage 1/2 bucket after the update.
        Counted as one all_gather of `full`."""
        return self.all_gather(full, self._own_slice(full))

    def all_to_all(self, received: torch.Tensor, sent: torch.Tensor) -> Work:
        """Part i of `sent` (world_size equal parts) goes to rank i; part i of `received` comes
        from rank i. The hops of a quantized reduce-scatter (quantized_reduce.py): counted as
        reduce_scatter bytes, which by the ring model they are ((n-1)/n of the payload)."""
        raise NotImplementedError(f"{type(self).__name__} has no all_to_all (quantize_grads= "
                                  "needs one)")

    def all_gather_buckets(self, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                           record_outputs: bool = True) -> Work:
        """all_gather(full, part) for each (full, part) pair, as one operation: NCCL fuses them
        into one group launch; other backends run them one by one. Counted as len(pairs)
        all_gather calls, as if made separately. One Work for all of them.
        record_outputs=False (NCCL): the caller frees the outputs only after waiting for the
        Work, so the allocator need not be told that the communication stream uses them (stage
        3's unit buffers: recording them would hold each freed unit's memory back until the
        gather's stream caught up, as FSDP2 found)."""
        pairs = list(pairs)
        for full, part in pairs:
            self._check_split(part, full, self.world_size)
        return _AllWork([self.all_gather(full, part) for full, part in pairs])

    def control_all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        return tensor  # world size 1: nothing to combine

    def all_gather_control(self, full: torch.Tensor, part: torch.Tensor) -> Work:
        """An asynchronous all_gather of a few control values (stage 3's unit tags), counted in
        stats.control_bytes, apart from the traffic of ZeRO's formulas."""
        self._control = True
        try:
            return self.all_gather(full, part)
        finally:
            self._control = False

    def _count(self, kind: str, tensor: torch.Tensor) -> None:
        if self._control:
            self.stats.control_bytes += tensor.numel() * tensor.element_size()
            return
        self.stats.record(kind, tensor.numel() * tensor.element_size(), self.world_size,
                          self.crosses_node)

    def _own_slice(self, full: torch.Tensor) -> torch.Tensor:
        if full.dim() != 1 or full.numel() % self.world_size:
            raise ValueError(f"an in-place all_gather needs a 1-D buffer of world_size "
                             f"({self.world_size}) equal slices, got shape {tuple(full.shape)}")
        return full.view(self.world_size, -1)[self.rank]

    @staticmethod
    def _check_split(part: torch.Tensor, full: torch.Tensor, world_size: int) -> None:
        if full.numel() != part.numel() * world_size:
            raise ValueError(f"collective sizes disagree: full has {full.numel()} elements, "
                             f"part {part.numel()} x world_size {world_size}")


class LocalCommunicator(Communicator):
    def all_reduce(self, full):
        self._count("all_reduce", full)
        return Work()

    def reduce_scatter(self, part, full, scratch=None, accumulate=False):
        self._check_split(part, full, 1)
        if accumulate:
            part.add_(full)
        elif part.data_ptr() != full.data_ptr():
            part.copy_(full)
        self._count("reduce_scatter", full)
        return Work()

    def all_gather(self, full, part):
        self._check_split(part, full, 1)
        if part.data_ptr() != full.data_ptr():
            full.copy_(part)
        self._count("all_gather", full)
        return Work()

    def broadcast(self, tensor, root=0):
        self._count("broadcast", tensor)
        return Work()

    def all_to_all(self, received, sent):
        self._check_split(sent, received, 1)
        received.copy_(sent)
        self._count("reduce_scatter", sent)
        return Work()


_exit_drain_registered = False


def _drain_gloo_workers_at_exit() -> None:
    """[Note: gloo at exit] A gloo worker thread drops its last reference to a finished work
    (and so to the tensors the work held) a moment after the work completes. If Python is
    already finalizing then, releasing a tensor's Python object needs the GIL, the thread is
    torn down, and the process aborts with "terminate called without an active exception"
    (core dump: AsyncBarrierWork/AsyncAllgatherWork destructors in ProcessGroupGloo::runLoop;
    pytorch/pytorch#190489, #179291). Running while the interpreter is still whole, this lets
    those threads finish their releases first. It cannot prove they have; it makes the window
    far smaller than the time it takes."""
    gc.collect()
    time.sleep(0.05)


def register_exit_drain() -> None:
    """Registers _drain_gloo_workers_at_exit once (see [Note: gloo at exit]); scripts that use
    gloo without a zeroshard communicator (a DDP baseline) can call it too."""
    global _exit_drain_registered
    if not _exit_drain_registered:
        atexit.register(_drain_gloo_workers_at_exit)
        _exit_drain_registered = True


class ProcessGroupCommunicator(Communicator):
    def __init__(self, group: Optional[dist.ProcessGroup],
                 timeout_s: Optional[float] = None) -> None:
        super().__init__()
        register_exit_drain()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout_s = timeout_s  # None: torch's own process-group timeout
        # gloo's reduce_scatter_tensor runs to completion inside the call, so no timeout can
        # reach it; its async all_to_all can be waited with one (same bytes moved).
        self._reduce_scatter_native = dist.get_backend(group) != "gloo"
        # gloo gathers in place by broadcasts (all_gather_in_place); make_communicator turns
        # this off for a group that spans nodes
        self.gather_by_broadcast = dist.get_backend(group) == "gloo"

    @property
    def reduce_scatter_needs_scratch(self) -> bool:
        return not self._reduce_scatter_native

    all_gather_needs_private_input = True

    def _work(self, kind: str, handle) -> Work:
        return _TorchWork(handle, kind, self.rank, self.timeout_s)

    def all_reduce(self, full):
        self._count("all_reduce", full)
        return self._work("all_reduce", dist.all_reduce(full, group=self.group, async_op=True))

    def reduce_scatter(self, part, full, scratch=None, accumulate=False):
        self._check_split(part, full, self.world_size)
        self._count("reduce_scatter", full)
        if self._reduce_scatter_native and accumulate:
            raise ValueError("accumulate=True is for the all-to-all path (gloo); reduce into a "
                             "separate part and add it")
        if self._reduce_scatter_native:
            try:
                return self._work("reduce_scatter", reduce_scatter_single(
                    part, full, group=self.group, async_op=True))
            except (RuntimeError, NotImplementedError):
                # Older gloo builds lack reduce_scatter; all_to_all moves the same bytes.
                self._reduce_scatter_native = False
        if scratch is not None and (scratch.numel() != full.numel() or scratch.dtype != full.dtype):
            raise ValueError(f"reduce_scatter scratch has {scratch.numel()} {scratch.dtype} "
                             f"elements, the input {full.numel()} {full.dtype}")
        received = scratch if scratch is not None else torch.empty_like(full)
        work = self._work("reduce_scatter", dist.all_to_all_single(received, full,
                                                                   group=self.group, async_op=True))
        return _SumAfterWork(work, received, part, self.world_size, accumulate)

    def all_gather(self, full, part):
        self._check_split(part, full, self.world_size)
        self._count("all_gather", full)
        if _overlaps(part, full):
            part = part.clone()  # gloo may write `full` while still reading an aliased input
        return self._work("all_gather", all_gather_single(full, part, group=self.group,
                                                          async_op=True))

    def all_gather_buckets(self, pairs, record_outputs=True):
        """On gloo each pair's part is copied into its slice of `full`, then gathered in place
        (all_gather_in_place); elsewhere as Communicator's."""
        if not self.gather_by_broadcast:
            return super().all_gather_buckets(pairs, record_outputs)
        pairs = list(pairs)
        owns = []
        for full, part in pairs:  # every pair checked before any is launched
            self._check_split(part, full, self.world_size)
            owns.append(self._own_slice(full))
        works = []
        for (full, part), own in zip(pairs, owns):
            if part.data_ptr() != own.data_ptr() or part.dtype != own.dtype:
                own.copy_(part.clone() if _overlaps(part, full) else part)
            works.append(self.all_gather_in_place(full))
        return _AllWork(works)

    @property
    def all_gather_in_place_copies(self) -> bool:
        return not self.gather_by_broadcast

    def all_gather_in_place(self, full):
        """On gloo, one broadcast per rank of its own slice, each written in place: gloo's
        all_gather may not read an input inside its output (a copy of the slice first) and
        moved the same bytes about half as fast (32 buckets of gpt-17m, 2 ranks: 32-39 ms
        against 14-19 ms; 4 ranks: 119-127 against 84-105). The ranks together send what the
        ring all_gather sends, (n-1) slices each on average: counted as one all_gather."""
        if not self.gather_by_broadcast:
            return super().all_gather_in_place(full)
        self._own_slice(full)  # checks the split
        self._count("all_gather", full)
        slices = full.view(self.world_size, -1)
        return _AllWork([self._work("all_gather", dist.broadcast(
            slices[i], src=dist.get_global_rank(self.group, i) if self.group is not None else i,
            group=self.group, async_op=True)) for i in range(self.world_size)])

    def all_to_all(self, received, sent):
        self._check_split(sent, received, 1)
        self._count("reduce_scatter", sent)
        return self._work("all_to_all", dist.all_to_all_single(received, sent, group=self.group,
                                                               async_op=True))

    def control_all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        """A small, synchronous reduction of control values (norms, overflow flags). Counted in
        stats.control_bytes, apart from the gradient and parameter traffic of ZeRO's formulas."""
        self.stats.control_bytes += tensor.numel() * tensor.element_size()
        self._work("all_reduce (control)",
                   dist.all_reduce(tensor, op=op, group=self.group, async_op=True)).wait()
        return tensor

    def broadcast(self, tensor, root=0):
        self._count("broadcast", tensor)
        src = dist.get_global_rank(self.group, root) if self.group is not None else root
        return self._work("broadcast", dist.broadcast(tensor, src=src, group=self.group,
                                                      async_op=True))


def _object_collective_device(group: Optional[dist.ProcessGroup],
                              device: torch.device) -> Optional[torch.device]:
    """The device for broadcast_object_list over `group`. Left to itself, torch puts an NCCL
    group's object tensor on torch.cuda.current_device(), which is GPU 0 on every rank of a
    script that never called torch.cuda.set_device; gloo (also in a mixed "cpu:gloo,cuda:nccl"
    group) takes CPU tensors, which torch picks for it."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "nccl" not in backend:
        return None
    return device


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _dtype(t: torch.Tensor) -> int:
    from .._tensors import dtype_code
    return dtype_code(t.dtype)
