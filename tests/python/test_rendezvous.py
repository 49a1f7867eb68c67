"""A zeroshard call made on some ranks only ends in a clear error on every rank, never a hang.

checkpoint.save under `if rank == 0:` makes rank 0 and a training rank 1 raise at once (rank 1
through Rendezvous.poll, called here as the optimizer's step will call it); with rank 1 idle,
rank 0 raises after timeout_s naming rank 1. The object collectives time out on a hung peer and
fail on a dead one. Ranks are gloo processes on CPU: dist_harness.run_distributed (a FileStore)
where every rank returns, _gloo_ranks.run_ranks (a TCPStore) where a rank dies or hangs, since
it collects the survivors' reports and kills the rest.
"""
from __future__ import annotations

import os
import re
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _gloo_ranks import check_all_ok, run_ranks  # noqa: E402
from dist_harness import run_distributed  # noqa: E402
from test_checkpoint import GLOBAL_BATCH, TINY_BUCKET_MB, Net, batch  # noqa: E402

import zeroshard  # noqa: E402
from zeroshard.comm.rendezvous import CollectiveCallError, rendezvous_for  # noqa: E402

LONG_TIMEOUT_S = 60.0  # fail-fast cases must raise well before this
SHORT_TIMEOUT_S = 3.0  # cases that must wait for the timeout


def _make(stage: int, timeout_s: float, seed: int = 0):
    torch.manual_seed(seed)
    model = Net()
    opt = zeroshard.ZeroAdamW(model.parameters(), lr=1e-2, stage=stage, timeout_s=timeout_s,
                              bucket_mb=TINY_BUCKET_MB)
    return model, opt


def _train(model, opt, steps, rank, world_size):
    """A training loop whose optimizer step polls, as ZeroOptimizer.step will."""
    per = GLOBAL_BATCH // world_size
    for step in range(steps):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x[rank * per:(rank + 1) * per]),
                                            y[rank * per:(rank + 1) * per])
        loss.backward()
        rendezvous_for(opt.process_group, opt.timeout_s).poll("ZeroAdamW.step")
        opt.step()
        opt.zero_grad()


def _raised(fn):
    start = time.monotonic()
    try:
        fn()
    except zeroshard.CollectiveTimeout as e:  # CollectiveCallError is one
        return {"type": type(e).__name__, "message": str(e), "seconds": time.monotonic() - start}
    return None


def _save_on_rank0_while_rank1_trains(rank, world_size, root):
    model, opt = _make(2, LONG_TIMEOUT_S)
    _train(model, opt, 2, rank, world_size)
    if rank == 0:
        return _raised(lambda: zeroshard.checkpoint.save(os.path.join(root, "ck"), model=model,
                                                         optimizer=opt))
    rendezvous = rendezvous_for(opt.process_group, opt.timeout_s)

    def training_goes_on():
        for _ in range(int(LONG_TIMEOUT_S / 0.05)):
            rendezvous.poll("ZeroAdamW.step")
            time.sleep(0.05)  # the step's compute; its collectives would block, so none here
    return _raised(training_goes_on)


def test_save_on_rank0_only_fails_fast_on_both_ranks(tmp_path):
    saver, trainer = run_distributed(_save_on_rank0_while_rank1_trains, 2, str(tmp_path))
    assert saver is not None and trainer is not None, (saver, trainer)
    assert saver["type"] == trainer["type"] == "CollectiveCallError"
    # Rank 1's poll either comes after rank 0 entered (rank 1 raises first, "reached ...
    # instead") or before (rank 0 sees it went past); either way both raise at once.
    assert re.match(r"zeroshard\.checkpoint\.save was called on rank 0 but rank 1 (reached "
                    r"ZeroAdamW\.step instead|went on past it without calling it \(.*\)): every "
                    r"rank must call save\(\), not only rank 0$", saver["message"]), saver
    assert re.match(r"rank 0 (is waiting in|called) zeroshard\.checkpoint\.save.*, which every "
                    r"rank must call; this rank \(1\) reached ZeroAdamW\.step instead",
                    trainer["message"]), trainer
    for report in (saver, trainer):
        assert report["seconds"] < LONG_TIMEOUT_S / 2, report
    assert not os.path.exists(tmp_path / "ck" / "LATEST")  # nothing committed


