"""Stage 3 in scripts users write: weight clipping, EMA copies, a frozen teacher, LoRA adapters.

Each case is one training script run two ways: with zeroshard stage 3 on gloo ranks (each rank
on its slice of the batch) and with torch.optim.AdamW on the whole batch in one process, which
is what DDP + AdamW computes. Losses, weights and the EMA's weights must agree to 1e-5 relative
(fp32). Then what stage 3 promises beyond correctness: a frozen base and an EMA copy cost 1/N
per rank, and a forward that only rank 0 runs stops every rank with zeroshard's error.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from dist_harness import run_distributed  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import TINY_BUCKET_MB, make_batches, mse_loss, rank_slice  # noqa: E402

import zeroshard  # noqa: E402

STEPS = 4
LR = 1e-2
CLIP = 0.05
DECAY = 0.8


class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update (as peft's LoRA layers)."""

    def __init__(self, base: nn.Linear, rank: int = 1) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.02)  # non-zero, so A trains from step one

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


def _lora_net():
    model = make_unit_net(0)
    model.requires_grad_(False)
    torch.manual_seed(1)
    for block in model.blocks:
        block.fc1 = LoRALinear(block.fc1)
    return model


def _build(case: str, zero: bool):
    if case == "lora":
        return _lora_net()
    return make_unit_net(0)


def _whole(model, zero):
    return zeroshard.full_params(model) if zero else contextlib.nullcontext()


def _script(rank: int, world_size: int, case: str, zero: bool):
    """The user's script. zero=False is the DDP-equivalent reference on the whole batch. A case
    "<name>_with_offload" is <name> with offload="cpu": the host update then runs beside the next
    forward (deferred_update.py), and what the script does right after step() must see it.
    "<name>_with_hybrid" is <name> with shard_size=2 (replicas of 2-rank shard groups), "_with_hpz"
    with hpZ (secondary_shard="node", nodes of 2 ranks): both exact, so DDP's numbers too."""
    case, _, variant = case.partition("_with_")
    offload = variant == "offload"
    options = {"hybrid": {"shard_size": 2},
               "hpz": {"secondary_shard": "node", "node_size": 2}}.get(variant, {})
    model = _build(case, zero)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if zero:
        opt = zeroshard.ZeroAdamW(trainable, lr=LR, weight_decay=0.1, stage=3, module=model,
                                  bucket_mb=TINY_BUCKET_MB,
                                  offload="cpu" if offload else None, **options)
    else:
        opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.1)
    teacher = ema = averaged = None
    if case == "teacher":  # a frozen model built shard by shard, given to no optimizer
        with (zeroshard.sharded_init() if zero else contextlib.nullcontext()):
            teacher = make_unit_net(5)
        teacher.requires_grad_(False).eval()
    if case in ("ema", "timm_ema"):  # built after the optimizer, as torch's SWA docs show
        ema = copy.deepcopy(model).requires_grad_(False)
    shadows = None
    if case == "diffusers_ema":  # diffusers' EMAModel(model.parameters()): detached clones
        shadows = [p.clone().detach() for p in model.parameters()]
    if case == "averaged_model":
        averaged = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(DECAY))
    losses, ema_evals = [], []
    for step, (tokens, target) in enumerate(make_batches(STEPS)):
        if zero:
            tokens, target = rank_slice(tokens, rank, world_size), rank_slice(target, rank,
                                                                              world_size)
        out = model(tokens).float()
        loss = ((out - target) ** 2).mean()
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(tokens).float()
            loss = loss + ((out - soft) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        with torch.no_grad():
            if case.startswith("wgan"):  # the critic's weight clipping, after its step
                for p in model.parameters():
                    p.data.clamp_(-CLIP, CLIP)
            if case == "ema":
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - DECAY)
            if case == "timm_ema":  # timm's ModelEmaV3: foreach over the state_dicts
                torch._foreach_lerp_(list(ema.state_dict().values()),
                                     list(model.state_dict().values()), 1 - DECAY)
            if averaged is not None:
                averaged.update_parameters(model)
            if shadows is not None:
                for s, p in zip(shadows, model.parameters()):
                    s.sub_((1 - DECAY) * (s - p))
                if step == 1:  # EMAModel's store / copy_to / evaluate / restore
                    stored = [p.detach().cpu().clone() for p in model.parameters()]
                    for s, p in zip(shadows, model.parameters()):
                        p.data.copy_(s.to(p.device).data)
                    ema_evals.append(float(mse_loss(model, tokens, target)))
                    for c, p in zip(stored, model.parameters()):
                        p.data.copy_(c.data)
            shadow = ema if ema is not None else averaged
            if shadow is not None and step == 1:  # the EMA evaluated mid-run, on every rank
                ema_evals.append(float(mse_loss(shadow, tokens, target)))
    result = {"losses": losses, "ema_evals": ema_evals}
    if shadows is not None:  # whole-tensor reductions of each shadow (collectives at stage 3)
        with torch.no_grad():
            result["shadow_sums"] = [[float(s.sum()), float(s.norm()), float(s.abs().max())]
                                     for s in shadows]
    with _whole(model, zero):
        result["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    shadow = ema if ema is not None else (averaged.module if averaged is not None else None)
    if shadow is not None:
        with _whole(shadow, zero):
            result["ema"] = {n: p.detach().clone() for n, p in shadow.named_parameters()}
    return result


@functools.lru_cache(maxsize=None)
def _reference(case: str):
    return _script(0, 1, case.partition("_with_")[0], False)


def _check(per_rank, reference, what):
    losses = torch.tensor([r["losses"] for r in per_rank]).mean(0)  # equal slices: the mean
    torch.testing.assert_close(losses, torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-7,
                               msg=f"{what}: losses")
    for key in ("weights", "ema"):
        if key not in reference:
            continue
        for r in per_rank:
            assert set(r[key]) == set(reference[key]), what
            for name, value in reference[key].items():
                torch.testing.assert_close(r[key][name], value, rtol=1e-5, atol=1e-6,
                                           msg=f"{what}: {key} {name}")
    if "shadow_sums" in reference:
        for r in per_rank:
            torch.testing.assert_close(torch.tensor(r["shadow_sums"], dtype=torch.float64),
                                       torch.tensor(reference["shadow_sums"],
                                                    dtype=torch.float64),
                                       rtol=1e-5, atol=1e-6, msg=f"{what}: EMA shadows")
    if reference["ema_evals"]:
        evals = torch.tensor([r["ema_evals"] for r in per_rank]).mean(0)
        torch.testing.assert_close(evals, torch.tensor(reference["ema_evals"]), rtol=1e-5,
                                   atol=1e-7, msg=f"{what}: EMA evaluated mid-run")


@pytest.mark.parametrize("case,world_size", [
    ("wgan", 2), ("wgan", 3), ("ema", 2), ("ema", 3), ("timm_ema", 3), ("averaged_model", 2),
    ("diffusers_ema", 3), ("wgan_with_offload", 2), ("ema_with_offload", 3),
    ("timm_ema_with_offload", 2), ("diffusers_ema_with_offload", 2),
    ("averaged_model_with_offload", 2), ("teacher", 2), ("teacher", 3), ("lora", 2), ("lora", 3),
    ("wgan_with_hybrid", 4), ("ema_with_hybrid", 4), ("diffusers_ema_with_hybrid", 4),
    ("teacher_with_hybrid", 4), ("wgan_with_hpz", 4), ("averaged_model_with_hpz", 4)])
def test_user_script_matches_ddp(case, world_size):
    per_rank = run_distributed(_script, world_size, case, True, timeout_s=180)
    _check(per_rank, _reference(case), f"{case} at {world_size} ranks")
    if case == "wgan":  # the clip happened (a no-op clip would fail the comparison too)
        assert max(float(w.abs().max()) for w in per_rank[0]["weights"].values()) <= \
            float(torch.tensor(CLIP))


# ---- memory: a frozen base and an EMA copy cost 1/N per rank --------------------------------

def _memory(rank, world_size, partition_frozen):
    model = _lora_net()
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    opt = zeroshard.ZeroAdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                              stage=3, module=model, partition_frozen=partition_frozen)
    tokens, target = make_batches(1)[0]
    opt.backward(mse_loss(model, rank_slice(tokens, rank, world_size),
                          rank_slice(target, rank, world_size)))
    opt.step()
    opt.zero_grad()
    report = opt.memory_report()
    ema = copy.deepcopy(model)
    ema_local = sum((p._zs.local.numel() if isinstance(p, zeroshard.ShardedParameter)
                     else p.numel()) * p.element_size() for p in ema.parameters())
    return (report["model_params"] + report["frozen_params"], report["frozen_params"], whole,
            frozen, ema_local)


