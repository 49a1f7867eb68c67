"""state_dict round trip mid-training: save after k steps, build a fresh model and optimizer, load,
continue; the continuation must be bitwise identical (fp32) to the uninterrupted run, at the same
world size and stage. A fresh optimizer without loading must land elsewhere (the test can fail)."""
import io

import pytest
import torch

import zeroshard
from dist_harness import run_distributed
from zero_oracle import (assert_ranks_identical, build_optimizer, make_batches, make_model,
                         param_snapshot, train_rank)

requires_zero = pytest.mark.skipif(not hasattr(zeroshard, "ZeroAdamW"),
                                   reason="zeroshard.ZeroAdamW not implemented yet (issue 3)")
STEPS, SAVE_AT = 6, 3
STAGES = (0, 1, 2)
KINDS = ("AdamW", "SGD", "Adagrad")


def _new_run(impl, kind, stage, model_seed=0):
    model = make_model(seed=model_seed)
    opt = build_optimizer(impl, kind, model.parameters(), stage=stage)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, scheduler


def _round_trip(rank, world_size, impl, stages):
    batches = make_batches(STEPS)
    results = {}
    for stage in stages:
        for kind in KINDS:
            model, opt, scheduler = _new_run(impl, kind, stage)
            train_rank(model, opt, batches, rank, world_size, scheduler=scheduler)
            uninterrupted = param_snapshot(model)

            model, opt, scheduler = _new_run(impl, kind, stage)
            train_rank(model, opt, batches[:SAVE_AT], rank, world_size, scheduler=scheduler)
            buffer = io.BytesIO()  # through bytes, as a checkpoint file would be
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": scheduler.state_dict()}, buffer)
            saved_lrs = [g["lr"] for g in opt.param_groups]
            del model, opt, scheduler
            buffer.seek(0)
            checkpoint = torch.load(buffer, weights_only=False)

            model = make_model(seed=1)  # different init: everything must come from the checkpoint
            model.load_state_dict(checkpoint["model"])
            opt = build_optimizer(impl, kind, model.parameters(), stage=stage)
            scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            opt.load_state_dict(checkpoint["opt"])
            scheduler.load_state_dict(checkpoint["sched"])
            loaded_lrs = [g["lr"] for g in opt.param_groups]
            train_rank(model, opt, batches[SAVE_AT:], rank, world_size, scheduler=scheduler)
            resumed = param_snapshot(model)

            model = make_model(seed=1)  # same weights, but a fresh optimizer state
            model.load_state_dict(checkpoint["model"])
            opt = build_optimizer(impl, kind, model.parameters(), stage=stage)
            train_rank(model, opt, batches[SAVE_AT:], rank, world_size)
            results[f"stage{stage}/{kind}"] = {
                "uninterrupted": uninterrupted, "resumed": resumed,
                "not_loaded": param_snapshot(model), "saved_lrs": saved_lrs,
                "loaded_lrs": loaded_lrs}
    return results


def _check(per_rank, world_size):
    failures = []
    for key, result in per_rank[0].items():
        what = f"{key} ws={world_size}"
        try:
            assert result["loaded_lrs"] == result["saved_lrs"], f"{what}: lrs not restored"
            assert_ranks_identical([r[key]["resumed"] for r in per_rank], what)
            for name, expected in result["uninterrupted"].items():
                got = result["resumed"][name]
                assert torch.equal(got, expected), (
                    f"{what}: resumed {name} is not bitwise equal to the uninterrupted run "
                    f"(max diff {(got - expected).abs().max().item():.3g})")
            assert any(not torch.equal(result["not_loaded"][n], result["uninterrupted"][n])
                       for n in result["uninterrupted"]), f"{what}: optimizer state had no effect"
        except AssertionError as err:
            failures.append(str(err))
    assert not failures, "\n".join(failures)


@requires_zero
@pytest.mark.parametrize("world_size", [2, 3])
def test_state_dict_round_trip_continues_bitwise(world_size):
    _check(run_distributed(_round_trip, world_size, "zeroshard", STAGES, timeout_s=240), world_size)


def test_oracle_side_holds_for_reference_stand_in():
    _check(run_distributed(_round_trip, 2, "reference", (0,), timeout_s=120), 2)
