"""Smoke test of bench/bench_quantize.py: a tiny run has a row per op, width and dtype, each with
its bandwidth and its ratio to the copy bound (and to torch where torch has the op). Timings are
never asserted."""
from __future__ import annotations

import importlib.util
import json
import os

import torch

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "bench",
                     "bench_quantize.py")
_spec = importlib.util.spec_from_file_location("bench_quantize", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_torch_rule_is_the_kernels():
    x = torch.randn(4096)
    q, scales = bench.torch_quantize(x, 8, 2048)
    from zeroshard import ops
    ours_q, ours_scales = ops.quantize(x, bits=8, block=2048)
    assert torch.equal(q.view(-1), ours_q) and torch.equal(scales, ours_scales)


def test_tiny_run_has_every_row(tmp_path):
    out = tmp_path / "q.json"
    assert bench.main(["--numel", "8192", "--block", "256", "--reps", "2", "--json",
                       str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 12
    for r in rows:
        assert r["GB/s"] > 0 and r["of bound"] > 0
        assert ("vs torch" in r) == (r["bits"] == 8 or r["op"] == "quantize")
