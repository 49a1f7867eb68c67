"""The NCCL watchdog's logic, on CPU with fake collectives: no GPU, no NCCL.

A fake collective is done when its event is set; the fake communicator counts aborts and
returns whatever async error a test sets. The real path (CUDA events, ncclCommGetAsyncError,
ncclCommAbort with a dead or stuck peer) needs two GPUs and is not tested here. Timing is
checked only as generous upper bounds (fired within timeout + 2 s) and the lower bound the
deadline guarantees.
"""
from __future__ import annotations

import gc
import re
import threading
import time

import pytest

import zeroshard
from zeroshard.comm.communicator import CollectiveTimeout
from zeroshard.comm.nccl_watchdog import Watchdog

POLL_S = 0.01
SHORT_TIMEOUT_S = 0.2  # cases that must wait for the deadline
LONG_TIMEOUT_S = 60.0  # cases that must fire (or not) long before the deadline
SLACK_S = 2.0  # generous: a loaded machine may deschedule the polling thread


class FakeCommunicator:
    """The two functions the watchdog calls on a communicator."""

    def __init__(self, abort_error: Exception = None) -> None:
        self.aborts = 0
        self.async_error_text = None
        self.async_error_queries = 0
        self.abort_error = abort_error
        self.on_abort = None

    def abort(self) -> None:
        self.aborts += 1
        if self.on_abort is not None:
            self.on_abort()
        if self.abort_error is not None:
            raise self.abort_error

    def async_error(self):
        self.async_error_queries += 1
        return self.async_error_text


class FakeCollective:
    def __init__(self, done: bool = False) -> None:
        self.finished = threading.Event()
        self.queries = 0
        if done:
            self.finished.set()

    def is_done(self) -> bool:
        self.queries += 1
        return self.finished.is_set()


@pytest.fixture
def make_watchdog():
    made = []

    def make(comm: FakeCommunicator, timeout_s: float = SHORT_TIMEOUT_S, rank: int = 3):
        watchdog = Watchdog(timeout_s=timeout_s, rank=rank, abort=comm.abort,
                            async_error=comm.async_error, poll_interval_s=POLL_S)
        made.append(watchdog)
        return watchdog

    yield make
    for watchdog in made:
        watchdog.close()


def wait_until(predicate, bound_s: float) -> bool:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(POLL_S)
    return predicate()


def watchdog_threads(rank: int):
    return [t for t in threading.enumerate() if t.name == f"zeroshard-nccl-watchdog-rank{rank}"]


def test_no_thread_before_first_track(make_watchdog):
    comm = FakeCommunicator()
    watchdog = make_watchdog(comm, rank=9001)
    watchdog.check()
    assert watchdog_threads(9001) == []
    watchdog.track("all_reduce", FakeCollective(done=True).is_done)
    [thread] = watchdog_threads(9001)
    assert thread.daemon


def test_finished_collectives_never_fire(make_watchdog):
    comm = FakeCommunicator()
    timeout_s = 1.0  # room for a loaded machine to finish `late` well inside its deadline
    watchdog = make_watchdog(comm, timeout_s=timeout_s)
    for _ in range(20):
        watchdog.track("all_reduce", FakeCollective(done=True).is_done)
    late = FakeCollective()
    watchdog.track("reduce_scatter", late.is_done)
    time.sleep(5 * POLL_S)
    late.finished.set()
    time.sleep(timeout_s + 20 * POLL_S)  # past every deadline
    watchdog.check()
    assert comm.aborts == 0


def test_stuck_collective_fires_within_timeout_and_aborts_once(make_watchdog):
    comm = FakeCommunicator()
    watchdog = make_watchdog(comm)
    start = time.monotonic()
    watchdog.track("all_gather", FakeCollective().is_done)
    assert wait_until(lambda: comm.aborts > 0, SHORT_TIMEOUT_S + SLACK_S)
    assert time.monotonic() - start >= SHORT_TIMEOUT_S  # never before the deadline
    time.sleep(20 * POLL_S)  # the thread has stopped: no second abort
    assert comm.aborts == 1


