"""zeroshard under torch.compile, on gloo ranks, against the same compiled model trained by
torch.optim.AdamW on the whole batch (what DDP + the compiled model computes).

Stage 3 gathers and frees units in module hooks that torch.compile must not trace (collectives,
storage resizes): they run eagerly between the compiled pieces. Checked: `torch.compile(model)`
and per-block `block.compile()`, at stages 0, 1, 2, 3 (default reshard_after_forward=True, and with
activation checkpointing) and 2 + offload; every step's loss and the final weights within 1e-5
relative. The aot_eager backend runs Dynamo and AOTAutograd (where graphs save parameters for
backward, the part that interacts with stage 3's gathers) without inductor's code generation,
which would cost this 2-core machine minutes per test; one inductor case runs too.
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_harness import run_distributed  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import make_batches, mse_loss, rank_slice  # noqa: E402

import zeroshard  # noqa: E402

STEPS = 3
LR = 1e-2


def _compiled(model, how: str, backend: str):
    if how == "whole":
        return torch.compile(model, backend=backend)
    for block in model.blocks:
        block.compile(backend=backend)
    return model


def _train(rank, world_size, how, stage, offload, backend, checkpointing, options=None):
    torch._dynamo.reset()
    model = make_unit_net(0, checkpointing=checkpointing)
    if world_size == 0:  # the reference: one process, the whole batch
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    else:
        opt = zeroshard.ZeroAdamW(model if stage == 3 else model.parameters(), lr=LR,
                                  weight_decay=0.1, stage=stage, offload=offload,
                                  **(options or {}))
    run = _compiled(model, how, backend)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for tokens, target in make_batches(STEPS):
            if world_size:
                tokens = rank_slice(tokens, rank, world_size)
                target = rank_slice(target, rank, world_size)
            loss = mse_loss(run, tokens, target)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    traced = [str(w.message) for w in caught if "zeroshard" in str(w.message)]
    with (zeroshard.full_params(model) if world_size else torch.no_grad()):
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, weights, traced


@pytest.mark.parametrize("how,stage,offload,backend,checkpointing,world_size", [
    ("whole", 3, None, "aot_eager", "", 2), ("blocks", 3, None, "aot_eager", "", 2),
    ("whole", 3, None, "aot_eager", "", 3),
    ("whole", 3, None, "aot_eager", "nonreentrant", 2), ("whole", 2, None, "aot_eager", "", 2),
    ("whole", 0, None, "aot_eager", "", 2), ("blocks", 1, None, "aot_eager", "", 2),
    ("blocks", 2, "cpu", "aot_eager", "", 2), ("whole", 3, None, "inductor", "", 2)])
def test_compiled_model_trains_like_ddp(how, stage, offload, backend, checkpointing, world_size,
                                        options=None):
    want_losses, want, _ = _train(0, 0, how, stage, offload, backend, checkpointing)
    per_rank = run_distributed(_train, world_size, how, stage, offload, backend, checkpointing,
                               options, timeout_s=300)
    # Each rank's loss is over its equal part of the batch: their mean is the whole batch's.
    losses = torch.tensor([losses for losses, _, _ in per_rank]).mean(0)
    torch.testing.assert_close(losses, torch.tensor(want_losses), rtol=1e-5, atol=1e-7)
    assert want_losses[0] > want_losses[-1]
    for _, weights, traced in per_rank:
        assert not traced, traced  # zeroshard's hooks stay out of Dynamo's way
        for name, value in want.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("stage,options", [
    (3, {"shard_size": 2}), (2, {"shard_size": 2, "offload": "cpu"}),
    (3, {"secondary_shard": "node", "node_size": 2})])
def test_compiled_model_with_hybrid_sharding_or_hpz_trains_like_ddp(stage, options):
    """Exact options at 4 ranks (2 shard groups of 2; hpZ on 2 nodes of 2), under Dynamo."""
    options = dict(options)
    offload = options.pop("offload", None)
    test_compiled_model_trains_like_ddp("whole", stage, offload, "aot_eager", "", 4, options)
