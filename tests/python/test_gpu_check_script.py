"""bench/gpu_check.sh on a CPU: its dry run (GPU steps replaced by echoes that leave made-up
results) proves the control flow, the per-step time limits, the 8-minute budget, what comes
back under $OUT, and the table printed last. What the GPU steps measure needs a GPU machine.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
STEPS = ["preflight", "configure", "build", "env", "pytest", "zs_bench", "bench_ops", "zero_step",
         "example"]
TARGETS = ["adamw bf16 28 B/param", "l2 norm bf16", "gpt2-medium step vs torch fused+copy",
           "ZeroAdamW stage 2 train step / torch"]
# What the device tool returns from $OUT: at most 8 files, names of letters, digits, '.', '_', '-'.
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

_spec = importlib.util.spec_from_file_location(
    "gpu_check_report", os.path.join(ROOT, "bench", "gpu_check_report.py"))
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

_ops_spec = importlib.util.spec_from_file_location(
    "bench_ops", os.path.join(ROOT, "bench", "bench_ops.py"))


def run_check(tmp_path, dry=True, **env):
    out = tmp_path / "out"
    full_env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path))
    full_env.pop("GPU_CHECK_BUDGET_S", None)
    if dry:
        full_env["GPU_CHECK_DRY_RUN"] = "1"
    full_env.update(env)
    start = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT], cwd=str(tmp_path), env=full_env, capture_output=True,
                          text=True, timeout=120)
    return proc, time.monotonic() - start, out


def step_rows(output: str) -> dict:
    """{step: (status, seconds, limit)} from the summary table."""
    rows = {}
    for line in output.splitlines():
        m = re.match(r"^(\w+)\s{2,}(.+?)\s+(\d+)\s+(\d+|-)$", line)
        if m and m.group(1) in STEPS:
            rows[m.group(1)] = (m.group(2), int(m.group(3)), m.group(4))
    return rows


def target_verdicts(output: str) -> dict:
    verdicts = {}
    for line in output.splitlines():
        for t in TARGETS:
            if line.startswith(t):
                verdicts[t] = line.rsplit("  ", 1)[-1].strip()
    return verdicts


def test_dry_run_runs_every_step_and_prints_the_table_last(tmp_path):
    proc, seconds, out = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert seconds < 30
    text = proc.stdout
    rows = step_rows(text)
    assert list(rows) == STEPS and all(status == "ok" for status, _, _ in rows.values()), rows
    # the limits add up to the budget, and the budget leaves room for a rerun in 15 minutes
    assert sum(int(limit) for _, _, limit in rows.values()) <= 470
    assert "of a 470 s budget" in text and "DRY RUN" in text
    # the table is last: its title, then nothing but table lines
    tail = text[text.rindex("==== gpu_check summary"):].splitlines()
    assert tail[-1].startswith("trace: ")
    assert target_verdicts("\n".join(tail)) == {t: "PASS" for t in TARGETS}
    for step in STEPS[1:]:
        assert f"==== {step} (limit" in text, f"no section for {step}"
    assert "[dry run] would run: ninja -C build-gpu -j" in text
    assert "--device gpu --gpu-sizes 1e9" in text  # zs_bench: GPU rows only
    files = sorted(os.listdir(out))
    assert files == ["gpu_check.log", "logs.tar.gz", "summary.txt"]
    assert all(OUT_NAME.match(f) and (out / f).is_file() for f in files)
    assert (out / "summary.txt").read_text().strip() in text
    assert (out / "gpu_check.log").read_text() == text  # the whole console, as it was written


def test_a_hung_step_is_killed_at_its_limit_and_the_rest_still_run(tmp_path):
    proc, seconds, _ = run_check(tmp_path, GPU_CHECK_DRY_LIMIT_S="1", GPU_CHECK_DRY_HANG="zs_bench")
    assert proc.returncode == 1
    assert seconds < 30, "the hung step was not killed at its limit"
    rows = step_rows(proc.stdout)
    assert rows["zs_bench"][0] == "TIMEOUT (1s)" and rows["zs_bench"][1] <= 3
    assert rows["bench_ops"][0] == "ok" and rows["example"][0] == "ok"
    verdicts = target_verdicts(proc.stdout)
    assert verdicts["adamw bf16 28 B/param"] == "not measured"
    assert verdicts["l2 norm bf16"] == "not measured"
    assert verdicts["gpt2-medium step vs torch fused+copy"] == "PASS"


def test_the_budget_clamps_every_limit_and_skips_what_no_longer_fits(tmp_path):
    proc, seconds, _ = run_check(tmp_path, GPU_CHECK_BUDGET_S="4", GPU_CHECK_DRY_HANG="pytest")
    assert proc.returncode == 1
    assert seconds < 30
    rows = step_rows(proc.stdout)
    status, spent, limit = rows["pytest"]
    assert status.startswith("TIMEOUT") and int(limit) <= 4
    for step in ("zs_bench", "bench_ops", "zero_step", "example"):
        assert rows[step][0] == "SKIPPED (budget spent)", rows


def test_a_failed_build_skips_the_gpu_steps(tmp_path):
    proc, _, _ = run_check(tmp_path, GPU_CHECK_DRY_FAIL="build")
    assert proc.returncode == 1
    rows = step_rows(proc.stdout)
    assert rows["configure"][0] == "ok" and rows["build"][0] == "FAILED (rc=1)"
    assert all(rows[s][0] == "SKIPPED (no build)" for s in STEPS[3:]), rows
    assert "==== env (limit" not in proc.stdout


def test_missing_python_stops_before_anything_starts(tmp_path):
    # Not a dry run: the real preflight, on any machine.
    proc, seconds, out = run_check(tmp_path, dry=False, PYTHON=str(tmp_path / "no" / "python3"))
    assert proc.returncode == 2
    assert seconds < 30
    assert "cannot run here; nothing was started" in proc.stdout
    assert f"missing: python '{tmp_path / 'no' / 'python3'}'" in proc.stdout
    assert "==== configure" not in proc.stdout
    assert step_rows(proc.stdout)["preflight"][0] == "FAILED (missing)"
    assert (out / "summary.txt").exists()


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_report_reads_what_bench_ops_really_writes(tmp_path, restore_num_threads):
    # The dry run's sample files could drift from the real ones: feed the table a real (tiny,
    # CPU) bench_ops.py result and check the GPT-2 target is measured from it.
    bench_ops = importlib.util.module_from_spec(_ops_spec)
    _ops_spec.loader.exec_module(bench_ops)
    rc = bench_ops.main(["--cases", "gpt2", "--variants", "mixed", "--gpt2-scale", "0.02",
                         "--reps", "1", "--warmup", "1", "--threads", "1", "--no-deepspeed",
                         "--json", str(tmp_path / "bench_ops.json")])
    assert rc == 0
    rows = {t["what"]: t for t in report.targets(str(tmp_path))}
    row = rows["gpt2-medium step vs torch fused+copy"]
    assert row["value"] is not None and row["value"] > 0
    assert row["verdict"] in ("PASS", "MISS")


def test_report_reads_zs_bench_row_names_from_the_source():
    # zs_bench is a C++ program (no GPU here to run it): its row names must be the ones the
    # table looks up.
    with open(os.path.join(ROOT, "bench", "zs_bench.cpp")) as f:
        source = f.read()
    for name in (report.COPY_ROW, report.STEP_ROW, report.CHECKED_ROW, report.NORM_ROW):
        assert f'"{name}"' in source, name
