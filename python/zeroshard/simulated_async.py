"""Simulated asynchrony: a contributors' test mode in which work zeroshard queues on a side stream
runs late on CPU, so that a missing wait shows up as a wrong number instead of passing unseen.

[Note: simulated asynchrony] On a GPU, a collective or a copy queued on a side stream runs when the
device gets to it; the host goes on at once, and only a wait (an event joined, a stream synchronised)
makes its result visible or its input free again. On CPU every copy is synchronous and every
collective of ours is waited before anything reads it, so a test on CPU cannot see a wait that is
missing. With ZEROSHARD_SIMULATE_ASYNC=1, on CPU tensors:
- every collective of the communicator (bucket reductions, unit gathers, their tags), every offload
  copy (gradients D2H, parameters H2D) runs on a worker thread of its own stream, in the order it
  was queued, at the earliest a random 0-5 ms after it was queued; it completes when its worker
  gets to it, and a wait on its event blocks until then. Its inputs are read and its outputs written only then.
- buffers handed out for reuse (a ring slot, an offload staging buffer) and unit buffers freed at
  stage 3 are filled with NaN first (`poison`): a collective or copy that still reads one after
  its wait was dropped reads NaN, and a read of a gathered buffer before its wait reads NaN.
The delays come from a seed (ZEROSHARD_SIMULATE_ASYNC_SEED, else a random one), printed once per
process, so that a failing run can be repeated. Off by default; nothing here runs unless asked.
"""
from __future__ import annotations

import os
import queue
import random
import sys
import threading
import time
from typing import Callable, List, Optional

import torch

from .communicator import CommStats, Communicator, Work

MAX_DELAY_S = 0.005

_seed: Optional[int] = None
_streams_made = 0
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get("ZEROSHARD_SIMULATE_ASYNC", "0") not in ("", "0")


def applies_to(device: torch.device) -> bool:
    """Simulated asynchrony stands in for a device's streams on CPU tensors only."""
    return enabled() and torch.device(device).type == "cpu"


def seed() -> int:
    """This process's seed, chosen (and printed) on first use."""
    global _seed
    with _lock:
        if _seed is None:
            given = os.environ.get("ZEROSHARD_SIMULATE_ASYNC_SEED")
            _seed = int(given) if given else random.SystemRandom().randrange(2 ** 31)
            rank = os.environ.get("RANK", "?")
            print(f"zeroshard: simulated asynchrony on (ZEROSHARD_SIMULATE_ASYNC_SEED={_seed}, "
                  f"rank {rank})", file=sys.stderr, flush=True)
        return _seed


class SimulatedEvent:
    """Marks one job of a SimulatedStream done; wait() blocks until it is and re-raises the
    job's error, if it had one."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: Optional[BaseException] = None

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error

    def query(self) -> bool:
        return self._done.is_set()

    synchronize = wait  # the torch.cuda.Event spelling

    def _finish(self, error: Optional[BaseException] = None) -> None:
        self._error = error
        self._done.set()


class SimulatedStream:
    """One worker thread that runs the jobs queued on it in order, each after a random delay."""

    def __init__(self, name: str) -> None:
        global _streams_made
        with _lock:
            index = _streams_made
            _streams_made += 1
        rank = int(os.environ.get("RANK", "0") or 0)
        self._rng = random.Random(seed() * 1_000_003 + rank * 7_919 + index)
        self._jobs: "queue.Queue" = queue.Queue()
        self._last: Optional[SimulatedEvent] = None
        self._thread = threading.Thread(target=self._run, name=f"zeroshard-sim-{name}",
                                        daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None],
               after: Optional[List[SimulatedEvent]] = None) -> SimulatedEvent:
        """Queues fn, to run once every event in `after` is done (events of other streams) and
        every job queued before it here has run. Returns its event."""
        event = SimulatedEvent()
        # Due a random delay after it was queued, as a device runs work some time after the
        # host queued it (delays of jobs queued back to back overlap, they do not add up).
        due = time.monotonic() + self._rng.uniform(0.0, MAX_DELAY_S)
        self._jobs.put((fn, [e for e in (after or []) if e is not None], due, event))
        self._last = event
        return event

    def synchronize(self) -> None:
        """Blocks until every job queued so far has run."""
        if self._last is not None:
            self._last.wait()

    def _run(self) -> None:
        while True:
            fn, after, due, event = self._jobs.get()
            try:
                for e in after:
                    e.wait()
                time.sleep(max(0.0, due - time.monotonic()))
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the event
                event._finish(e)
            else:
                event._finish()


_pause_rng: Optional[random.Random] = None


def pause() -> None:
    """In simulated mode, a seeded random 0-5 ms sleep: host work that runs beside the caller
    (offload's deferred update) starts late, as it would behind a long CPU update."""
    global _pause_rng
    if not enabled():
        return
    base = seed()  # takes _lock itself
    with _lock:
        if _pause_rng is None:
            _pause_rng = random.Random(base * 31 + int(os.environ.get("RANK", "0") or 0))
        delay = _pause_rng.uniform(0.0, MAX_DELAY_S)
    time.sleep(delay)


def poison(t: Optional[torch.Tensor]) -> None:
    """Fills a buffer that is free for reuse with NaN (floating point) or -1 (integers), in
    simulated mode: whatever still reads it reads garbage that tests can see."""
    if t is None or t.numel() == 0 or t.device.type != "cpu" or not enabled():
        return
    with torch.no_grad():
        t.fill_(float("nan") if t.is_floating_point() else -1)


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
    def reduce_scatter_needs_scratch(self) -> bool:
        return self.inner.reduce_scatter_needs_scratch

    @property
    def all_gather_needs_private_input(self) -> bool:
        return self.inner.all_gather_needs_private_input

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
