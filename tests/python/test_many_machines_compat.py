"""The topology options with what already works: a checkpoint saved with all of ZeRO++ (hpZ, qwZ,
qgZ) loads into plain stage 3 at another world size (and back), and fp16 loss scaling skips an
overflowing step on every rank of a hybrid-sharded run, replicas included."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import zeroshard  # noqa: E402
from dist_harness import run_distributed  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import TINY_BUCKET_MB, make_batches, mse_loss, rank_slice  # noqa: E402

ZERO_PP = {"secondary_shard": "node", "quantize_weights": "int8", "quantize_grads": "int4",
           "node_size": 2}


def _train_save(rank, world_size, root, options):
    model = make_unit_net()
    opt = zeroshard.ZeroAdamW(model, lr=1e-3, stage=3, bucket_mb=TINY_BUCKET_MB, **options)
    for tokens, target in make_batches(2):
        opt.zero_grad()
        opt.backward(mse_loss(model, rank_slice(tokens, rank, world_size),
                              rank_slice(target, rank, world_size)))
        opt.step()
    zeroshard.checkpoint.save(root, model=model, optimizer=opt)
    state = opt.full_state_dict()
    with opt.full_params():
        return {n: p.detach().clone() for n, p in model.named_parameters()}, state


def _load(rank, world_size, root, options):
    model = make_unit_net(seed=7)
    opt = zeroshard.ZeroAdamW(model, lr=1e-3, stage=3, bucket_mb=TINY_BUCKET_MB, **options)
    zeroshard.checkpoint.load(root, model=model, optimizer=opt)
    state = opt.full_state_dict()
    with opt.full_params():
        return {n: p.detach().clone() for n, p in model.named_parameters()}, state


def _same_state(a, b):
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert torch.equal(value, b["state"][key][name]), (key, name)


def test_a_zero_plus_plus_checkpoint_loads_plain_at_another_world_size_and_back(tmp_path):
    root = str(tmp_path / "ck")
    saved_params, saved_state = run_distributed(_train_save, 4, root, ZERO_PP)[0]
    params, state = run_distributed(_load, 2, root, {})[0]
    for name, value in saved_params.items():
        assert torch.equal(params[name], value), name
    _same_state(state, saved_state)
    root2 = str(tmp_path / "ck2")
    run_distributed(_train_save, 2, root2, {})
    params, _ = run_distributed(_load, 4, root2, ZERO_PP)[0]
    plain = run_distributed(_load, 2, root2, {})[0][0]
    for name, value in plain.items():
        assert torch.equal(params[name], value), name


def _fp16_overflow(rank, world_size):
    model = make_unit_net(dtype=torch.float16)
    opt = zeroshard.ZeroAdamW(model, lr=1e-3, stage=2, shard_size=2, bucket_mb=TINY_BUCKET_MB,
                              initial_scale=2.0 ** 8)
    skipped = []
    for step, (tokens, target) in enumerate(make_batches(3)):
        opt.zero_grad()
        loss = mse_loss(model, rank_slice(tokens, rank, world_size),
                        rank_slice(target, rank, world_size))
        if step == 1 and rank == 3:  # one rank of the second replica overflows
            loss = loss * float("inf")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.backward(loss)
        opt.step()
        skipped.append(opt.last_step_skipped)
        if opt.last_step_skipped:
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    return skipped, opt.loss_scale, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_fp16_overflow_on_one_replica_skips_the_step_everywhere():
    results = run_distributed(_fp16_overflow, 4)
    for skipped, scale, params in results:
        assert skipped == [False, True, False]
        assert scale == results[0][1]
        for name, value in params.items():
            assert torch.equal(value, results[0][2][name]), name
