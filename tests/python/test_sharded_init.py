"""zeroshard.sharded_init: models built shard by shard are identical to an unsharded construction
with the same seed, the optimizer adopts the shards at every stage, and a model of more than
1 GiB of fp32 parameters is built and trained at 4 ranks within ZeRO-3's memory bound."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from dist_harness import run_distributed  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import (SMALL_BUCKET_MB, assert_params_close, make_batches,  # noqa: E402
                         param_snapshot, train_rank)

import zeroshard  # noqa: E402
from zeroshard.memory import process_memory  # noqa: E402


class HFStyleNet(nn.Module):
    """Initialised the ways Hugging Face and nanoGPT models do after their children exist:
    self.apply() with torch.nn.init functions and with `.data.normal_()`, a trunc_normal_
    (rejection sampling that reads the tensor), and a scale applied in place."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(37, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 16))
                                    for _ in range(3))
        self.ln = nn.LayerNorm(16)
        self.scale = nn.Parameter(torch.ones(16))
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("2.weight"):
                nn.init.trunc_normal_(p, std=0.02, a=-0.03, b=0.03)
                with torch.no_grad():
                    p.mul_(1.0 / math.sqrt(2 * len(self.layers)))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens):
        h = self.wte(tokens)
        for layer in self.layers:
            h = h + layer(h)
        return self.ln(h) * self.scale


def _gpt(seed):
    from gpt import GPT, GPTConfig
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, d_model=32,
                         default_seq_len=16), seed=seed)


def _build(kind):
    torch.manual_seed(11)
    if kind == "gpt":
        return _gpt(3)
    if kind == "hf":
        return HFStyleNet()
    return make_unit_net(0)


def _identical(rank, world_size, kind, stage):
    reference = {n: t.clone() for n, t in _build(kind).state_dict().items()}
    with zeroshard.sharded_init():
        model = _build(kind)
    # Every parameter sharded: whole shape, this rank's part of the data.
    placeholders = all(isinstance(p, zeroshard.ShardedParameter)
                       and p._zs.local.numel() <= -(-p.numel() // world_size)
                       for p in model.parameters())
    params = model if stage == 3 else model.parameters()
    opt = zeroshard.ZeroAdamW(params, lr=1e-3, stage=stage)
    with opt.full_params():
        state = model.state_dict()
        same = {n: torch.equal(state[n], t) for n, t in reference.items()}
    return placeholders, same


@pytest.mark.parametrize("kind,world_size,stage", [
    ("gpt", 1, 3), ("gpt", 3, 3), ("hf", 2, 3), ("hf", 2, 2), ("unit", 2, 3), ("unit", 2, 1)])
def test_sharded_init_weights_equal_an_unsharded_construction(kind, world_size, stage):
    for placeholders, same in run_distributed(_identical, world_size, kind, stage, timeout_s=120):
        assert placeholders, "sharded_init left a parameter whole"
        assert all(same.values()), [n for n, ok in same.items() if not ok]


def _trains_like_unsharded(rank, world_size):
    with zeroshard.sharded_init():
        model = make_unit_net(0)
    opt = zeroshard.ZeroAdamW(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), stage=3,
                              bucket_mb=SMALL_BUCKET_MB)
    train_rank(model, opt, make_batches(2), rank, world_size)
    with opt.full_params():
        return param_snapshot(model)


