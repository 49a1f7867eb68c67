"""Smoke test of bench/bench_host_update.py: a tiny end-to-end run has one row per dtype path
and implementation, with ratios and targets. Timings are never asserted."""
from __future__ import annotations

import importlib.util
import json
import os

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "bench",
                     "bench_host_update.py")
_spec = importlib.util.spec_from_file_location("bench_host_update", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_bytes_per_param_from_dtypes():
    assert bench.bytes_per_param("mixed") == 28
    assert bench.bytes_per_param("fp32") == 28
    assert bench.bytes_per_param("fp32+copy") == 30


def test_tiny_run_has_every_path_and_ratio(tmp_path, capsys, restore_num_threads):
    out = tmp_path / "host.json"
    rc = bench.main(["--sizes", "1000,2000", "--reps", "2", "--warmup", "1", "--threads", "1",
                     "--settle-ms", "1", "--no-deepspeed", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    impls = {"zeroshard", "torch fused", "bound"}
    for n in (1000, 2000):
        for path in ("mixed", "fp32", "fp32+copy"):
            got = {r["impl"]: r for r in rows if r["numel"] == n and r["path"] == path}
            assert set(got) == impls
            assert got["zeroshard"]["ratio"] == 1.0
            assert got["torch fused"]["target"] == 1.0
            assert isinstance(got["torch fused"]["meets_target"], bool)
            assert all(r["ms"] > 0 and r["ratio"] > 0 for r in got.values())
    table = capsys.readouterr().out
    assert "fp32+copy" in table and "impl/zs" in table and ">= 1.0x" in table


def test_rejects_unknown_path(capsys):
    try:
        bench.main(["--paths", "fp64"])
    except SystemExit as err:
        assert err.code == 2
    else:
        raise AssertionError("an unknown path must be refused")
