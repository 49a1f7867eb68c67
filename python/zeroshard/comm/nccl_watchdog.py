"""Watchdog: the deadline of every collective launched on one NCCL communicator.

    watchdog = Watchdog(timeout_s=600.0, rank=rank, abort=comm.abort,
                        async_error=comm.async_error)
    watchdog.check()                        # before each zeroshard call: raise if it fired
    watchdog.track("all_reduce", done_event.query)  # after each launch
    watchdog.close()                        # when the communicator is destroyed

Owns a polling thread, the collectives in flight in launch order with their deadlines, and the
one failure that ends the communicator. Knows nothing of CUDA, NCCL or tensors: a collective is
a kind and an `is_done()` callable, the communicator is an `abort()` and an `async_error()`.

[Note: NCCL watchdog] A collective on a CUDA stream returns at once; `_CudaWork.wait()` only
makes the caller's stream wait for it. If a peer rank dies, hangs, or is inside a call the
others did not make, the collective never finishes and the job hangs at the next host sync,
with no error on any rank. As torch's ProcessGroupNCCL does, a thread polls the completion
events of the collectives in flight and `ncclCommGetAsyncError`; when a collective passes
timeout_s, or NCCL reports an error, it aborts the communicator (`ncclCommAbort` frees the
kernels stuck on this rank; the peers' collectives with it then fail or time out, so their own
watchdogs fire in turn) and the next zeroshard call on this rank raises CollectiveTimeout naming
the collective, the rank and the timeout. Collectives on one stream finish in launch order and
share one timeout, so only the oldest unfinished one can be past its deadline.

Only the logic is tested here (tests/python/test_nccl_watchdog.py, fake work objects on CPU).
The real path (CUDA events, ncclCommGetAsyncError, ncclCommAbort under a dead or stuck peer)
needs two GPUs to test: one GPU has no peer to lose.
"""
from __future__ import annotations

import collections
import math
import threading
import time
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Deque, Optional

from .collective_timeout import CollectiveTimeout

# How long check() lets a running abort() finish before it raises, so that a process exiting on
# the exception does not race NCCL's teardown (ncclCommAbort can block while kernels drain).
ABORT_WAIT_S = 10.0
# How long close() waits for the polling thread beyond one poll interval.
JOIN_WAIT_S = 2.0

_LIKELY_CAUSES = ("A peer rank probably died or stopped responding, or a rank is inside a call "
                  "that the others did not make (e.g. zeroshard.checkpoint.save called on rank "
                  "0 only); check the other ranks' logs.")


@dataclass(frozen=True)
class _InFlight:
    kind: str
    deadline: float  # time.monotonic() seconds
    is_done: Callable[[], bool]


@dataclass(frozen=True)
class _Failure:
    kind: str
    reason: str  # what the watchdog saw, as a verb phrase: "did not complete", "failed: ..."
    abort_error: Optional[str] = None


