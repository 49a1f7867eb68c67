"""Checkpoints of sharded models that stage 3 did not use to have: a model built under
sharded_init and given to no optimizer (a frozen teacher), and a LoRA model whose frozen base is
partitioned. Saved by every rank, exported in one process, loaded at another world size; the
values must be those of the unsharded model."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_harness import run_distributed  # noqa: E402
from test_stage3_user_scripts import _lora_net  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import make_batches, mse_loss, rank_slice  # noqa: E402

import zeroshard  # noqa: E402
from zeroshard import export  # noqa: E402


def _save_teacher(rank, world_size, root):
    with zeroshard.sharded_init():
        teacher = make_unit_net(5)
    zeroshard.checkpoint.save(os.path.join(root, "teacher"), model=teacher)
    with zeroshard.sharded_init():
        other = make_unit_net(9)
    zeroshard.checkpoint.load(os.path.join(root, "teacher"), model=other)
    with zeroshard.full_params(other):
        return {n: p.detach().clone() for n, p in other.named_parameters()}


def test_a_sharded_model_without_optimizer_saves_exports_and_loads(tmp_path):
    reference = make_unit_net(5).state_dict()
    for loaded in run_distributed(_save_teacher, 3, str(tmp_path), timeout_s=120):
        for name, value in loaded.items():
            assert torch.equal(value, reference[name]), name
    export.export(str(tmp_path / "teacher"), str(tmp_path / "teacher.pt"))
    exported = torch.load(tmp_path / "teacher.pt", weights_only=True)
    for name, value in reference.items():
        assert torch.equal(exported[name], value), name


def _lora_round_trip(rank, world_size, root, save_world):
    model = _lora_net()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = zeroshard.ZeroAdamW(trainable, lr=1e-2, stage=3, module=model)
    base = model.blocks[1].fc1.base.weight
    assert isinstance(base, zeroshard.ShardedParameter) and not base.requires_grad
    if world_size == save_world:
        tokens, target = make_batches(1)[0]
        opt.backward(mse_loss(model, rank_slice(tokens, rank, world_size),
                              rank_slice(target, rank, world_size)))
        opt.step()
        with torch.no_grad():
            base.mul_(2.0)  # a frozen parameter changed between steps is saved changed
        zeroshard.checkpoint.save(os.path.join(root, "lora"), model=model, optimizer=opt)
    else:
        zeroshard.checkpoint.load(os.path.join(root, "lora"), model=model, optimizer=opt)
    with zeroshard.full_params(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_partitioned_frozen_base_resumes_at_another_world_size(tmp_path):
    saved = run_distributed(_lora_round_trip, 2, str(tmp_path), 2, timeout_s=120)[0]
    plain = _lora_net()
    assert torch.equal(saved["blocks.1.fc1.base.weight"], plain.blocks[1].fc1.base.weight * 2)
    assert not torch.equal(saved["blocks.1.fc1.lora_a.weight"], plain.blocks[1].fc1.lora_a.weight)
    for loaded in run_distributed(_lora_round_trip, 3, str(tmp_path), 2, timeout_s=120):
        for name, value in saved.items():
            assert torch.equal(loaded[name], value), name