def test_check_raises_naming_kind_rank_timeout_every_time(make_watchdog):
    comm = FakeCommunicator()
    watchdog = make_watchdog(comm, rank=5)
    watchdog.track("all_gather", FakeCollective().is_done)
    assert wait_until(lambda: comm.aborts > 0, SHORT_TIMEOUT_S + SLACK_S)
    for _ in range(3):
        with pytest.raises(CollectiveTimeout) as raised:
            watchdog.check()
        message = str(raised.value)
        assert "all_gather on rank 5 did not complete" in message
        assert f"timeout_s={SHORT_TIMEOUT_S:g}" in message
        assert "peer rank" in message and "did not make" in message
        assert "communicator was aborted" in message
    assert zeroshard.CollectiveTimeout is CollectiveTimeout
    assert comm.aborts == 1


def test_async_error_fires_before_deadline_with_its_text(make_watchdog):
    comm = FakeCommunicator()
    watchdog = make_watchdog(comm, timeout_s=LONG_TIMEOUT_S)
    watchdog.track("reduce_scatter", FakeCollective().is_done)
    time.sleep(5 * POLL_S)
    assert comm.aborts == 0
    start = time.monotonic()
    comm.async_error_text = "remote process exited or there was a network error"
    assert wait_until(lambda: comm.aborts > 0, SLACK_S)
    assert time.monotonic() - start < LONG_TIMEOUT_S
    with pytest.raises(CollectiveTimeout, match="reduce_scatter on rank 3 failed: NCCL reported "
                       "an error: remote process exited or there was a network error"):
        watchdog.check()


def test_async_error_while_idle_names_the_last_collective(make_watchdog):
    comm = FakeCommunicator()
    watchdog = make_watchdog(comm, timeout_s=LONG_TIMEOUT_S)
    watchdog.track("broadcast", FakeCollective(done=True).is_done)
    comm.async_error_text = "unhandled system error"
    assert wait_until(lambda: comm.aborts > 0, SLACK_S)
    with pytest.raises(CollectiveTimeout, match=r"idle after broadcast\) on rank 3 failed.*"
                       "unhandled system error"):
        watchdog.check()


def test_abort_that_raises_is_reported(make_watchdog):
    comm = FakeCommunicator(abort_error=RuntimeError("ncclCommAbort: internal error 3"))
    watchdog = make_watchdog(comm)
    watchdog.track("all_reduce", FakeCollective().is_done)
    assert wait_until(lambda: comm.aborts > 0, SHORT_TIMEOUT_S + SLACK_S)
    with pytest.raises(CollectiveTimeout) as raised:
        watchdog.check()
    message = str(raised.value)
    assert "all_reduce on rank 3 did not complete" in message
    assert "aborting the communicator also failed: RuntimeError: ncclCommAbort: internal " \
           "error 3" in message
    assert comm.aborts == 1


def test_is_done_that_raises_fires(make_watchdog):
    def broken_event() -> bool:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    comm = FakeCommunicator()
    watchdog = make_watchdog(comm, timeout_s=LONG_TIMEOUT_S)
    watchdog.track("all_gather", broken_event)
    assert wait_until(lambda: comm.aborts > 0, SLACK_S)
    with pytest.raises(CollectiveTimeout, match="all_gather on rank 3 failed: checking whether "
                       "it finished raised RuntimeError: CUDA error: an illegal memory access"):
        watchdog.check()


def test_track_after_failure_raises(make_watchdog):
    comm = FakeCommunicator()
    watchdog = make_watchdog(comm)
    watchdog.track("all_reduce", FakeCollective().is_done)
    assert wait_until(lambda: comm.aborts > 0, SHORT_TIMEOUT_S + SLACK_S)
    with pytest.raises(CollectiveTimeout, match="all_reduce on rank 3"):
        watchdog.track("all_gather", FakeCollective(done=True).is_done)


def test_polling_stops_after_firing(make_watchdog):
    comm = FakeCommunicator()
    watchdog = make_watchdog(comm, rank=9002)
    watchdog.track("all_reduce", FakeCollective().is_done)
    assert wait_until(lambda: comm.aborts > 0, SHORT_TIMEOUT_S + SLACK_S)
    assert wait_until(lambda: watchdog_threads(9002) == [], SLACK_S)
    queries = comm.async_error_queries
    time.sleep(10 * POLL_S)
    assert comm.async_error_queries == queries


