"""Gradient accumulation: k micro-batches per step on every rank, with and without `opt.no_sync()`,
equal one full batch in the oracle; and `no_sync` really sends nothing."""
import pytest
import torch

import zeroshard
from dist_harness import run_distributed
from zero_oracle import (assert_params_close, assert_ranks_identical, build_optimizer,
                         make_batches, make_model, mse_loss, oracle_optimizer, param_snapshot,
                         rank_slice, train_oracle, train_rank)

requires_zero = pytest.mark.skipif(not hasattr(zeroshard, "ZeroAdamW"),
                                   reason="zeroshard.ZeroAdamW not implemented yet (issue 3)")
STEPS = 5
STAGES = (0, 1, 2)
# (micro-batches per step, use no_sync for all but the last backward)
VARIANTS = ((2, True), (4, True), (2, False))


def _total_calls(stats) -> int:
    return sum(entry["calls"] for entry in stats.values())


def _accumulate(rank, world_size, impl, stages):
    results = {}
    for stage in stages:
        for micro_batches, use_no_sync in VARIANTS:
            model = make_model()
            opt = build_optimizer(impl, "AdamW", model.parameters(), stage=stage)
            train_rank(model, opt, make_batches(STEPS), rank, world_size,
                       micro_batches=micro_batches, use_no_sync=use_no_sync)
            results[f"stage{stage}/k{micro_batches}/no_sync={use_no_sync}"] = param_snapshot(model)
        if impl == "zeroshard":
            results[f"stage{stage}/calls"] = _calls_inside_and_after_no_sync(rank, world_size, stage)
    return results


def _calls_inside_and_after_no_sync(rank, world_size, stage):
    model = make_model()
    opt = build_optimizer("zeroshard", "AdamW", model.parameters(), stage=stage)
    tokens, target = make_batches(1)[0]
    tokens, target = rank_slice(tokens, rank, world_size), rank_slice(target, rank, world_size)
    opt.zero_grad(set_to_none=True)
    opt.reset_comm_stats()
    with opt.no_sync():
        mse_loss(model, tokens[:2], target[:2]).backward()
    inside = _total_calls(opt.comm_stats())
    mse_loss(model, tokens[2:], target[2:]).backward()
    opt.step()
    return {"inside_no_sync": inside, "backward_and_step": _total_calls(opt.comm_stats())}


def _check(per_rank, world_size):
    model = make_model()
    train_oracle(model, oracle_optimizer("AdamW", model.parameters()), make_batches(STEPS))
    expected = param_snapshot(model)
    failures = []
    for key in per_rank[0]:
        if key.endswith("/calls"):
            continue
        try:
            assert_ranks_identical([r[key] for r in per_rank], f"{key} ws={world_size}")
            assert_params_close(per_rank[0][key], expected, f"{key} ws={world_size}")
        except AssertionError as err:
            failures.append(str(err))
    assert not failures, "\n".join(failures)


@requires_zero
@pytest.mark.parametrize("world_size", [2, 3])
def test_accumulation_matches_one_big_batch(world_size):
    per_rank = run_distributed(_accumulate, world_size, "zeroshard", STAGES, timeout_s=240)
    _check(per_rank, world_size)
    for rank, result in enumerate(per_rank):
        for stage in STAGES:
            calls = result[f"stage{stage}/calls"]
            assert calls["inside_no_sync"] == 0, f"stage {stage} rank {rank} communicated in no_sync"
            assert calls["backward_and_step"] > 0, f"stage {stage} rank {rank} never reduced"


def test_oracle_side_holds_for_reference_stand_in():
    per_rank = run_distributed(_accumulate, 3, "reference", (0,), timeout_s=120)
    _check(per_rank, 3)


def _no_sync_once_then_reducing_backwards(rank, world_size, stage, offload):
    """The first step accumulates inside no_sync (which gives stages 0/2 a local gradient
    buffer for good); the later ones run two reducing backwards a step, clipped. Each
    backward's gradients go into that local buffer while the previous backward's collectives
    may still read it: the reducer finishes those first."""
    model = make_model()
    opt = build_optimizer("zeroshard", "AdamW", model.parameters(), stage=stage, offload=offload)
    batches = make_batches(STEPS)
    norms = train_rank(model, opt, batches[:1], rank, world_size, micro_batches=2,
                       use_no_sync=True, clip=0.05)
    norms += train_rank(model, opt, batches[1:], rank, world_size, micro_batches=2,
                        use_no_sync=False, clip=0.05)
    return param_snapshot(model), torch.stack(norms)


@requires_zero
@pytest.mark.parametrize("stage,offload", [(0, None), (1, None), (1, "cpu"), (2, None),
                                           (2, "cpu")])
def test_several_reducing_backwards_after_no_sync_match_the_oracle(stage, offload):
    model = make_model()
    expected_norms = torch.stack(train_oracle(model, oracle_optimizer("AdamW", model.parameters()),
                                              make_batches(STEPS), clip=0.05))
    per_rank = run_distributed(_no_sync_once_then_reducing_backwards, 2, stage, offload)
    assert_ranks_identical([params for params, _ in per_rank], f"stage {stage}")
    for params, norms in per_rank:
        torch.testing.assert_close(norms, expected_norms, rtol=1e-5, atol=0)
        assert_params_close(params, param_snapshot(model), f"stage {stage} offload={offload}")
