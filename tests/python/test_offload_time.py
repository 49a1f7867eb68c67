"""zeroshard.memory.offload_time: the offloaded step's bytes are the ones the library moves (its
d2h/h2d counters), and the time follows from them as [Note: offloaded step time] says."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_harness import run_distributed  # noqa: E402

import zeroshard  # noqa: E402
from zeroshard.memory.offload_time import offloaded_step_time  # noqa: E402


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.GELU(),
                               torch.nn.Linear(160, 96)).to(dtype)


def _counted(rank, world_size, dtype_name, stage):
    dtype = getattr(torch, dtype_name)
    model = _model(dtype)
    opt = zeroshard.ZeroAdamW(model, stage=stage, lr=1e-3, offload="cpu", bucket_mb=0.01)
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(rank)).to(dtype)
    for step in range(2):
        if step == 1:
            opt.reset_comm_stats()
        opt.zero_grad()
        opt.backward(model(x).float().pow(2).mean())
        opt.step()
    stats = opt.comm_stats()
    return stats["d2h"]["bytes"], stats["h2d"]["bytes"]


@pytest.mark.parametrize("world_size,dtype,stage", [(1, "float32", 2), (2, "bfloat16", 2),
                                                    (2, "float32", 3), (3, "bfloat16", 1)])
def test_predicted_bytes_are_the_bytes_offload_moves(world_size, dtype, stage):
    numel = sum(p.numel() for p in _model(torch.float32).parameters())
    predicted = offloaded_step_time(numel, world_size=world_size, host_bytes_per_s=1e10,
                                    link_bytes_per_s=1e10, param_dtype=getattr(torch, dtype))
    for rank, (d2h, h2d) in enumerate(run_distributed(_counted, world_size, dtype, stage)):
        # the library's shard is padded to alignment at bucket edges: a few elements more
        for what, got, want in (("d2h", d2h, predicted["d2h_bytes"]),
                                ("h2d", h2d, predicted["h2d_bytes"])):
            assert want <= got <= want * 1.03 + 256, (rank, what, got, want)


def test_a_bf16_landing_halves_the_link_time_and_the_update_sets_the_pace():
    kw = dict(world_size=8, host_bytes_per_s=40e9, link_bytes_per_s=25e9, device_step_s=0.5)
    bf16 = offloaded_step_time(1_560_000_000, **kw)
    fp32 = offloaded_step_time(1_560_000_000, offload_grad_dtype=torch.float32, **kw)
    assert fp32["d2h_bytes"] == 2 * bf16["d2h_bytes"] == 2 * 2 * 195_000_000
    # AdamW, fp32 gradient shard, bf16 parameters: 4 + 8 + 16 + 2 bytes a parameter
    assert bf16["host_update_bytes"] == 195_000_000 * 30
    assert bf16["update_s"] == pytest.approx(195_000_000 * 30 / 40e9)
    # the landing hides under backward here; the update (not the upload) sets the pace
    assert bf16["exposed_landing_s"] == 0 and bf16["update_s"] > bf16["upload_s"]
    assert bf16["step_s"] == pytest.approx(0.5 + bf16["update_s"] + bf16["upload_s"] / 64)
    slow_link = offloaded_step_time(1_560_000_000, **dict(kw, link_bytes_per_s=1e9))
    assert slow_link["exposed_landing_s"] > 0 and slow_link["step_s"] > bf16["step_s"]
    with pytest.raises(ValueError, match="optimizer must be one of"):
        offloaded_step_time(10, world_size=1, host_bytes_per_s=1, link_bytes_per_s=1,
                            optimizer="lamb")


def test_the_cpu_bench_prints_measured_against_predicted(tmp_path, capsys):
    """Smoke test of bench/bench_offload_time.py (timings are never asserted)."""
    import importlib.util
    import json
    path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "bench",
                        "bench_offload_time.py")
    spec = importlib.util.spec_from_file_location("bench_offload_time", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "t.json"
    assert bench.main(["--params", "3e5", "--reps", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows["update_s"] > 0 and rows["update_predicted_s"] > 0 and rows["params"] > 0
    assert "update + upload (step())" in capsys.readouterr().out
