"""Smoke tests of bench/bench_ops.py: its GPT-2-medium shape model and a tiny end-to-end run,
so the benchmark does not rot between the runs that use it. Timings are never asserted."""
from __future__ import annotations

import importlib.util
import json
import os

import torch

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "bench", "bench_ops.py")
_spec = importlib.util.spec_from_file_location("bench_ops", _PATH)
bench_ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_ops)


def test_gpt2_medium_shapes_match_the_model():
    shapes = bench_ops.gpt2_medium_shapes()
    assert len(shapes) == 292
    # Hugging Face's gpt2-medium (tied LM head) has 354,823,168 parameters.
    assert bench_ops.numel_of(shapes) == 354_823_168
    assert len(bench_ops.gpt2_medium_shapes(0.25)) == 292


def test_bytes_per_param_from_dtypes():
    assert bench_ops.bytes_per_param(torch.float32, None) == 28
    assert bench_ops.bytes_per_param(torch.bfloat16, torch.bfloat16) == 28
    assert bench_ops.bytes_per_param(torch.float32, torch.bfloat16) == 30


def test_tiny_run_writes_json(tmp_path, restore_num_threads):
    out = tmp_path / "bench.json"
    rc = bench_ops.main(["--numel", "1000", "--gpt2-scale", "0.02", "--reps", "1", "--warmup", "1",
                         "--threads", "1", "--no-deepspeed", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["case"], r["variant"]) for r in rows} == {
        (c, v) for c in ("flat", "gpt2") for v in ("fp32", "mixed")}
    three = {"zeroshard", "torch foreach", "torch fused"}
    assert {r["impl"] for r in rows if r["variant"] == "fp32"} == three
    # mixed adds the GPU target's baseline: fp32 grads (no cast), fused step, bf16 copy
    assert {r["impl"] for r in rows if r["variant"] == "mixed"} == three | {"torch fused + copy"}
    assert all(r["ms"] > 0 and r["ratio_vs_zeroshard"] > 0 for r in rows)
    assert data["settings"]["zeroshard_threads"] == 1