def _save_on_rank0_after_rank1_went_on(rank, world_size, root):
    model, opt = _make(2, LONG_TIMEOUT_S)
    _train(model, opt, 1, rank, world_size)
    rendezvous = rendezvous_for(opt.process_group, opt.timeout_s)
    went_on, saved = os.path.join(root, "rank1-went-on"), os.path.join(root, "rank0-saved")
    if rank == 0:
        while not os.path.exists(went_on):  # rank 0 is slower: it evaluates, logs...
            time.sleep(0.05)
        report = _raised(lambda: zeroshard.checkpoint.save(os.path.join(root, "ck"), model=model,
                                                           optimizer=opt))
        open(saved, "w").close()
        return report
    rendezvous.poll("ZeroAdamW.step")  # the next step, before rank 0 called save()
    open(went_on, "w").close()
    while not os.path.exists(saved):  # blocked in that step (a collective rank 0 never joins)
        time.sleep(0.05)
    return _raised(lambda: rendezvous.poll("ZeroAdamW.step"))


def test_save_on_rank0_after_peer_went_on_fails_fast(tmp_path):
    saver, trainer = run_distributed(_save_on_rank0_after_rank1_went_on, 2, str(tmp_path))
    assert saver is not None and saver["type"] == "CollectiveCallError", saver
    assert saver["message"] == (
        "zeroshard.checkpoint.save was called on rank 0 but rank 1 went on past it without "
        "calling it (they are already in a later training step): every rank must call save(), "
        "not only rank 0"), saver
    assert saver["seconds"] < LONG_TIMEOUT_S / 2, saver
    assert trainer is not None and trainer["message"].startswith(
        "rank 0 called zeroshard.checkpoint.save (rank 1 went on past it without calling it), "
        "which every rank must call; this rank (1) reached ZeroAdamW.step instead"), trainer


def _save_on_rank0_while_rank1_idles(rank, world_size, root):
    model, opt = _make(1, SHORT_TIMEOUT_S)
    _train(model, opt, 1, rank, world_size)
    done = os.path.join(root, "rank0-done")
    if rank == 0:
        report = _raised(lambda: zeroshard.checkpoint.save(os.path.join(root, "ck"), model=model,
                                                           optimizer=opt))
        again = _raised(lambda: zeroshard.checkpoint.save(os.path.join(root, "ck"), model=model,
                                                          optimizer=opt))
        open(done, "w").close()
        return report, again
    while not os.path.exists(done):  # idle: no poll, no collective, until rank 0 has given up
        time.sleep(0.05)
    # Back to training: the step's poll learns that rank 0 called save without it.
    return _raised(lambda: rendezvous_for(opt.process_group, opt.timeout_s).poll("ZeroAdamW.step"))


def test_save_on_rank0_with_idle_peer_raises_after_timeout(tmp_path):
    (report, again), late = run_distributed(_save_on_rank0_while_rank1_idles, 2, str(tmp_path))
    assert report is not None and report["type"] == "CollectiveCallError", report
    assert report["message"].startswith(
        f"zeroshard.checkpoint.save was called on rank 0 but ranks [1] did not call it within "
        f"{SHORT_TIMEOUT_S:g} s: every rank must call save(), not only rank 0"), report["message"]
    # The ranks are out of step now: a second save refuses at once instead of waiting again.
    assert again is not None and "out of step" in again["message"], again
    assert late is not None and late["type"] == "CollectiveCallError", late
    assert "rank 0 called zeroshard.checkpoint.save (rank 0 gave up waiting for it after 3 s)" \
        in late["message"] and "this rank (1) reached ZeroAdamW.step" in late["message"], late


def _roundtrip(rank, world_size, root, stage):
    out = {}
    model, opt = _make(stage, LONG_TIMEOUT_S)
    _train(model, opt, 2, rank, world_size)
    path = os.path.join(root, "ck")
    zeroshard.checkpoint.save(path, model=model, optimizer=opt, extra={"step": 2})
    resumed, resumed_opt = _make(stage, LONG_TIMEOUT_S, seed=1)
    out["extra"] = zeroshard.checkpoint.load(path, model=resumed, optimizer=resumed_opt)
    saved, loaded = model.state_dict(), resumed.state_dict()
    out["model_equal"] = all(torch.equal(saved[k], loaded[k]) for k in saved)
    a, _ = opt.checkpoint_state(0)
    b, _ = resumed_opt.checkpoint_state(0)
    out["optimizer_equal"] = all(torch.equal(a[k], b[k]) for k in a)
    # Polls after matched calls do not fire, and training goes on over both optimizers.
    _train(model, opt, 2, rank, world_size)
    _train(resumed, resumed_opt, 2, rank, world_size)
    out["trained_equal"] = all(torch.equal(model.state_dict()[k], resumed.state_dict()[k])
                               for k in saved)
    # Model only, over the default group, with the keyword timeout.
    zeroshard.checkpoint.save(os.path.join(root, "model"), model=model, timeout_s=30)
    fresh = Net()
    zeroshard.checkpoint.load(os.path.join(root, "model"), model=fresh, timeout_s=30)
    out["model_only_equal"] = all(torch.equal(model.state_dict()[k], v)
                                  for k, v in fresh.state_dict().items())
    return out


