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

