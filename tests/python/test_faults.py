"""Faults end in an error, not a hang: a rank that dies or stops responding mid-training makes
the survivors raise zeroshard.CollectiveTimeout within the optimizer's timeout_s; ranks built
with different settings fail at construction naming the difference."""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _gloo_ranks import check_all_ok, run_ranks  # noqa: E402
from test_checkpoint import GLOBAL_BATCH, Net, batch  # noqa: E402

import zeroshard  # noqa: E402

TIMEOUT_S = 4.0


def _train_until_fault(rank, world_size, fault, stage):
    torch.manual_seed(0)
    model = Net()
    # Stage 3: the dead rank is missed in the next forward's parameter all-gather.
    opt = zeroshard.ZeroAdamW(model if stage == 3 else model.parameters(), stage=stage,
                              timeout_s=TIMEOUT_S,
                              bucket_mb=71 * 4 / 2 ** 20)
    per = GLOBAL_BATCH // world_size
    for step in range(6):
        if rank == world_size - 1 and step == 3:
            if fault == "dies":
                os._exit(17)
            time.sleep(60)  # stops responding; the parent kills it afterwards
        x, y = batch(step)
        start = time.time()
        try:
            loss = torch.nn.functional.mse_loss(model(x[rank * per:(rank + 1) * per]),
                                                y[rank * per:(rank + 1) * per])
            opt.backward(loss)
            opt.step()
            opt.zero_grad()
        except zeroshard.CollectiveTimeout as e:
            return {"step": step, "seconds": time.time() - start, "message": str(e)}
    return None


@pytest.mark.parametrize("fault,stage", [("dies", 2), ("hangs", 1), ("dies", 3)])
def test_survivors_raise_collective_timeout(fault, stage):
    out = run_ranks(_train_until_fault, 3, fault, stage, timeout=60, expect=2)
    survivors = check_all_ok({r: v for r, v in out.items() if r < 2})
    for rank, report in survivors.items():
        assert report is not None, f"rank {rank} finished training without noticing the fault"
        assert report["step"] == 3
        assert f"on rank {rank}" in report["message"] and f"timeout_s={TIMEOUT_S}" in report["message"]
        assert any(k in report["message"] for k in ("reduce_scatter", "all_gather", "all_reduce"))
        assert report["seconds"] < TIMEOUT_S + 5, report
        if fault == "hangs":  # nothing fails fast when the peer is alive: the timeout fires
            assert report["seconds"] >= TIMEOUT_S * 0.9, report
        print(f"{fault}: rank {rank} raised after {report['seconds']:.2f}s: "
              f"{report['message'][:120]}")


def test_timeout_s_is_validated():
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        zeroshard.ZeroAdamW(Net().parameters(), timeout_s=0)


def _disagree(rank, world_size):
    torch.manual_seed(0)
    messages = {}
    cases = {
        "stage": dict(stage=1 + rank),
        "bucket_mb": dict(bucket_mb=1 + rank),
        "params": dict(),
    }
    for what, kwargs in cases.items():
        model = Net()
        if what == "params" and rank == 1:
            model.b = torch.nn.Linear(13, 6)
        try:
            zeroshard.ZeroAdamW(model.parameters(), **kwargs)
            messages[what] = None
        except ValueError as e:
            messages[what] = str(e)
    return messages


def test_ranks_disagreeing_on_configuration_name_the_difference():
    results = check_all_ok(run_ranks(_disagree, 2, timeout=60))
    for rank, messages in results.items():
        assert "ranks disagree on stage: rank 0 has 1, rank 1 has 2" in messages["stage"]
        assert "ranks disagree on bucket_mb: rank 0 has 1.0, rank 1 has 2.0" in messages["bucket_mb"]
        assert "ranks disagree on parameter 3" in messages["params"]
        assert "shape (5, 13)" in messages["params"] and "shape (6, 13)" in messages["params"]
