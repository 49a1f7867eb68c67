"""ZEROSHARD_SIMULATE_ASYNC=1 (see [Note: simulated asynchrony] in simulated_async.py).

Two kinds of test:
- the mode itself: jobs run late but in order, after the events they wait for; errors reach the
  waiter; the seed repeats the delays; poisoning only in this mode;
- removed waits: a wait the library needs is taken out (monkeypatched away in the rank process)
  and the run must come out wrong, while the same run with the wait matches the run without
  offload or with stage 2. These show that the mode would catch the missing wait on CPU that
  only a GPU could show before: the offload landing (D2H copy), the stage-3 unit gather, and the
  ring slot's fence (a slot reused while an offload copy still reads it).
CI also runs the stage 1-3, offload, drop-in and HF Trainer suites under this mode
(scripts/test.sh).
"""
from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_harness import run_distributed  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import TINY_BUCKET_MB, make_batches, mse_loss, param_snapshot, rank_slice  # noqa: E402

import zeroshard  # noqa: E402
from zeroshard.comm import simulated_async  # noqa: E402
from zeroshard.comm import communicator_factory  # noqa: E402
from zeroshard.comm.communicator import Work  # noqa: E402


@pytest.fixture
def simulated(monkeypatch):
    monkeypatch.setenv("ZEROSHARD_SIMULATE_ASYNC", "1")
    monkeypatch.setenv("ZEROSHARD_SIMULATE_ASYNC_SEED", "1234")


# ---- the mode ---------------------------------------------------------------------------------

def test_jobs_run_in_order_after_the_events_they_wait_for(simulated):
    first, second = (simulated_async.SimulatedStream("a"), simulated_async.SimulatedStream("b"))
    seen = []
    gate = threading.Event()
    blocker = first.submit(lambda: (gate.wait(5), seen.append("a0")))
    waits = second.submit(lambda: seen.append("b0"), after=[blocker])
    for i in range(1, 20):
        first.submit(lambda i=i: seen.append(f"a{i}"))
    time.sleep(0.02)
    assert not waits.query() and seen == [], "ran before the event it waits for"
    gate.set()
    waits.wait()
    first.synchronize()
    assert seen.index("b0") > seen.index("a0")
    assert [s for s in seen if s.startswith("a")] == [f"a{i}" for i in range(20)]


def test_a_jobs_error_reaches_whoever_waits_for_it(simulated):
    stream = simulated_async.SimulatedStream("errors")

    def fail():
        raise ValueError("copy failed")
    event = stream.submit(fail)
    with pytest.raises(ValueError, match="copy failed"):
        event.wait()
    after = stream.submit(lambda: None)  # the stream goes on
    after.wait()


def test_the_seed_repeats_the_delays(monkeypatch, simulated):
    def delays(seed):
        monkeypatch.setattr(simulated_async, "_seed", seed)
        monkeypatch.setattr(simulated_async, "_streams_made", 0)
        stream = simulated_async.SimulatedStream("seeded")
        return [stream._rng.uniform(0, 1) for _ in range(5)]
    assert delays(1234) == delays(1234)
    assert delays(99) != delays(1234)


def test_poison_only_in_simulated_mode(monkeypatch):
    t = torch.zeros(4)
    monkeypatch.setenv("ZEROSHARD_SIMULATE_ASYNC", "0")
    simulated_async.poison(t)
    assert torch.equal(t, torch.zeros(4))
    monkeypatch.setenv("ZEROSHARD_SIMULATE_ASYNC", "1")
    simulated_async.poison(t)
    assert torch.isnan(t).all()


def test_a_collective_reads_its_input_late_and_its_wait_makes_the_output_visible(simulated):
    from zeroshard.comm.simulated_communicator import SimulatedAsyncCommunicator, simulated_if_asked
    cpu = torch.device("cpu")
    comm = simulated_if_asked(communicator_factory.make_communicator(None, cpu), cpu)
    assert isinstance(comm, SimulatedAsyncCommunicator)
    full, part = torch.zeros(8), torch.arange(8.0)
    gate = threading.Event()
    comm.stream.submit(lambda: gate.wait(5))  # the stream is busy: the gather waits its turn
    work = comm.all_gather(full, part)
    part.fill_(-1.0)  # written after the launch: the collective reads this, as on a GPU stream
    assert torch.equal(full, torch.zeros(8)) and not work.is_completed()
    gate.set()
    work.wait()
    assert torch.equal(full, torch.full((8,), -1.0))


