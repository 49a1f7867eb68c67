"""Stage 3 (parameters partitioned, gathered unit by unit) against the stock torch.optim oracle.

Each sharded run trains UnitNet (blocks in a ModuleList, a tied embedding/head, awkward sizes)
on gloo ranks, each rank on its slice of the batch; the oracle trains the same model on the
whole batch in one process. Stage 3 must match it as stages 1-2 do, through the idioms of real
scripts: clipping, accumulation with no_sync, activation checkpointing, a module called twice,
frozen blocks, param groups, evaluation between steps.
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_harness import run_distributed  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import (OPTIMIZERS, SMALL_BUCKET_MB, TINY_BUCKET_MB, assert_params_close,  # noqa: E402
                         assert_ranks_identical, make_batches, mse_loss, oracle_optimizer,
                         param_snapshot, rank_slice, train_oracle)

import zeroshard  # noqa: E402

STEPS = 3


def _groups(model, weight_decay=0.1):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2 and p.requires_grad]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0, "lr": 5e-3}]


def _build(model, cfg):
    kind = cfg.get("kind", "AdamW")
    hyper = dict(OPTIMIZERS[kind][1])
    extra = dict(stage=cfg.get("stage", 3), bucket_mb=cfg.get("bucket_mb", TINY_BUCKET_MB))
    extra.update(cfg.get("opt", {}))
    if cfg.get("groups"):
        hyper.pop("weight_decay", None)
        params = _groups(model)
        if extra["stage"] == 3:
            extra["module"] = model
    else:
        params = model
    if kind == "Adagrad":
        return zeroshard.ZeroRedundancy(params, optimizer_class=OPTIMIZERS[kind][0], **hyper,
                                        **extra)
    return getattr(zeroshard, "Zero" + kind)(params, **hyper, **extra)


def _train(rank, world_size, cfg):
    model = make_unit_net(dtype=cfg.get("dtype", torch.float32), **cfg.get("net", {}))
    opt = _build(model, cfg)
    micro = cfg.get("micro_batches", 1)
    norms, skipped = [], 0
    for step, (tokens, target) in enumerate(make_batches(cfg.get("steps", STEPS))):
        if step in (0, 1):
            opt.reset_comm_stats()
        tokens, target = rank_slice(tokens, rank, world_size), rank_slice(target, rank, world_size)
        opt.zero_grad(set_to_none=True)
        for m in range(micro):
            x, y = rank_slice(tokens, m, micro), rank_slice(target, m, micro)
            if cfg.get("two_forwards"):  # two forwards, one backward of their mean
                loss = (mse_loss(model, rank_slice(x, 0, 2), rank_slice(y, 0, 2))
                        + mse_loss(model, rank_slice(x, 1, 2), rank_slice(y, 1, 2))) / 2
            else:
                loss = mse_loss(model, x, y) / micro
            last = m == micro - 1
            with (opt.no_sync() if cfg.get("no_sync") and not last else contextlib.nullcontext()):
                opt.backward(loss)
        if cfg.get("clip"):
            norms.append(opt.clip_grad_norm_(cfg["clip"]).clone())
        if step == 0:
            first_stats = opt.comm_stats()
        if step == 1:
            stats = opt.comm_stats()
        opt.step()
        skipped += opt.last_step_skipped
        if cfg.get("eval_between"):
            model.eval()
            with torch.no_grad():
                model(tokens)
            model.train()
    units = opt.units
    peak_alive = units.peak_alive if units else None  # before full_params gathers them all
    with opt.full_params():
        snap = param_snapshot(model)
    return {"params": snap, "norms": norms, "stats": stats, "first_stats": first_stats,
            "peak_alive": peak_alive,
            "unit_bytes": ({u.name: u.full_nbytes for u in units.units} if units else None),
            "grad_bytes": sum(fg.layout.buffer_numel * 4 for fg in opt.flat_groups),
            "skipped": skipped}


def _oracle(cfg):
    net = {k: v for k, v in cfg.get("net", {}).items() if k != "skip_block_on_rank"}
    model = make_unit_net(**net)
    kind = cfg.get("kind", "AdamW")
    if cfg.get("groups"):
        hyper = dict(OPTIMIZERS[kind][1])
        hyper.pop("weight_decay", None)
        opt = OPTIMIZERS[kind][0](_groups(model), **hyper)
    else:
        opt = oracle_optimizer(kind, model.parameters())
    norms = train_oracle(model, opt, make_batches(cfg.get("steps", STEPS)), clip=cfg.get("clip"))
    return param_snapshot(model), norms


def _check_against_oracle(cfg, world_size):
    results = run_distributed(_train, world_size, cfg, timeout_s=180)
    assert_ranks_identical([r["params"] for r in results], f"stage 3 {cfg}")
    expected, norms = _oracle(cfg)
    assert_params_close(results[0]["params"], expected, f"stage 3 {cfg} at {world_size} ranks")
    for got, want in zip(results[0]["norms"], norms):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    return results


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_stage3_adamw_matches_oracle(world_size):
    _check_against_oracle({}, world_size)


@pytest.mark.parametrize("kind,world_size", [("SGD", 2), ("Adam", 3), ("Adagrad", 2)])
def test_stage3_other_optimizers_match_oracle(kind, world_size):
    _check_against_oracle({"kind": kind, "bucket_mb": SMALL_BUCKET_MB}, world_size)


@pytest.mark.parametrize("name,cfg", [
    ("clip", {"clip": 0.05}),
    ("accumulation_no_sync", {"micro_batches": 2, "no_sync": True}),
    ("accumulation", {"micro_batches": 2}),
    ("checkpoint_reentrant", {"net": {"checkpointing": "reentrant"}}),
    ("checkpoint_non_reentrant", {"net": {"checkpointing": "non_reentrant"}}),
    ("block_called_twice", {"net": {"twice": True}}),
    ("frozen_block", {"net": {"frozen_block": True}}),
    ("param_groups", {"groups": True}),
    ("eval_between_steps", {"eval_between": True}),
    ("two_forwards_one_backward", {"two_forwards": True}),
    ("unit_order_changes_on_every_rank", {"net": {"changing_order": True}, "steps": 6}),
    ("keep_after_forward", {"opt": {"reshard_after_forward": False}}),
    ("prefetch_0", {"opt": {"prefetch": 0}}),
    ("prefetch_2", {"opt": {"prefetch": 2}}),
    ("units_by_class", {"opt": {"units": [torch.nn.Linear]}}),
])
def test_stage3_idioms_match_oracle(name, cfg):
    _check_against_oracle(dict(cfg, bucket_mb=SMALL_BUCKET_MB), 2)


def test_stage3_communication_and_live_units_follow_the_formula():
    """Per step: every unit all-gathered in forward and again in backward except the root
    and the last block (each kept from its forward to its backward, which needs it first):
    2 x params - root - last block; gradients reduce-scattered once (Ψ in fp32). At most the
    running unit plus `prefetch` others are whole at once."""
    results = run_distributed(_train, 2, {"bucket_mb": SMALL_BUCKET_MB}, timeout_s=120)
    for r in results:
        gathered = sum(r["unit_bytes"].values())
        root, last = r["unit_bytes"]["<root>"], r["unit_bytes"]["blocks.2"]
        assert list(r["unit_bytes"])[-1] == "blocks.2"  # UnitNet's 3 blocks, in order
        for stats in (r["first_stats"], r["stats"]):  # the first step too: no order needed
            assert stats["all_gather"]["payload_bytes"] == 2 * gathered - root - last, stats
        assert r["stats"]["reduce_scatter"]["payload_bytes"] == r["grad_bytes"]
        assert r["stats"]["all_reduce"]["payload_bytes"] == 0
        assert 1 <= r["peak_alive"] <= 2, r["peak_alive"]  # prefetch=1
    two = run_distributed(_train, 2, {"bucket_mb": SMALL_BUCKET_MB, "opt": {"prefetch": 2}},
                          timeout_s=120)
    assert all(r["peak_alive"] <= 3 for r in two)
    # the block kept for backward is freed when the next one starts, not after it
    none = run_distributed(_train, 2, {"bucket_mb": SMALL_BUCKET_MB, "opt": {"prefetch": 0}},
                           timeout_s=120)
    assert all(r["peak_alive"] == 1 for r in none), [r["peak_alive"] for r in none]


def _compare_stages(rank, world_size, cfg):
    out = {}
    for stage in (2, 3):
        out[stage] = _train(rank, world_size, dict(cfg, stage=stage))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stage3_low_precision_equals_stage2(dtype):
    """bf16/fp16 parameters with fp32 master shards (and fp16's loss scaling, including its
    overflow skips in the first steps) give stage 2's parameters exactly."""
    cfg = {"dtype": dtype, "bucket_mb": SMALL_BUCKET_MB, "steps": 6,
           "opt": {"initial_scale": 2.0 ** 15} if dtype == torch.float16 else {}}
    results = run_distributed(_compare_stages, 2, cfg, timeout_s=180)
    for r in results:
        for name, t in r[2]["params"].items():
            assert torch.equal(r[3]["params"][name], t), name
        assert r[3]["skipped"] == r[2]["skipped"]
        if dtype == torch.float16:  # the test must reach the overflow path
            assert 1 <= r[3]["skipped"] < cfg["steps"], r[3]["skipped"]


