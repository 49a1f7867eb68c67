"""The topology options with what already works: a checkpoint saved with all of ZeRO++ (hpZ, qwZ,
qgZ) loads into plain stage 3 at another world size (and back), one saved hybrid-sharded
(shard_size=2) loads plain, at another world size and at another shard_size, and fp16 loss scaling skips an
overflowing step on every rank of a hybrid-sharded run, replicas included."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import zeroshard  # noqa: E402
from dist_harness import run_distributed  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import TINY_BUCKET_MB, make_batches, mse_loss, rank_slice  # noqa: E402

ZERO_PP = {"secondary_shard": "node", "quantize_weights": "int8", "quantize_grads": "int4",
           "node_size": 2}


def _train_save(rank, world_size, root, options):
    options = dict(options)
    stage = options.pop("stage", 3)
    model = make_unit_net()
    opt = zeroshard.ZeroAdamW(model, lr=1e-3, stage=stage, bucket_mb=TINY_BUCKET_MB, **options)
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
    options = dict(options)
    stage = options.pop("stage", 3)
    model = make_unit_net(seed=7)
    opt = zeroshard.ZeroAdamW(model, lr=1e-3, stage=stage, bucket_mb=TINY_BUCKET_MB, **options)
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


@pytest.mark.parametrize("stage", [1, 3])
def test_a_hybrid_checkpoint_loads_at_other_shard_sizes_and_world_sizes(tmp_path, stage):
    """Saved at shard_size=2 on 4 ranks (two replicas; only the first writes its shards), it
    loads plain on 4, 3 and 2 ranks and at shard_size=2 again, to the same parameters and
    optimizer state; a plain checkpoint loads hybrid-sharded too."""
    root = str(tmp_path / "hybrid")
    hybrid = {"stage": stage, "shard_size": 2}
    saved_params, saved_state = run_distributed(_train_save, 4, root, hybrid)[0]
    assert sorted(f for f in os.listdir(os.path.join(root, open(os.path.join(
        root, "LATEST")).read())) if f.startswith("rank-")) == [
        "rank-00000-of-00002.bin", "rank-00001-of-00002.bin"]
    for world_size, options in ((4, {"stage": stage}), (3, {"stage": 2}), (2, {"stage": 3}),
                                (4, hybrid)):
        for params, state in run_distributed(_load, world_size, root, options):
            for name, value in saved_params.items():
                assert torch.equal(params[name], value), (world_size, options, name)
            _same_state(state, saved_state)
    plain_root = str(tmp_path / "plain")
    plain_params, plain_state = run_distributed(_train_save, 3, plain_root, {"stage": stage})[0]
    for params, state in run_distributed(_load, 4, plain_root, hybrid):
        for name, value in plain_params.items():
            assert torch.equal(params[name], value), name
        _same_state(state, plain_state)


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


def _offload_run(rank, world_size, options, clip):
    """Three steps (clipped or not) of UnitNet; the parameters, the norms and the byte counts
    of the host copies."""
    options = dict(options)
    stage = options.pop("stage")
    model = make_unit_net()
    opt = zeroshard.ZeroAdamW(model, lr=1e-2, stage=stage, bucket_mb=TINY_BUCKET_MB, **options)
    norms = []
    for tokens, target in make_batches(3):
        opt.zero_grad()
        opt.backward(mse_loss(model, rank_slice(tokens, rank, world_size),
                              rank_slice(target, rank, world_size)))
        if clip:
            norms.append(float(opt.clip_grad_norm_(0.05)))
        opt.step()
    landed = opt.offload.d2h_bytes if opt.offload is not None else 0
    with opt.full_params():
        return {n: p.detach().clone() for n, p in model.named_parameters()}, norms, landed


@pytest.mark.parametrize("options,clip", [
    ({"stage": 1, "shard_size": 2}, True),
    ({"stage": 2, "shard_size": "node", "node_size": 2}, False),
    ({"stage": 3, "shard_size": 2}, True),
    ({"stage": 2, "quantize_grads": "int8", "node_size": 2}, True),
    ({"stage": 3, "quantize_grads": "int4", "secondary_shard": "node",
      "quantize_weights": "int8", "node_size": 2}, False),
])
def test_offload_with_hybrid_sharding_and_quantized_grads_computes_what_the_device_does(
        options, clip):
    """offload="cpu" changes where the update runs, not what it computes: on CPU the same
    kernels on the same reduced gradients, so bitwise the run without offload, replicas and
    quantized hops included. Each rank lands its own shard of the gradients (fp32: 4 bytes an
    element of the shard group's 1/k)."""
    on_device = run_distributed(_offload_run, 4, options, clip)
    offloaded = run_distributed(_offload_run, 4, dict(options, offload="cpu"), clip)
    for (params, norms, _), (params_off, norms_off, landed) in zip(on_device, offloaded):
        assert norms == norms_off
        for name, value in params.items():
            assert torch.equal(params_off[name], value), name
        assert landed > 0
    numel = sum(p.numel() for p in make_unit_net().parameters())
    shard_ranks = 2 if "shard_size" in options else 4
    landed_per_step = sum(landed for _, _, landed in offloaded) / 3
    # every rank lands one shard per step; the shards of one group cover the model (plus
    # alignment padding), so the ranks together land replicas x (numel + padding) elements
    assert 4 * numel * (4 // shard_ranks) <= landed_per_step < 4 * numel * (4 // shard_ranks) * 1.5
