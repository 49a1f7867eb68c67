"""SimulatedAsyncCommunicator: another communicator's collectives run late, in launch order, on
a SimulatedStream of their own (see [Note: simulated asynchrony] in simulated_async.py), and
`simulated_if_asked`, which the optimizers' communicators pass through."""
from __future__ import annotations

from typing import Callable

import torch

from . import simulated_async
from .communicator import CommStats, Communicator, Work
from .simulated_async import SimulatedEvent, SimulatedStream


def simulated_if_asked(comm: Communicator, device: torch.device) -> Communicator:
    """`comm`, or with ZEROSHARD_SIMULATE_ASYNC=1 on CPU tensors, `comm` run late."""
    if simulated_async.applies_to(device):
        return SimulatedAsyncCommunicator(comm)
    return comm


class _SimulatedWork(Work):
    """A collective queued on a SimulatedStream: done when its job has run."""

    def __init__(self, event: SimulatedEvent) -> None:
        self._event = event

    def wait(self) -> None:
        self._event.wait()

    def is_completed(self) -> bool:
        return self._event.query()

    @property
    def done_event(self):
        return self._event


class SimulatedAsyncCommunicator(Communicator):
    """Another communicator's collectives, each launched and waited on this one's stream (see
    [Note: simulated asynchrony]): as on a GPU's communication stream, a collective reads its
    input and writes its output only when its stream gets to it, in launch order."""

    def __init__(self, inner: Communicator) -> None:
        self.inner = inner
        self.stream = SimulatedStream("comm")
        # Counted at launch, as NcclCommunicator counts (the inner one counts when its job
        # runs, which a caller reading stats before a wait would not yet see).
        self.stats = CommStats()

    def __getattr__(self, name):  # rank, world_size, group, stats, ... of the real one
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    @property
    def crosses_node(self) -> bool:
        return self.inner.crosses_node

    @property
    def reduce_scatter_needs_scratch(self) -> bool:
        return self.inner.reduce_scatter_needs_scratch

    @property
    def all_gather_needs_private_input(self) -> bool:
        return self.inner.all_gather_needs_private_input

    @property
    def all_gather_in_place_copies(self) -> bool:
        return self.inner.all_gather_in_place_copies

    def _later(self, launch: Callable[[], Work]) -> Work:
        return _SimulatedWork(self.stream.submit(lambda: launch().wait()))

    def all_reduce(self, full):
        self._count("all_reduce", full)
        return self._later(lambda: self.inner.all_reduce(full))

    def reduce_scatter(self, part, full, scratch=None, accumulate=False):
        self._check_split(part, full, self.world_size)
        self._count("reduce_scatter", full)
        return self._later(lambda: self.inner.reduce_scatter(part, full, scratch, accumulate))

    def all_gather(self, full, part):
        self._check_split(part, full, self.world_size)
        self._count("all_gather", full)
        return self._later(lambda: self.inner.all_gather(full, part))

    def all_gather_in_place(self, full):
        self._own_slice(full)
        self._count("all_gather", full)
        return self._later(lambda: self.inner.all_gather_in_place(full))

    def all_gather_buckets(self, pairs, record_outputs=True):
        pairs = list(pairs)
        for full, part in pairs:
            self._check_split(part, full, self.world_size)
            self._count("all_gather", full)
        return self._later(lambda: self.inner.all_gather_buckets(pairs, record_outputs))

    def all_gather_control(self, full, part):
        self.stats.control_bytes += full.numel() * full.element_size()
        return self._later(lambda: self.inner.all_gather_control(full, part))

    def broadcast(self, tensor, root=0):
        self._count("broadcast", tensor)
        return self._later(lambda: self.inner.broadcast(tensor, root))

    def all_to_all(self, received, sent):
        self._check_split(sent, received, 1)
        self._count("reduce_scatter", sent)
        return self._later(lambda: self.inner.all_to_all(received, sent))

    def control_all_reduce(self, tensor, op=None):
        # As NcclCommunicator's: after every collective already queued (a collective of another
        # communicator may not run beside ours; here, on gloo, one process group would pair
        # this rank's control reduction with another rank's bucket).
        self.stream.synchronize()
        if self.world_size > 1:  # as the inner one counts: nothing to combine at world size 1
            self.stats.control_bytes += tensor.numel() * tensor.element_size()
        if op is None:
            return self.inner.control_all_reduce(tensor)
        return self.inner.control_all_reduce(tensor, op)
