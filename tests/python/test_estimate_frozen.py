"""`zeroshard.estimate` with frozen parameters (requires_grad=False): partitioned at stage 3
(partition_frozen), whole otherwise, against the stage-3 optimizer's memory_report()."""
import os
import sys

import pytest
import torch

import zeroshard
from dist_harness import run_distributed
from zeroshard import estimate
from zeroshard.estimate import (estimate_model_states, format_bytes, frozen_numels_of,
                                frozen_units_of, param_numels_of, param_units_of)
from zeroshard.memory.model_shapes import uniform_numels, uniform_units, units_after

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples"))
from gpt import GPT, GPTConfig  # noqa: E402  (examples/gpt.py)
from test_estimate import (ALL_KEYS, DTYPES, GPT_CONFIG, MODEL_STATE_KEYS,  # noqa: E402
                           TINY_BUCKET_MB, _row)

NICE_GPT = GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, d_model=64,
                     default_seq_len=8)  # each unit's frozen elements a multiple of 256: no padding


def _frozen_gpt(config, dtype=torch.float32):
    """examples' GPT with its matrices and embeddings frozen, biases and norms trained: a frozen
    base of 98% of NICE_GPT's elements."""
    model = GPT(config).to(dtype)
    for p in model.parameters():
        p.requires_grad_(p.dim() == 1)
    return model


def _alone_and_with_frozen(model, stage, **settings):
    units = dict(units=param_units_of(model)) if stage == 3 else {}
    return [estimate_model_states(param_numels_of(model), stage=stage, **units, **settings, **more)
            for more in ({}, dict(frozen_numels=frozen_numels_of(model),
                                  frozen_units=frozen_units_of(model)))]


@pytest.mark.parametrize("stage,partition_frozen,dtype_name,offload", [
    (3, True, "fp32", None), (3, True, "bf16", None), (3, False, "bf16", None),
    (2, True, "bf16", None), (2, True, "bf16", "cpu"), (0, True, "fp32", None)])
def test_frozen_params_partitioned_at_stage3_whole_otherwise(stage, partition_frozen, dtype_name,
                                                             offload):
    model = _frozen_gpt(NICE_GPT, DTYPES[dtype_name])
    frozen_bytes = sum(p.nbytes for p in model.parameters() if not p.requires_grad)
    assert frozen_bytes > 0.9 * sum(p.nbytes for p in model.parameters())
    alone, frozen = _alone_and_with_frozen(model, stage, world_size=4, dtype=dtype_name,
                                           bucket_mb=TINY_BUCKET_MB, offload=offload,
                                           partition_frozen=partition_frozen)
    partitioned = stage == 3 and partition_frozen
    assert alone["frozen_params"] == 0
    assert frozen["frozen_params"] == frozen_bytes // (4 if partitioned else 1)
    assert frozen["total"] == alone["total"] + frozen["frozen_params"]  # device, offload or not
    for key in MODEL_STATE_KEYS + ("comm_buffers", "host_bytes"):
        assert frozen[key] == alone[key], key
    if stage == 3:  # partitioned, they are gathered with the root and the two largest blocks
        last_block = sum(p.nbytes for p in model.blocks[2].parameters() if not p.requires_grad)
        assert frozen["live_units"] - alone["live_units"] == (
            frozen_bytes - last_block if partitioned else 0)
        assert frozen["peak_total"] == frozen["total"] + frozen["live_units"]


def test_without_frozen_params_nothing_changes():
    assert frozen_numels_of(GPT(NICE_GPT)) == [] == frozen_units_of(GPT(NICE_GPT))
    # The estimator's numbers before frozen parameters, with two empty ones (the optimizer
    # leaves them out), one in a unit of its own.
    stage3 = estimate_model_states([7, 1000, 561, 4099], world_size=4, stage=3, dtype="bf16",
                                   units=[0, 1, 1, 2], bucket_mb=0.001, frozen_numels=[0, 0],
                                   frozen_units=[1, 5])
    # (comm_buffers: three staging slots and two gloo receive buffers, one per collective in
    # flight; 12288 B, with a third receive buffer, before buffer_ring pooled them)
    assert stage3 == dict(model_params=3200, grads=6400, master_params=6400,
                          optimizer_state=12800, frozen_params=0, comm_buffers=10240,
                          live_units=12800, total=39040, host_bytes=0, peak_total=51840)
    assert estimate_model_states([10], world_size=2, stage=1, frozen_numels=[100],
                                 frozen_dtype="bf16")["frozen_params"] == 200


def _frozen_reports_on_rank(rank, world_size):
    model = _frozen_gpt(GPT_CONFIG)  # awkward sizes: padded shards
    opt = zeroshard.ZeroAdamW(model, stage=3, lr=1e-3, bucket_mb=TINY_BUCKET_MB)
    tokens = torch.randint(0, GPT_CONFIG.vocab_size, (2, 9))
    opt.zero_grad()
    opt.backward(model(tokens[:, :-1], tokens[:, 1:]))
    opt.step()
    return dict(report=dict(opt.memory_report(), measured=None),
                shards=sum(fg.shard_param.nbytes for fg in opt.frozen_groups),
                unit_bytes={u.index: u.full_nbytes for u in opt.units.units})


def test_frozen_params_match_the_stage3_optimizer():
    whole = sum(p.nbytes for p in _frozen_gpt(GPT_CONFIG).parameters() if not p.requires_grad)
    _, frozen = _alone_and_with_frozen(_frozen_gpt(GPT_CONFIG), 3, world_size=2,
                                       bucket_mb=TINY_BUCKET_MB)
    for real in run_distributed(_frozen_reports_on_rank, 2, timeout_s=180):
        assert frozen["frozen_params"] == real["shards"] and whole / 2 < real["shards"] < whole
        for key in ALL_KEYS + ("frozen_params",):  # total: once memory_report counts them
            if key in real["report"] and (key != "total" or "frozen_params" in real["report"]):
                assert real["report"][key] == frozen[key], key
        largest = sorted((b for u, b in real["unit_bytes"].items() if u), reverse=True)
        assert frozen["live_units"] == real["unit_bytes"][0] + sum(largest[:2])


def test_cli_frozen_column_and_no_partition_frozen(capsys):
    units, frozen_numels = uniform_units(20 * 10 ** 6), uniform_numels(180 * 10 ** 6)
    for partition, extra in ((True, []), (False, ["--no-partition-frozen"])):
        assert estimate.main(["--params", "20M", "--frozen", "180M", "--world-size", "4",
                              "--stage", "2", "3"] + extra) == 0
        lines = capsys.readouterr().out.splitlines()
        assert "frozen" in lines[3].split()  # the table's header
        report = estimate_model_states(
            uniform_numels(20 * 10 ** 6), world_size=4, stage=3, backend="nccl", units=units,
            frozen_numels=frozen_numels, frozen_units=units_after(units, len(frozen_numels)),
            partition_frozen=partition)
        expected = 4 * 180 * 10 ** 6 // (4 if partition else 1)
        assert expected <= report["frozen_params"] < expected + 11 * 4 * 128  # 11 units' padding
        for key in ALL_KEYS + ("frozen_params",):
            assert format_bytes(report[key]) in _row(lines, 3, 4), (partition, key)
        assert format_bytes(4 * 180 * 10 ** 6) in _row(lines, 2, 4)  # whole below stage 3