# ---- API and errors ------------------------------------------------------------------------

def test_stage3_needs_the_module():
    model = make_unit_net()
    with pytest.raises(ValueError, match="stage 3 gathers parameters module by module"):
        zeroshard.ZeroAdamW(model.parameters(), stage=3)
    with pytest.raises(ValueError, match="apply to stage 3 only"):
        zeroshard.ZeroAdamW(model, stage=2, units=[torch.nn.Linear])
    with pytest.raises(TypeError, match="units= takes module classes or module instances"):
        zeroshard.ZeroAdamW(model, stage=3, units=["blocks"])


def test_stage3_parameters_outside_forward_and_full_params():
    model = make_unit_net()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = zeroshard.ZeroAdamW(model, lr=1e-2, stage=3)
    weight = model.blocks[0].fc1.weight
    # Outside forward/backward: a sharded parameter (whole shape, this rank's data), whose
    # torch storage is an empty placeholder (never a view of freed memory).
    assert isinstance(weight, zeroshard.ShardedParameter)
    assert weight.shape == reference["blocks.0.fc1.weight"].shape
    with zeroshard.sharded_params.sharded_tensor.raw():
        assert weight.untyped_storage().nbytes() == 0
    sharded_sd = model.state_dict()  # sharded values, usable elementwise; whole inside full_params
    assert isinstance(sharded_sd["blocks.0.fc1.weight"], zeroshard.ShardedTensor)
    with pytest.raises(zeroshard.ShardedAccessError, match="full_params"):
        torch.save(sharded_sd, os.devnull)
    assert set(model.state_dict(keep_vars=True)) >= set(reference)  # the objects themselves
    with opt.full_params():
        for n, p in model.named_parameters():
            assert torch.equal(p, reference[n]), n
        sd = model.state_dict()  # copies: they outlive the block
        with torch.no_grad():
            model.blocks[1].fc2.bias.add_(1.0)  # discarded: writeback=False
    assert torch.equal(sd["blocks.0.fc1.weight"], reference["blocks.0.fc1.weight"])
    with opt.full_params():
        assert torch.equal(model.blocks[1].fc2.bias, reference["blocks.1.fc2.bias"])
    with opt.full_params(writeback=True), torch.no_grad():
        model.blocks[1].fc2.bias.add_(1.0)
    with opt.full_params():
        torch.testing.assert_close(model.blocks[1].fc2.bias, reference["blocks.1.fc2.bias"] + 1)
    with pytest.raises(ValueError, match="not supported at stage 3"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})


