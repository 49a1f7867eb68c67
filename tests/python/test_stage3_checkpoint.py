"""Stage 3 checkpoints: zeroshard.checkpoint round trips at stage 3, across world sizes (2 -> 3,
3 -> 1) and across stages (3 -> 2, 1 -> 3), export of a stage-3 checkpoint against the
torch.optim oracle, and the optimizer's own state_dict()/full_state_dict() at stage 3."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_harness import run_distributed  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import (SMALL_BUCKET_MB, assert_params_close, make_batches,  # noqa: E402
                         param_snapshot, train_oracle, train_rank)

import zeroshard  # noqa: E402
from zeroshard import export  # noqa: E402

K = 2
BATCHES = make_batches(2 * K)
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _make(seed, stage, group=None, dtype=torch.float32):
    model = make_unit_net(seed, dtype=dtype)
    opt = zeroshard.ZeroAdamW(model, stage=stage, process_group=group,
                              bucket_mb=SMALL_BUCKET_MB, **HYPER)
    return model, opt


def _snapshot(model, opt):
    with opt.full_params():
        return param_snapshot(model)


def _oracle(steps):
    model = make_unit_net(0)
    opt = torch.optim.AdamW(model.parameters(), **HYPER)
    train_oracle(model, opt, BATCHES[:steps])
    return model, opt


def _round_trips(rank, world_size, root):
    import torch.distributed as dist
    out = {}
    sub = {n: dist.new_group(list(range(n))) for n in (1, 2, 3)}
    # 2 ranks, stage 3: K steps, save.
    if rank < 2:
        model, opt = _make(0, 3, sub[2])
        train_rank(model, opt, BATCHES[:K], rank, 2)
        zeroshard.checkpoint.save(os.path.join(root, "s3n2"), model=model, optimizer=opt)
        train_rank(model, opt, BATCHES[K:], rank, 2)
        out["straight"] = _snapshot(model, opt)
        # The optimizer's own state dicts at stage 3.
        full = opt.full_state_dict()
        out["full_state_steps"] = sorted({int(s["step"]) for s in full["state"].values()})
        mine = opt.state_dict()
        again_model, again = _make(5, 3, sub[2])
        again.load_state_dict(mine)
        out["state_dict_equal"] = all(
            torch.equal(a, b) for a, b in zip(
                [t for s in opt.shard_state for t in s.values() if isinstance(t, torch.Tensor)],
                [t for s in again.shard_state for t in s.values() if isinstance(t, torch.Tensor)]))
    dist.barrier()
    # Load the 2-rank stage-3 checkpoint at 3 ranks, at stage 3 and at stage 2; train on.
    for stage in (3, 2):
        model, opt = _make(7, stage, sub[3])  # another init: load must overwrite it
        zeroshard.checkpoint.load(os.path.join(root, "s3n2"), model=model, optimizer=opt)
        train_rank(model, opt, BATCHES[K:], rank, 3)
        out[f"n3_stage{stage}"] = _snapshot(model, opt)
        if stage == 3:
            zeroshard.checkpoint.save(os.path.join(root, "s3n3"), model=model, optimizer=opt)
    dist.barrier()
    # A stage-1 checkpoint loaded at stage 3 on one rank.
    if rank == 0:
        model, opt = _make(0, 1, sub[1])
        train_rank(model, opt, BATCHES[:K], 0, 1)
        zeroshard.checkpoint.save(os.path.join(root, "s1n1"), model=model, optimizer=opt)
        model3, opt3 = _make(9, 3, sub[1])
        zeroshard.checkpoint.load(os.path.join(root, "s1n1"), model=model3, optimizer=opt3)
        train_rank(model3, opt3, BATCHES[K:], 0, 1)
        out["s1_to_s3"] = _snapshot(model3, opt3)
    dist.barrier()
    return out


def test_stage3_checkpoints_reshard_and_cross_stages(tmp_path):
    results = run_distributed(_round_trips, 3, str(tmp_path), timeout_s=240)
    expected = param_snapshot(_oracle(2 * K)[0])
    r0 = results[0]
    assert_params_close(r0["straight"], expected, "stage 3, 2 ranks, saved midway")
    assert r0["full_state_steps"] == [2 * K]
    assert r0["state_dict_equal"]
    for key in ("n3_stage3", "n3_stage2", "s1_to_s3"):
        assert_params_close(r0[key], expected, f"resumed: {key}")
    for r in results[1:]:
        for key in ("n3_stage3", "n3_stage2"):
            for name, t in r[key].items():
                assert torch.equal(t, r0[key][name]), (key, name)
    # Export of a stage-3 checkpoint: the oracle's weights and torch.optim state after K steps.
    oracle_model, oracle_opt = _oracle(K)
    weights = str(tmp_path / "w.safetensors")
    export.export(str(tmp_path / "s3n2"), weights, optimizer_out=str(tmp_path / "o.pt"))
    from safetensors.torch import load_file
    exported = load_file(weights)
    for name, t in oracle_model.state_dict().items():
        torch.testing.assert_close(exported[name], t, rtol=1e-5, atol=1e-6)
    loaded = torch.load(str(tmp_path / "o.pt"), weights_only=True)
    stock = torch.optim.AdamW(oracle_model.parameters(), **HYPER)
    stock.load_state_dict(loaded)  # the exported state loads into the stock optimizer
    for p in oracle_model.parameters():
        want = oracle_opt.state[p]["exp_avg"]
        torch.testing.assert_close(stock.state[p]["exp_avg"], want, rtol=1e-5, atol=1e-7)