class Watchdog:
    """Polls the collectives of one communicator against timeout_s; see [Note: NCCL watchdog].

    track() and check() are called from the thread that launches collectives; the polling thread
    only reads the oldest collective and records the failure. Both hold `_lock` briefly and never
    while calling is_done(), async_error() or abort()."""

    def __init__(self, *, timeout_s: float, rank: int, abort: Callable[[], None],
                 async_error: Callable[[], Optional[str]],
                 poll_interval_s: float = 0.05) -> None:
        _require_positive_seconds("timeout_s", timeout_s)
        _require_positive_seconds("poll_interval_s", poll_interval_s)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"Watchdog: rank must be an int >= 0, got {rank!r}")
        for name, fn in (("abort", abort), ("async_error", async_error)):
            if not callable(fn):
                raise TypeError(f"Watchdog: {name} must be callable (the communicator's "
                                f"{name} function), got {type(fn).__name__}")
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self._abort = abort
        self._async_error = async_error
        self._poll_interval_s = float(poll_interval_s)

        self._lock = threading.Lock()
        self._in_flight: Deque[_InFlight] = collections.deque()  # launch order
        self._last_kind: Optional[str] = None  # names the failure when nothing is in flight
        self._failure: Optional[_Failure] = None
        self._abort_finished = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None  # started by the first track()
        self._closed = False

    def track(self, kind: str, is_done: Callable[[], bool]) -> None:
        """Watch one launched collective: it must report done within timeout_s from now."""
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"Watchdog.track: kind must name the collective (e.g. "
                             f"'all_reduce'), got {kind!r}")
        if not callable(is_done):
            raise TypeError(f"Watchdog.track: is_done must be callable (e.g. a CUDA event's "
                            f"query), got {type(is_done).__name__}")
        self.check()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"Watchdog.track({kind!r}) after close(): the communicator "
                                   "was destroyed; create a new one")
            self._in_flight.append(_InFlight(kind, time.monotonic() + self.timeout_s, is_done))
            self._last_kind = kind
            if self._thread is None:
                self._thread = self._start_thread()

    def check(self) -> None:
        """Raise CollectiveTimeout if the watchdog fired; every time after, since the
        communicator is aborted for good. Waits up to ABORT_WAIT_S for a running abort()."""
        with self._lock:
            failure = self._failure
        if failure is None:
            return
        aborted = self._abort_finished.wait(ABORT_WAIT_S)
        with self._lock:
            failure = self._failure  # now with abort's error, if it raised
        raise CollectiveTimeout(self._message(failure, aborted))

    def close(self) -> None:
        """Stop the polling thread and wait briefly for it. Idempotent."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._stop.set()
        # abort() may call close(); a thread cannot join itself.
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._poll_interval_s + JOIN_WAIT_S)

    def _start_thread(self) -> threading.Thread:
        # The thread holds the watchdog weakly: a communicator dropped without close() lets its
        # watchdog be collected, and the thread ends at its next poll instead of polling forever.
        thread = threading.Thread(
            target=_poll_until_stopped, args=(weakref.ref(self), self._stop, self._poll_interval_s),
            name=f"zeroshard-nccl-watchdog-rank{self.rank}", daemon=True)
        thread.start()
        return thread

    def _poll_once(self) -> bool:
        """One look at the communicator; False once the watchdog has fired."""
        oldest = self._oldest_unfinished()
        if isinstance(oldest, _Failure):
            return self._fire(oldest)
        kind = oldest.kind if oldest is not None else self._kind_for_idle_error()
        try:
            error = self._async_error()
        except Exception as e:  # the query itself failing means the communicator is unusable
            return self._fire(_Failure(kind, f"failed: querying NCCL's async error raised "
                                             f"{_text(e)}"))
        if error:
            return self._fire(_Failure(kind, f"failed: NCCL reported an error: {error}"))
        if oldest is not None and time.monotonic() > oldest.deadline:
            return self._fire(_Failure(kind, "did not complete"))
        return True

    def _oldest_unfinished(self):
        """Drop finished collectives from the front; the oldest unfinished one, None, or the
        _Failure of an is_done() that raised. Only this thread pops, so the front is stable
        between the locked peek and the pop."""
        while True:
            with self._lock:
                if not self._in_flight:
                    return None
                oldest = self._in_flight[0]
            try:
                done = oldest.is_done()
            except Exception as e:  # e.g. a CUDA error on the event: the collective is lost
                return _Failure(oldest.kind, f"failed: checking whether it finished raised "
                                             f"{_text(e)}")
            if not done:
                return oldest
            with self._lock:
                self._in_flight.popleft()

    def _kind_for_idle_error(self) -> str:
        with self._lock:
            last = self._last_kind
        return f"the communicator (idle after {last})" if last else "the communicator (idle)"

    def _fire(self, failure: _Failure) -> bool:
        # Record first, so that check() on the launching thread stops new launches while the
        # communicator is being aborted. After close() the communicator may be half destroyed:
        # leave it alone.
        with self._lock:
            if self._closed:
                return False
            self._failure = failure
        try:
            self._abort()
        except Exception as e:
            with self._lock:
                self._failure = replace(failure, abort_error=_text(e))
        finally:
            self._abort_finished.set()
        return False

    def _message(self, failure: _Failure, aborted: bool) -> str:
        if failure.abort_error is not None:
            abort_note = f"aborting the communicator also failed: {failure.abort_error}"
        elif aborted:
            abort_note = "the communicator was aborted, so every later collective on it fails"
        else:
            abort_note = f"aborting the communicator had not returned after {ABORT_WAIT_S:g} s"
        return (f"{failure.kind} on rank {self.rank} {failure.reason} (timeout_s="
                f"{self.timeout_s:g}); {abort_note}. {_LIKELY_CAUSES}")


def _poll_until_stopped(watchdog_ref: "weakref.ReferenceType[Watchdog]", stop: threading.Event,
                        poll_interval_s: float) -> None:
    # stop.wait sleeps the interval (no busy loop) and wakes at once on close().
    while not stop.wait(poll_interval_s):
        watchdog = watchdog_ref()
        if watchdog is None or not watchdog._poll_once():
            return
        del watchdog  # hold no reference while sleeping


def _require_positive_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"Watchdog: {name} must be a finite number of seconds > 0, "
                         f"got {value!r}")


def _text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip()[:300]}"
