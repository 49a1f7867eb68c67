"""Hybrid sharding (shard_size=k): state partitioned within groups of k ranks, replicated across
the N/k groups; gradients reduce-scattered in the shard group, then all-reduced across replicas.

Against the torch.optim oracle at stages 1-3 (2x2, 1x4 and 2x3 ranks), every rank identical;
its memory is plain ZeRO's at world size k; its bytes are the formulas' (and with shard groups
on nodes, only the replica all-reduce crosses between nodes); what is not built yet is refused.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import zeroshard  # noqa: E402
from dist_harness import run_distributed  # noqa: E402
from test_zero_stage3 import _check_against_oracle  # noqa: E402
from zero_oracle import (TINY_BUCKET_MB, assert_params_close, assert_ranks_identical,  # noqa: E402
                         build_optimizer, make_batches, make_model, oracle_optimizer,
                         param_snapshot, train_oracle, train_rank)

STEPS = 4


def _train_stages(rank, world_size, shard_size, stages, extra):
    out = {}
    for stage in stages:
        model = make_model()
        opt = build_optimizer("zeroshard", "AdamW", model.parameters(), stage=stage,
                              bucket_mb=TINY_BUCKET_MB, shard_size=shard_size)
        train_rank(model, opt, make_batches(STEPS), rank, world_size, **extra)
        out[stage] = {"params": param_snapshot(model), "shard_world": opt.world_size,
                      "replicas": opt.groups.replicas}
    return out


def _oracle(extra):
    model = make_model()
    train_oracle(model, oracle_optimizer("AdamW", model.parameters()), make_batches(STEPS),
                 clip=extra.get("clip"))
    return param_snapshot(model)


@pytest.mark.parametrize("world_size,shard_size,extra", [
    (4, 2, {}),
    (4, 2, {"clip": 0.05, "micro_batches": 2, "use_no_sync": True}),
    (4, 4, {}),  # one group of every rank: plain ZeRO
    (6, 3, {}),
])
def test_stages_1_2_match_torch_optim(world_size, shard_size, extra):
    per_rank = run_distributed(_train_stages, world_size, shard_size, (1, 2), extra,
                               timeout_s=300)
    expected = _oracle(extra)
    for stage in (1, 2):
        runs = [r[stage] for r in per_rank]
        assert runs[0]["shard_world"] == shard_size
        assert runs[0]["replicas"] == world_size // shard_size
        assert_ranks_identical([r["params"] for r in runs], f"stage {stage} {shard_size}")
        assert_params_close(runs[0]["params"], expected,
                            f"stage {stage}, {world_size} ranks, shard_size {shard_size}")


@pytest.mark.parametrize("world_size,cfg", [
    (4, {"opt": {"shard_size": 2}}),
    (4, {"opt": {"shard_size": 2}, "clip": 0.05, "micro_batches": 2, "no_sync": True}),
    (4, {"opt": {"shard_size": 2, "node_size": 2}, "net": {"frozen_block": True}}),
    (6, {"opt": {"shard_size": 3}}),
])
def test_stage3_matches_torch_optim(world_size, cfg):
    _check_against_oracle(cfg, world_size)


def _report(rank, world_size, stage, shard_size, node_size):
    torch.manual_seed(0)
    model = make_model()
    kwargs = {} if shard_size is None else {"shard_size": shard_size}
    opt = zeroshard.ZeroAdamW(model, lr=1e-3, stage=stage, bucket_mb=TINY_BUCKET_MB,
                              node_size=node_size, **kwargs)
    for tokens, target in make_batches(2):
        opt.zero_grad()
        opt.reset_comm_stats()
        from zero_oracle import mse_loss, rank_slice
        mse_loss(model, rank_slice(tokens, rank, world_size),
                 rank_slice(target, rank, world_size)).backward()
        opt.step()
    report = opt.memory_report()
    return {"report": {k: report[k] for k in ("model_params", "grads", "master_params",
                                              "optimizer_state")},
            "stats": opt.comm_stats(),
            "grad_shard_bytes": sum(fg.shard_numel * 4 for fg in opt.flat_groups)}


@pytest.mark.parametrize("stage", [2, 3])
def test_memory_is_plain_zero_at_the_shard_size_and_bytes_follow_the_formulas(stage):
    hybrid = run_distributed(_report, 4, stage, "node", 2)
    plain2 = run_distributed(_report, 2, stage, None, None)
    for rank, out in enumerate(hybrid):
        assert out["report"] == plain2[rank % 2]["report"], (rank, out["report"])
        stats = out["stats"]
        # the replica all-reduce: each rank's reduced slice, over 2 replicas (ring: 2(R-1)/R)
        assert stats["all_reduce"]["payload_bytes"] == out["grad_shard_bytes"]
        assert stats["all_reduce"]["bytes_sent"] == out["grad_shard_bytes"]
        # shard groups are nodes: only the replica all-reduce crosses between them
        for kind, row in stats.items():
            assert row["inter_node_bytes"] == (row["bytes_sent"] if kind == "all_reduce" else 0)
        # within the node, what plain ZeRO does at 2 ranks
        for kind in ("reduce_scatter", "all_gather"):
            assert stats[kind]["bytes_sent"] == plain2[rank % 2]["stats"][kind]["bytes_sent"]


def _refused(rank, world_size, kwargs):
    try:
        zeroshard.ZeroAdamW(make_model(), lr=1e-3, **kwargs)
    except (ValueError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("kwargs,message", [
    ({"stage": 0, "shard_size": 2}, "stage 0 replicates everything"),
    ({"stage": 2, "shard_size": 3}, "does not divide the world size 4"),
    ({"stage": 2, "shard_size": "rack"}, "shard_size must be None"),
])
def test_combinations_not_built_are_refused_at_construction(kwargs, message):
    for answer in run_distributed(_refused, 4, kwargs):
        assert answer is not None and message in answer, answer


def _torch_idioms(rank, world_size):
    """A user's own loop: model.zero_grad(), loss.backward(), torch's clip_grad_norm_ on the
    model's parameters, opt.step(); saving on rank 0 only."""
    from zero_oracle import mse_loss, rank_slice
    model = make_model()
    opt = build_optimizer("zeroshard", "AdamW", model.parameters(), stage=2,
                          bucket_mb=TINY_BUCKET_MB, shard_size=2)
    norms = []
    for tokens, target in make_batches(STEPS):
        model.zero_grad(set_to_none=True)
        mse_loss(model, rank_slice(tokens, rank, world_size),
                 rank_slice(target, rank, world_size)).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05).clone())
        opt.step()
    if rank == 0:
        torch.save(opt.state_dict(), os.devnull)  # rank 0 alone: not a collective
    return param_snapshot(model), norms


def test_torch_clip_grad_norm_counts_replicas_once():
    expected_params, expected_norms = _oracle_with_norms(0.05)
    for params, norms in run_distributed(_torch_idioms, 4):
        assert_params_close(params, expected_params, "torch clip, shard_size=2")
        for got, want in zip(norms, expected_norms):
            torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


def _oracle_with_norms(clip):
    model = make_model()
    norms = train_oracle(model, oracle_optimizer("AdamW", model.parameters()),
                         make_batches(STEPS), clip=clip)
    return param_snapshot(model), norms