def test_frozen_base_and_ema_copy_are_partitioned():
    for held, frozen_held, whole, frozen, ema_local in run_distributed(_memory, 4, True,
                                                                        timeout_s=180):
        assert frozen >= 0.9 * whole, "the test model's frozen base must be 90% of it"
        assert held < 0.4 * whole, (held, whole)
        assert frozen_held < 0.4 * frozen, (frozen_held, frozen)
        assert ema_local < 0.4 * whole, (ema_local, whole)
    for held, frozen_held, whole, frozen, ema_local in run_distributed(_memory, 2, False,
                                                                        timeout_s=180):
        assert frozen_held == frozen, "partition_frozen=False keeps frozen parameters whole"


# ---- a forward that not every rank runs ---------------------------------------------------------

def _evaluate_on_rank0(rank, world_size, what):
    model = make_unit_net(0)
    opt = zeroshard.ZeroAdamW(model, lr=LR, stage=3, timeout_s=30)
    ema = copy.deepcopy(model).requires_grad_(False)
    batches = make_batches(3)
    try:
        for step, (tokens, target) in enumerate(batches):
            x, y = rank_slice(tokens, rank, world_size), rank_slice(target, rank, world_size)
            if step == 1 and rank == 0:  # nanoGPT: `if iter_num % eval_interval == 0 and master`
                with torch.no_grad():
                    if what == "model":
                        mse_loss(model, x, y)
                    elif what == "ema":
                        mse_loss(ema, x, y)
                    else:
                        model.blocks[0].fc1.weight.norm()  # logging a weight norm on rank 0
            opt.backward(mse_loss(model, x, y))
            opt.step()
            opt.zero_grad()
    except RuntimeError as e:
        return type(e).__name__, str(e)
    return None


@pytest.mark.parametrize("what", ["model", "ema", "norm"])
def test_a_forward_only_rank0_runs_stops_every_rank(what):
    for attempt in range(2):  # every time, not by luck of timing
        for result in run_distributed(_evaluate_on_rank0, 2, what, timeout_s=120):
            assert result is not None, "a rank went on training"
            kind, message = result
            assert "not every rank runs" in message, message
            assert "full_params" in message, message