def test_many_in_flight_only_the_oldest_stuck(make_watchdog):
    comm = FakeCommunicator()
    watchdog = make_watchdog(comm)
    for _ in range(3):
        watchdog.track("all_gather", FakeCollective(done=True).is_done)
    stuck = FakeCollective()
    watchdog.track("reduce_scatter", stuck.is_done)
    newer = [FakeCollective(done=True) for _ in range(10)]
    for collective in newer:
        watchdog.track("all_gather", collective.is_done)
    assert wait_until(lambda: comm.aborts > 0, SHORT_TIMEOUT_S + SLACK_S)
    with pytest.raises(CollectiveTimeout, match="reduce_scatter on rank 3 did not complete"):
        watchdog.check()
    assert stuck.queries > 0
    # Behind an unfinished collective on the same stream nothing can have finished: unasked.
    assert all(collective.queries == 0 for collective in newer)


def test_close_is_idempotent_and_joins(make_watchdog):
    comm = FakeCommunicator()
    idle = make_watchdog(comm, rank=9003)
    idle.close()  # never started a thread
    idle.close()
    watchdog = make_watchdog(comm, rank=9004)
    watchdog.track("all_reduce", FakeCollective().is_done)
    [thread] = watchdog_threads(9004)
    watchdog.close()
    assert not thread.is_alive()
    watchdog.close()
    time.sleep(SHORT_TIMEOUT_S + 10 * POLL_S)  # past the deadline: closed means no abort
    assert comm.aborts == 0
    watchdog.check()
    with pytest.raises(RuntimeError, match="after close"):
        watchdog.track("all_reduce", FakeCollective().is_done)


def test_abort_may_close_its_own_watchdog(make_watchdog):
    comm = FakeCommunicator()
    watchdog = make_watchdog(comm)
    comm.on_abort = watchdog.close  # a communicator tearing itself down from abort()
    watchdog.track("all_reduce", FakeCollective().is_done)
    assert wait_until(lambda: comm.aborts > 0, SHORT_TIMEOUT_S + SLACK_S)
    with pytest.raises(CollectiveTimeout, match="all_reduce on rank 3 did not complete"):
        watchdog.check()


def test_dropped_watchdog_stops_its_thread():
    comm = FakeCommunicator()
    watchdog = Watchdog(timeout_s=LONG_TIMEOUT_S, rank=9005, abort=comm.abort,
                        async_error=comm.async_error, poll_interval_s=POLL_S)
    watchdog.track("all_reduce", FakeCollective(done=True).is_done)
    [thread] = watchdog_threads(9005)
    del watchdog
    gc.collect()
    thread.join(SLACK_S)
    assert not thread.is_alive()
    assert comm.aborts == 0


@pytest.mark.parametrize("name,value", [
    ("timeout_s", 0), ("timeout_s", -1.0), ("timeout_s", float("nan")),
    ("timeout_s", float("inf")), ("timeout_s", True), ("timeout_s", "600"),
    ("poll_interval_s", 0.0), ("poll_interval_s", None)])
def test_bad_seconds_are_refused(name, value):
    comm = FakeCommunicator()
    kwargs = dict(timeout_s=1.0, rank=0, abort=comm.abort, async_error=comm.async_error)
    kwargs[name] = value
    with pytest.raises(ValueError, match=re.escape(f"{name} must be a finite number of seconds "
                                                   f"> 0, got {value!r}")):
        Watchdog(**kwargs)


def test_bad_rank_and_callables_are_refused(make_watchdog):
    comm = FakeCommunicator()
    with pytest.raises(ValueError, match="rank must be an int >= 0, got -1"):
        Watchdog(timeout_s=1.0, rank=-1, abort=comm.abort, async_error=comm.async_error)
    with pytest.raises(TypeError, match="abort must be callable"):
        Watchdog(timeout_s=1.0, rank=0, abort=None, async_error=comm.async_error)
    with pytest.raises(TypeError, match="async_error must be callable"):
        Watchdog(timeout_s=1.0, rank=0, abort=comm.abort, async_error="no error")
    watchdog = make_watchdog(comm, rank=9006)
    with pytest.raises(ValueError, match="kind must name the collective"):
        watchdog.track("", FakeCollective().is_done)
    with pytest.raises(TypeError, match="is_done must be callable"):
        watchdog.track("all_reduce", True)
    assert watchdog_threads(9006) == []  # refused calls start nothing
