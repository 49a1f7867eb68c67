"""SideStream: a stream of copies that runs beside the caller's work (offload's D2H and H2D
streams), and the waits on the events that mark its work done.

One spelling for the three ways a copy can run:
- CUDA tensors: a torch.cuda.Stream; events are torch.cuda.Events; a caller's wait joins its
  stream to the event (no host sync), a host wait synchronizes.
- CPU tensors: the copy runs at once (it is synchronous); events are None and waits do nothing.
- CPU tensors with ZEROSHARD_SIMULATE_ASYNC=1: the copy runs late on a worker thread; events are
  SimulatedEvents and every wait blocks until the copy has run (see [Note: simulated
  asynchrony] in simulated_async.py). A wait missing here leaves a wrong number behind, as it
  would on a GPU.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import simulated_async


class SideStream:
    def __init__(self, device: torch.device, name: str) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._simulated = (simulated_async.SimulatedStream(name)
                           if simulated_async.applies_to(device) else None)

    def follow_caller(self) -> None:
        """What is enqueued next runs after everything the caller's stream has queued so far
        (on CPU the caller's work is already done)."""
        if self.cuda:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))

    def enqueue(self, fn: Callable[[], None], after=None):
        """Runs fn (copies) on this stream, after the event `after` if one is given. Returns the
        event that marks it done (None where it ran at once)."""
        if self.cuda:
            if after is not None:
                self._stream.wait_event(after)
            with torch.cuda.stream(self._stream):
                fn()
                done = torch.cuda.Event()
                done.record(self._stream)
            return done
        if self._simulated is not None:
            return self._simulated.submit(fn, [after] if after is not None else None)
        fn()
        return None

    def record(self):
        """An event after everything queued on this stream so far (None on plain CPU)."""
        if self.cuda:
            done = torch.cuda.Event()
            done.record(self._stream)
            return done
        if self._simulated is not None:
            return self._simulated.submit(lambda: None)
        return None

    def join_caller(self) -> None:
        """The caller's next work follows everything queued on this stream."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        elif self._simulated is not None:
            self._simulated.synchronize()


def host_wait(event) -> None:
    """Blocks this thread until `event` is done (None: nothing to wait for)."""
    if event is not None:
        event.synchronize()


def caller_wait(event, device: torch.device) -> None:
    """The caller's next work follows `event`: a stream join on CUDA (no host sync), a block on
    a simulated event, nothing for None."""
    if event is None:
        return
    if isinstance(event, simulated_async.SimulatedEvent):
        event.wait()
    else:
        torch.cuda.current_stream(device).wait_event(event)


def is_done(event: Optional[object]) -> bool:
    return event is None or event.query()