def test_sharded_init_model_trains_like_an_unsharded_one():
    model = make_unit_net(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    from zero_oracle import train_oracle
    train_oracle(model, opt, make_batches(2))
    expected = param_snapshot(model)
    for snap in run_distributed(_trains_like_unsharded, 3, timeout_s=120):
        assert_params_close(snap, expected, "sharded_init + stage 3")


def test_changing_dtype_inside_sharded_init_is_refused():
    with pytest.raises(RuntimeError, match="cannot change shape, dtype or device"):
        with zeroshard.sharded_init():
            nn.Sequential(nn.Linear(4, 4)).to(torch.float64)


# ---- more than 1 GiB of fp32 parameters at 4 ranks -----------------------------------------

BIG_D, BIG_BLOCKS = 2048, 8  # 8 blocks x 2 x (2048 x 8192 + bias) = 268.5M params, 1.0 GiB fp32


class BigBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(BIG_D, 4 * BIG_D)
        self.down = nn.Linear(4 * BIG_D, BIG_D)

    def forward(self, h):
        return h + self.down(torch.relu(self.up(h)))


class BigNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(BigBlock() for _ in range(BIG_BLOCKS))
        self.norm = nn.LayerNorm(BIG_D)

    def forward(self, h):
        for block in self.blocks:
            h = block(h)
        return self.norm(h)


def _big(rank, world_size):
    device = torch.device("cpu")
    process_memory.reset_peak(device)
    baseline = process_memory.measured(device)["current_bytes"]
    torch.manual_seed(0)
    with zeroshard.sharded_init():
        model = BigNet()
    opt = zeroshard.ZeroAdamW(model, lr=1e-4, stage=3)
    built = process_memory.measured(device)["peak_bytes"]
    x = torch.randn(2, 4, BIG_D)
    loss = model(x).square().mean()
    opt.backward(loss)
    opt.step()
    opt.zero_grad()
    trained = process_memory.measured(device)["peak_bytes"]
    psi = sum(u.full_nbytes for u in opt.units.units) // 4
    unit = max(u.full_nbytes for u in opt.units.units)
    report = opt.memory_report()
    return {"baseline": baseline, "built": built, "trained": trained, "psi": psi, "unit": unit,
            "report": report["total"], "ring": report["comm_buffers"]}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures /proc VmHWM")
def test_more_than_a_gib_of_params_builds_and_trains_in_zero3_memory():
    """Per rank, above the RSS the process had before building (its fixed overhead: Python,
    torch, gloo, measured): construction peaks at ZeRO-3's 16Ψ/N (fp32 Adam: shards of
    params, grads and two moments, allocated by the optimizer) plus one block whole (the
    module being built) plus 192 MiB; the training step at 16Ψ/N plus the gradient buckets'
    ring (allocated in the first backward, reported) plus two units' parameters and gradients
    (prefetch 1) plus 384 MiB. Building the whole model on each rank first would exceed the
    first bound by the whole model (1 GiB)."""
    mib = 2 ** 20
    for rank, r in enumerate(run_distributed(_big, 4, timeout_s=900)):
        assert r["psi"] * 4 >= 2 ** 30, r  # at least 1 GiB of fp32 parameters
        formula = 16 * r["psi"] // 4
        assert abs(r["report"] - r["ring"] - formula) < 16 * mib, r
        built = r["built"] - r["baseline"]
        trained = r["trained"] - r["baseline"]
        print(f"rank {rank}: baseline {r['baseline'] / mib:.0f} MiB, construction +"
              f"{built / mib:.0f} MiB, step +{trained / mib:.0f} MiB; 16Ψ/N = "
              f"{formula / mib:.0f} MiB, ring {r['ring'] / mib:.0f} MiB, one unit "
              f"{r['unit'] / mib:.0f} MiB")
        assert built <= formula + r["unit"] + 192 * mib, (rank, built / mib)
        # RSS slack: on the 2-core CI machine the step's peak over the same run has ranged
        # +1692..+1954 MiB across runs (glibc keeps freed unit buffers mapped unevenly).
        assert trained <= formula + r["ring"] + 4 * r["unit"] + 384 * mib, (rank, trained / mib)


def _hybrid(rank, world_size, init_options, options):
    """Built under sharded_init(**init_options), trained at stage 3 with **options (hybrid
    sharding); the whole weights after two steps, the local shard sizes, or the error."""
    with zeroshard.sharded_init(**init_options):
        model = make_unit_net(0)
    local = [p._zs.local.numel() for p in model.parameters()]
    try:
        opt = zeroshard.ZeroAdamW(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), stage=3,
                                  bucket_mb=SMALL_BUCKET_MB, **options)
    except ValueError as e:
        return str(e)
    train_rank(model, opt, make_batches(2), rank, world_size)
    with opt.full_params():
        return param_snapshot(model), local


def test_sharded_init_with_the_optimizers_shard_size_trains_like_an_unsharded_one():
    """sharded_init(shard_size=2) shards within the optimizer's shard groups (each parameter
    split in 2, not 4), which adopts the shards; built over every rank instead, the optimizer
    says to pass the same shard_size."""
    model = make_unit_net(0)
    whole = [p.numel() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    from zero_oracle import train_oracle
    train_oracle(model, opt, make_batches(2))
    expected = param_snapshot(model)
    for snap, local in run_distributed(_hybrid, 4, {"shard_size": 2}, {"shard_size": 2},
                                       timeout_s=120):
        assert all(w // 2 <= n <= -(-w // 2) for n, w in zip(local, whole)), (local, whole)
        assert_params_close(snap, expected, "sharded_init(shard_size=2) + shard_size=2")
    for message in run_distributed(_hybrid, 4, {}, {"shard_size": 2}, timeout_s=120):
        assert "sharded by sharded_init over 4 ranks" in message and "shard_size" in message