@pytest.mark.parametrize("world_size,stage", [(2, 2), (3, 0)])
def test_save_and_load_on_every_rank_still_round_trip(tmp_path, world_size, stage):
    for rank, out in enumerate(run_distributed(_roundtrip, world_size, str(tmp_path), stage)):
        assert out == {"extra": {"step": 2}, "model_equal": True, "optimizer_equal": True,
                       "trained_equal": True, "model_only_equal": True}, (rank, out)


def _object_collectives_with_hung_peer(rank, world_size, root):
    done = os.path.join(root, "rank0-done")
    if rank == 1:  # hung: alive, in no collective, until rank 0 has given up
        while not os.path.exists(done):
            time.sleep(0.05)
        os._exit(0)  # ends the pending collectives of rank 0 so that it exits
    rendezvous = rendezvous_for(None, SHORT_TIMEOUT_S)
    gathered = _raised(lambda: rendezvous.all_gather_object({"rank": rank}))
    broadcast = _raised(lambda: rendezvous.broadcast_object("token"))
    open(done, "w").close()
    return gathered, broadcast


def test_object_collectives_time_out_on_a_hung_peer(tmp_path):
    out = run_ranks(_object_collectives_with_hung_peer, 2, str(tmp_path), expect=1)
    gathered, broadcast = check_all_ok(out)[0]
    for report, kind in ((gathered, "all_gather_object"), (broadcast, "broadcast_object")):
        assert report is not None and report["type"] == "CollectiveTimeout", report
        assert kind in report["message"] and "on rank 0" in report["message"], report
        assert f"timeout_s={SHORT_TIMEOUT_S}" in report["message"], report
        assert "zeroshard.checkpoint.save called on rank 0 only" in report["message"], report


def _dying_mid_save(rank, world_size, root, where):
    model, opt = _make(2, SHORT_TIMEOUT_S)
    _train(model, opt, 1, rank, world_size)
    if rank == 1 and where == "before save":
        os._exit(3)
    if rank == 1:  # dies while writing its shard, after the ranks agreed on the snapshot

        def die(*args, **kwargs):
            os._exit(3)
        zeroshard.checkpoint.sharded_files._write_rank_file = die
    return _raised(lambda: zeroshard.checkpoint.save(os.path.join(root, "ck"), model=model,
                                                     optimizer=opt))


@pytest.mark.parametrize("where", ["before save", "inside save"])
def test_dead_peer_ends_in_an_error_not_a_hang(tmp_path, where):
    report = check_all_ok(run_ranks(_dying_mid_save, 2, str(tmp_path), where, expect=1))[0]
    assert report is not None, "rank 0 saved although rank 1 died"
    if where == "before save":
        assert report["type"] == "CollectiveCallError", report
        assert "but ranks [1] did not call it" in report["message"], report
    else:
        assert report["type"] == "CollectiveTimeout", report
        assert "all_gather_object in zeroshard.checkpoint.save did not complete on rank 0" \
            in report["message"], report
    assert not os.path.exists(tmp_path / "ck" / "LATEST")


def test_world_size_1_is_a_no_op():
    rendezvous = rendezvous_for(None, 1.0)  # torch.distributed is not initialised here
    rendezvous.enter("zeroshard.checkpoint.save")
    rendezvous.poll("ZeroAdamW.step")
    assert rendezvous.all_gather_object({"a": 1}) == [{"a": 1}]
    assert rendezvous.broadcast_object("x") == "x"
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        rendezvous_for(None, 0)
    with pytest.raises(ValueError, match="op must be the name of the call"):
        rendezvous.enter("")


def _save_on_rank0_load_on_rank1(rank, world_size, root):
    model, opt = _make(1, LONG_TIMEOUT_S)
    path = os.path.join(root, "ck")
    if rank == 0:
        return _raised(lambda: zeroshard.checkpoint.save(path, model=model, optimizer=opt))
    return _raised(lambda: zeroshard.checkpoint.load(path, model=model, optimizer=opt))


def test_different_calls_on_different_ranks_fail_fast(tmp_path):
    reports = run_distributed(_save_on_rank0_load_on_rank1, 2, str(tmp_path))
    assert all(r is not None and r["type"] == "CollectiveCallError" for r in reports), reports
    # Whichever rank came second sees the other's call; the first learns it was abandoned.
    second = [r for r in reports if "in the same order" in r["message"]]
    assert len(second) == 1, reports
    assert any("but rank" in r["message"] and "instead" in r["message"] for r in reports), reports
    assert all(r["seconds"] < LONG_TIMEOUT_S / 2 for r in reports), reports