def test_a_collective_is_counted_as_itself_while_the_wrapped_one_runs_a_control_gather(simulated):
    # The stream thread may be inside the wrapped communicator's all_gather_control (its
    # _control flag up) when the main thread launches a bucket: the wrapper must count the
    # bucket's bytes as its own kind, never read the wrapped communicator's flag.
    from zeroshard.comm.simulated_communicator import simulated_if_asked
    cpu = torch.device("cpu")
    comm = simulated_if_asked(communicator_factory.make_communicator(None, cpu), cpu)
    comm.inner._control = True
    comm.all_gather(torch.zeros(8), torch.arange(8.0)).wait()
    assert comm.stats.calls["all_gather"] == 1 and comm.stats.payload_bytes["all_gather"] == 32
    assert comm.stats.control_bytes == 0


# ---- removed waits ----------------------------------------------------------------------------

STEPS = 3


def _train(stage, offload, rank, world_size, *, dtype=torch.float32):
    model = make_unit_net(0, dtype=dtype)
    opt = zeroshard.ZeroAdamW(model, stage=stage, lr=1e-2, weight_decay=0.1,
                              bucket_mb=TINY_BUCKET_MB, offload=offload)
    losses = []
    for tokens, target in make_batches(STEPS):
        tokens, target = rank_slice(tokens, rank, world_size), rank_slice(target, rank, world_size)
        opt.zero_grad()
        loss = mse_loss(model, tokens, target)
        opt.backward(loss)
        opt.step()
        losses.append(float(loss))
    with opt.full_params():
        return param_snapshot(model), losses


def _differs(a, b) -> bool:
    (params_a, losses_a), (params_b, losses_b) = a, b
    if any(l != l for l in losses_a + losses_b):  # noqa: E741 - a NaN loss
        return True
    return losses_a != losses_b or any(not torch.equal(params_a[k], params_b[k])
                                       for k in params_a)


def _removed_wait(rank, world_size, which):
    from zeroshard import zero_optimizer
    from zeroshard.sharding import bucket_reducer, param_units
    from zeroshard.offload import host_offload
    stage, offload = {"landing": (2, "cpu"), "gather": (3, None), "fence": (2, "cpu"),
                      "update": (3, "cpu")}[which]
    os.environ["ZEROSHARD_SIMULATE_ASYNC"] = "0"
    reference = _train(stage, None, rank, world_size)  # offload is bitwise the same stage
    os.environ["ZEROSHARD_SIMULATE_ASYNC"] = "1"
    os.environ.setdefault("ZEROSHARD_SIMULATE_ASYNC_SEED", "1234")
    with_wait = _train(stage, offload, rank, world_size)
    if which == "landing":
        host_offload.HostOffload._wait_landed = staticmethod(lambda event: None)
    elif which == "gather":
        finish, free = param_units.ParamUnits._finish_gather, param_units.ParamUnits.free
        dropped = {}

        def finish_without_waiting(self, u):
            tag_work, tags, work = u.pending
            dropped[id(u)] = work  # not waited before use (still before its memory is freed:
            u.pending = (tag_work, tags, Work())  # a write into freed memory would crash)
            finish(self, u)

        def free_after_the_write(self, u):
            work = dropped.pop(id(u), None)
            if work is not None:
                work.wait()
            free(self, u)
        param_units.ParamUnits._finish_gather = finish_without_waiting
        param_units.ParamUnits.free = free_after_the_write
    elif which == "fence":
        bucket_reducer.caller_wait = lambda event, device: None
    else:  # a unit's gather no longer waits for its deferred update and upload
        zero_optimizer.ZeroOptimizer._settle_groups = lambda self, groups: None
    without_wait = _train(stage, offload, rank, world_size)
    return _differs(with_wait, reference), _differs(without_wait, reference)


@pytest.mark.parametrize("which", ["landing", "gather", "fence", "update"])
def test_a_removed_wait_is_caught(which):
    """With the wait the run is exact; without it, what the side stream had not finished yet
    (the gradient on its way to the host, the unit's gathered parameters, a ring slot an offload
    copy still reads, a unit's parameters still being updated and uploaded when the next
    forward gathers it) comes out wrong."""
    for rank, (with_wait_differs, without_wait_differs) in enumerate(
            run_distributed(_removed_wait, 2, which, timeout_s=240)):
        assert not with_wait_differs, f"rank {rank}: {which}: the run with its wait is not exact"
        assert without_wait_differs, (f"rank {rank}: {which}: removing the wait went unseen; "
                                      "simulated asynchrony should have caught it")
