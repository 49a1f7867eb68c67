"""bench/bench_step_ratio.py: every row in one job, steps interleaved; the report's ratios,
targets and its check that the rows trained the same model."""
from __future__ import annotations

import importlib.util
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "bench"))
_spec = importlib.util.spec_from_file_location(
    "bench_step_ratio", os.path.join(REPO, "bench", "bench_step_ratio.py"))
bench_step_ratio = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_step_ratio)


def test_report_judges_each_target_and_the_rows_losses():
    results = {"step_s": {"ddp": 1.0, "zero1": 0.99, "zero2": 1.02, "zero3": 1.06},
               "first_loss": {"ddp": 5.0, "zero1": 5.0, "zero2": 5.0, "zero3": 5.0},
               "phase_s": {row: [0.3, 0.6, 0.1] for row in ("ddp", "zero1", "zero2", "zero3")}}
    lines = bench_step_ratio.report(results)
    assert "(forward 300, backward 600, clip + step 100 ms)" in lines[0]
    assert "stage 1 step: 0.99x DDP (target <= 1.00x: met)" in lines
    assert "stage 2 step: 1.02x DDP (target <= 1.00x: NOT met)" in lines
    assert "stage 3 step: 1.04x our stage 2 (target <= 1.05x: met)" in lines
    assert lines[-1].endswith("the same model and batch in every row")
    results["first_loss"]["zero2"] = 5.01
    assert "DIFFER by 1.00e-02" in bench_step_ratio.report(results)[-1]


def test_a_small_run_times_every_row_on_the_same_model(capsys):
    assert bench_step_ratio.main(["--model", "tiny", "--rounds", "2", "--warmup-rounds", "1",
                                  "--seq-len", "16", "--batch-size", "2", "--timeout",
                                  "300"]) == 0
    out = capsys.readouterr().out
    for label in ("torch DDP + AdamW", "zeroshard stage 1", "zeroshard stage 2",
                  "zeroshard stage 3"):
        line = next(line for line in out.splitlines() if line.startswith(label))
        assert float(re.search(r"([\d.]+) ms", line).group(1)) > 0
        phases = re.search(r"forward (\d+), backward (\d+), clip \+ step (\d+) ms", line)
        assert phases is not None, line
    assert "the same model and batch in every row" in out
