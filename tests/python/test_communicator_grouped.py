"""Communicator.all_gather_buckets (the grouped all-gather of one optimizer step) and the CPU-
testable parts of NcclCommunicator's wiring: which device the unique-id bootstrap uses, the
device index, and _CudaWork asking the watchdog before it joins streams.

The NCCL path itself (one ncclGroupStart/End around the buckets, the watchdog aborting a stuck
communicator) needs GPUs: tests/python/test_gpu_nccl.py covers one GPU; a dead peer needs two.
"""
from __future__ import annotations

import time

import pytest
import torch

from dist_harness import run_distributed
from zeroshard import CollectiveTimeout
from zeroshard.comm import communicator, nccl_communicator
from zeroshard.comm.communicator import LocalCommunicator, ProcessGroupCommunicator
from zeroshard.comm.nccl_communicator import _CudaWork, _LaunchRecord


def _buckets(world_size: int, rank: int):
    """Two flat buffers of different dtypes, awkward sizes; each bucket's part is this rank's
    slice of it (in place, as ZeroOptimizer gathers), filled with rank-specific values."""
    pairs, expected = [], []
    for numel_per_rank, dtype in ((7, torch.float32), (13, torch.bfloat16), (1, torch.float32)):
        full = torch.full((numel_per_rank * world_size,), -1.0, dtype=dtype)
        part = full[rank * numel_per_rank:(rank + 1) * numel_per_rank]
        part.copy_(torch.arange(numel_per_rank, dtype=dtype) + 100 * rank)
        pairs.append((full, part))
        expected.append(torch.cat([torch.arange(numel_per_rank, dtype=dtype) + 100 * r
                                   for r in range(world_size)]))
    return pairs, expected


def test_local_all_gather_buckets_counts_each_bucket():
    comm = LocalCommunicator()
    pairs, expected = _buckets(1, 0)
    work = comm.all_gather_buckets(pairs)
    work.wait()
    assert work.is_completed()
    for (full, _), want in zip(pairs, expected):
        assert torch.equal(full, want)
    assert comm.stats.calls["all_gather"] == 3
    assert comm.stats.payload_bytes["all_gather"] == 7 * 4 + 13 * 2 + 1 * 4


def test_all_gather_buckets_rejects_a_bad_pair_before_launching_any():
    comm = LocalCommunicator()
    good_full = torch.zeros(4)
    with pytest.raises(ValueError, match="collective sizes disagree"):
        comm.all_gather_buckets([(good_full, good_full), (torch.zeros(5), torch.zeros(4))])
    assert comm.stats.calls["all_gather"] == 0


def _gather_on_ranks(rank, world_size):
    comm = ProcessGroupCommunicator(None, timeout_s=60.0)
    pairs, expected = _buckets(world_size, rank)
    comm.all_gather_buckets(pairs).wait()
    return {"ok": [torch.equal(full, want) for (full, _), want in zip(pairs, expected)],
            "stats": comm.stats.as_dict()["all_gather"],
            "object_device": communicator._object_collective_device(
                None, torch.device("cuda", 1))}


@pytest.mark.parametrize("world_size", [2, 3])
def test_process_group_all_gather_buckets(world_size):
    results = run_distributed(_gather_on_ranks, world_size, timeout_s=90)
    payload = (7 * 4 + 13 * 2 + 1 * 4) * world_size
    for r in results:
        assert r["ok"] == [True, True, True]
        assert r["stats"]["calls"] == 3 and r["stats"]["payload_bytes"] == payload
        assert r["object_device"] is None  # gloo: torch's CPU default, never a GPU


def _gather_in_place_on_ranks(rank, world_size, by_broadcast=True):
    """all_gather_in_place of each bucket of _buckets (gloo: one broadcast per rank; across
    nodes gloo's ring gather of a copy), against all_gather_buckets' result and counters for
    the same buffers."""
    comm = ProcessGroupCommunicator(None, timeout_s=60.0)
    comm.gather_by_broadcast = by_broadcast
    pairs, expected = _buckets(world_size, rank)
    works = [comm.all_gather_in_place(full) for full, _ in pairs]
    for work in works:
        work.wait()
    refused = None
    try:
        comm.all_gather_in_place(torch.zeros(world_size * 3 + 1))
    except ValueError as e:
        refused = str(e)
    return {"ok": [torch.equal(full, want) for (full, _), want in zip(pairs, expected)],
            "done": all(w.is_completed() for w in works),
            "stats": comm.stats.as_dict()["all_gather"], "refused": refused,
            "copies": comm.all_gather_in_place_copies}


@pytest.mark.parametrize("by_broadcast", [True, False])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_process_group_all_gather_in_place_fills_every_slice_and_counts_an_all_gather(
        world_size, by_broadcast):
    results = run_distributed(_gather_in_place_on_ranks, world_size, by_broadcast,
                              timeout_s=90)
    ring = run_distributed(_gather_on_ranks, world_size, timeout_s=90)
    for r, by_ring in zip(results, ring):
        assert r["ok"] == [True, True, True] and r["done"]
        assert r["stats"] == by_ring["stats"]  # the same calls and bytes as the ring gather
        assert r["refused"] is not None and "equal slices" in r["refused"]
        assert r["copies"] is not by_broadcast


