"""`memory_report()` and `comm_stats()` against the formulas pinned in the API (zero_api.md):
per-rank optimizer bytes shrink with the world size (8 bytes of Adam state per shard element, an
fp32 master only for bf16 params), stage 2 keeps fewer gradient bytes than stage 1, and a ZeRO
step (reduce_scatter + all_gather) sends the same bytes as stage 0's all_reduce, up to padding."""
import pytest
import torch

import zeroshard
from dist_harness import run_distributed
from zero_oracle import build_optimizer, make_batches, make_model, mse_loss, rank_slice

requires_zero = pytest.mark.skipif(not hasattr(zeroshard, "ZeroAdamW"),
                                   reason="zeroshard.ZeroAdamW not implemented yet (issue 3)")
STAGES = (0, 1, 2)
DTYPES = (torch.float32, torch.bfloat16)
REPORT_KEYS = {"model_params", "grads", "master_params", "optimizer_state", "frozen_params",
               "comm_buffers", "total"}
COMM_KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")
ALIGN_BYTES = 128
CONTROL_BYTES = 256   # room for small control messages (an overflow flag, a norm) per step


def trainable_numels():
    return [p.numel() for p in make_model().parameters() if p.requires_grad]


def padded_bound(world_size, dtype=torch.float32):
    """The most padded_numel may be with one bucket: 128-byte aligned starts, total rounded up to
    a multiple of world_size * alignment."""
    align = ALIGN_BYTES // (torch.finfo(dtype).bits // 8)
    aligned = sum(-(-n // align) * align for n in trainable_numels())
    return aligned + world_size * align


def _one_step(rank, world_size):
    results = {}
    tokens, target = make_batches(1)[0]
    tokens, target = rank_slice(tokens, rank, world_size), rank_slice(target, rank, world_size)
    for dtype in DTYPES:
        for stage in STAGES:
            model = make_model(dtype=dtype)
            # default bucket_mb (one bucket for this model): padding stays small and boundable
            opt = build_optimizer("zeroshard", "AdamW", model.parameters(), stage=stage,
                                  bucket_mb=25)
            opt.zero_grad(set_to_none=True)
            opt.reset_comm_stats()
            opt.backward(mse_loss(model, tokens, target))
            opt.step()
            comm = {kind: dict(entry) for kind, entry in opt.comm_stats().items()}
            results[f"{dtype}/stage{stage}"] = {"memory": dict(opt.memory_report()), "comm": comm}
    return results


def sent(comm, kind):
    return comm.get(kind, {}).get("bytes_sent", 0)


def check_memory(report, dtype, stage, world_size):
    numel, upper = sum(trainable_numels()), padded_bound(world_size, dtype)
    elem = torch.finfo(dtype).bits // 8
    measured = report.get("measured")
    report = {k: v for k, v in report.items() if k != "measured"}
    assert set(report) == REPORT_KEYS, f"keys {sorted(report)}"
    assert all(isinstance(v, int) and v >= 0 for v in report.values()), report
    assert report["total"] == sum(v for k, v in report.items() if k != "total"), report
    if measured is not None:  # real optimizers' reports; the synthetic one below has none
        check_measured(measured, report)
    assert elem * numel <= report["model_params"] <= elem * upper, report
    state_elements = report["optimizer_state"] / 8            # exp_avg + exp_avg_sq, fp32
    assert state_elements == int(state_elements), report
    if stage == 0:   # replicated: every rank holds state for every element
        assert numel <= state_elements <= upper, report
    else:            # partitioned: shard_numel = padded_numel / world_size
        assert -(-numel // world_size) <= state_elements <= upper / world_size, report
    expected_master = 0 if dtype == torch.float32 else 4 * state_elements
    assert report["master_params"] == expected_master, report


def check_measured(measured, report):
    """The process's own numbers: CPU RSS now and at peak, which hold at least the model state."""
    assert measured["kind"] == "rss", measured
    assert isinstance(measured["peak_bytes"], int) and isinstance(measured["current_bytes"], int)
    assert 0 < measured["current_bytes"] <= measured["peak_bytes"], measured
    assert measured["peak_bytes"] >= report["total"], (measured, report)


def check_comm(comm, stage, world_size, stage0_comm):
    assert set(comm) <= set(COMM_KINDS), f"unknown kinds {sorted(comm)}"
    for kind, entry in comm.items():
        assert set(entry) == {"calls", "payload_bytes", "bytes_sent", "intra_node_bytes",
                              "inter_node_bytes"}, entry
        # spawned ranks share one node: every byte stays within it
        assert entry["intra_node_bytes"] == entry["bytes_sent"], entry
        assert entry["inter_node_bytes"] == 0, entry
        ring = 2 if kind == "all_reduce" else 1
        expected = ring * (world_size - 1) / world_size * entry["payload_bytes"]
        assert abs(entry["bytes_sent"] - expected) <= entry["calls"] + 1, f"{kind}: {entry}"
    if world_size == 1:
        assert all(e["bytes_sent"] == 0 for e in comm.values()), comm
        return
    numel, upper = sum(trainable_numels()), padded_bound(world_size)
    assert comm.get("broadcast", {}).get("calls", 0) == 0, "no broadcast in a training step"
    total = sum(e["bytes_sent"] for e in comm.values())
    if stage == 0:
        assert 4 * numel <= comm["all_reduce"]["payload_bytes"] <= 4 * upper + CONTROL_BYTES, comm
        return
    for kind in ("reduce_scatter", "all_gather"):
        assert 4 * numel <= comm[kind]["payload_bytes"] <= 4 * upper + CONTROL_BYTES, f"{kind}: {comm}"
    stage0_total = sum(e["bytes_sent"] for e in stage0_comm.values())
    padding_bytes = 2 * (world_size - 1) / world_size * 4 * (upper - numel)
    assert abs(total - stage0_total) <= padding_bytes + CONTROL_BYTES, \
        f"stage {stage} sent {total} B per step, stage 0 sent {stage0_total} B"


@requires_zero
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_memory_report_and_comm_stats_follow_the_formulas(world_size):
    per_rank = run_distributed(_one_step, world_size, timeout_s=180)
    failures = []
    for rank, result in enumerate(per_rank):
        for dtype in DTYPES:
            for stage in STAGES:
                key = f"{dtype}/stage{stage}"
                try:
                    check_memory(result[key]["memory"], dtype, stage, world_size)
                    if dtype == torch.float32:  # the bytes claim is for fp32 grads and params
                        check_comm(result[key]["comm"], stage, world_size,
                                   result[f"{dtype}/stage0"]["comm"])
                except AssertionError as err:
                    failures.append(f"rank {rank} {key} ws={world_size}: {err}")
            if world_size > 1:
                grads1 = result[f"{dtype}/stage1"]["memory"]["grads"]
                grads2 = result[f"{dtype}/stage2"]["memory"]["grads"]
                if not grads2 < grads1:
                    failures.append(f"rank {rank} {dtype}: stage 2 grads {grads2} B not below "
                                    f"stage 1's {grads1} B")
    assert not failures, "\n".join(failures)


def test_bounds_are_tight_enough_to_fail():
    """The fp32 padded bound allows under 10% padding here, so a replicated optimizer state (what
    stage 1 must not keep) fails the partitioned check at world size 3."""
    numel = sum(trainable_numels())
    assert padded_bound(3) < 1.1 * numel
    replicated = {"model_params": 4 * numel, "grads": 4 * numel, "master_params": 0,
                  "optimizer_state": 8 * numel, "frozen_params": 0, "comm_buffers": 0,
                  "total": 16 * numel}
    check_memory(replicated, torch.float32, 0, 3)
    with pytest.raises(AssertionError):
        check_memory(replicated, torch.float32, 1, 3)