def _branch_differs(rank, world_size):
    model = make_unit_net(skip_block_on_rank=(1, 1))
    opt = zeroshard.ZeroAdamW(model, lr=1e-2, stage=3, timeout_s=20)
    tokens, target = make_batches(1)[0]
    try:
        opt.backward(mse_loss(model, rank_slice(tokens, rank, world_size),
                              rank_slice(target, rank, world_size)))
    except RuntimeError as e:
        return str(e)
    return None


def test_stage3_ranks_running_different_units_raise_instead_of_mixing_weights():
    messages = run_distributed(_branch_differs, 2, timeout_s=60)
    for m in messages:
        assert m is not None and "different orders" in m, m
    assert "'blocks.1'" in messages[0] and "'blocks.2'" in messages[0]


def test_stage3_memory_report_shows_shards_and_live_units():
    model = make_unit_net()
    full = sum(p.numel() * 4 for p in model.parameters())
    opt = zeroshard.ZeroAdamW(model, lr=1e-2, stage=3)
    report = opt.memory_report()
    assert report["units"]["count"] == 4 and report["units"]["gathered"] == 0
    # world size 1: the shard is the whole (padded) buffer, nothing gathered between steps
    assert full <= report["model_params"] <= full + 4 * 128 * 4
    with opt.full_params():
        assert opt.memory_report()["model_params"] == 2 * report["model_params"]
    assert opt.memory_report()["units"]["peak_gathered"] == 3  # the three blocks, in full_params
    opt.reset_peak_memory()
    assert opt.memory_report()["units"]["peak_gathered"] == 0