def _gathers_by_broadcast_within_a_node(rank, world_size, node_size):
    from zeroshard.comm.communicator_factory import make_communicator
    from zeroshard.comm.topology import topology_of
    comm = make_communicator(None, torch.device("cpu"), None, topology_of(world_size, node_size))
    return comm.gather_by_broadcast


def test_a_group_spanning_nodes_keeps_the_ring_gather():
    """Broadcasts send each slice over the slow link to every remote rank; the ring (which
    comm_stats' inter-node bytes model) stays where the group spans nodes."""
    assert run_distributed(_gathers_by_broadcast_within_a_node, 2, 2) == [True, True]
    assert run_distributed(_gathers_by_broadcast_within_a_node, 2, 1) == [False, False]


def test_local_all_gather_in_place_is_the_buffer_itself():
    comm = LocalCommunicator()
    full = torch.arange(5.0)
    comm.all_gather_in_place(full).wait()
    assert torch.equal(full, torch.arange(5.0)) and comm.stats.calls["all_gather"] == 1


@pytest.mark.parametrize("backend, expected", [
    ("nccl", torch.device("cuda", 3)),
    ("cpu:gloo,cuda:nccl", None),  # torch picks CPU when gloo serves the group
    ("gloo", None),
])
def test_object_collective_device_names_the_parameters_gpu_for_nccl(monkeypatch, backend,
                                                                    expected):
    monkeypatch.setattr(communicator.dist, "get_backend", lambda group=None: backend)
    assert communicator._object_collective_device(None, torch.device("cuda", 3)) == expected


def test_cuda_device_keeps_the_given_index_and_refuses_cpu():
    assert nccl_communicator._cuda_device(torch.device("cuda", 5)) == torch.device("cuda", 5)
    assert nccl_communicator._cuda_device("cuda:2").index == 2
    with pytest.raises(ValueError, match="CUDA device"):
        nccl_communicator._cuda_device(torch.device("cpu"))


class _FakeEvent:
    def __init__(self, done: bool) -> None:
        self.done = done

    def query(self) -> bool:
        return self.done


def test_cuda_work_wait_raises_the_watchdogs_timeout_before_joining_streams():
    def fired():
        raise CollectiveTimeout("all_gather on rank 1 did not complete (timeout_s=5)")

    work = _CudaWork(_FakeEvent(False), torch.device("cuda", 0), fired)
    with pytest.raises(CollectiveTimeout, match="all_gather on rank 1"):
        work.wait()  # raises before torch.cuda is touched (there is no GPU here)


def test_launch_record_is_not_done_until_its_event_is_recorded_and_finished():
    record = _LaunchRecord()
    assert not record.is_done()  # the NCCL call has not returned yet
    record.event = _FakeEvent(False)
    assert not record.is_done()
    record.event.done = True
    assert record.is_done()


class _FakeComm:
    """What the watchdog needs of a communicator: abort() (counted) and async_error()."""

    def __init__(self, error=None) -> None:
        self.error, self.aborted = error, 0

    def abort(self):
        self.aborted += 1

    def async_error(self):
        return self.error


def test_make_watchdog_wires_the_communicators_abort_and_async_error():
    pytest.importorskip("zeroshard.comm.nccl_watchdog")
    comm = _FakeComm("ncclRemoteError: remote process exited")
    watchdog = nccl_communicator._make_watchdog(comm, 2, 30.0)
    try:
        record = _LaunchRecord()
        watchdog.track("all_reduce", record.is_done)
        with pytest.raises(CollectiveTimeout, match="rank 2"):
            for _ in range(200):  # the polling thread sees the async error within a poll
                watchdog.check()
                time.sleep(0.02)
        assert comm.aborted == 1
    finally:
        watchdog.close()


def test_an_abandoned_launch_record_never_fires_the_watchdog():
    """A launch that raised (NcclCommunicator._launch marks its record abandoned) leaves nothing
    in flight: the watchdog must not time it out and abort a healthy communicator later. The
    same record not abandoned does fire: the check can fail."""
    pytest.importorskip("zeroshard.comm.nccl_watchdog")
    for abandoned in (True, False):
        comm = _FakeComm()
        watchdog = nccl_communicator._make_watchdog(comm, 0, 0.2)
        try:
            record = _LaunchRecord()
            record.abandoned = abandoned
            watchdog.track("reduce_scatter", record.is_done)
            fired = False
            for _ in range(40):
                try:
                    watchdog.check()
                except CollectiveTimeout:
                    fired = True
                    break
                time.sleep(0.025)
            assert fired is not abandoned and comm.aborted == (0 if abandoned else 1)
        finally:
            watchdog.close()
