"""The table bench/gpu_check.sh prints last: each step's status, then the GPU targets of issue 8
as measured vs target. Reads what the steps left in one results folder:

  steps.tsv        name <TAB> status <TAB> seconds <TAB> limit   (one line per step, by the script)
  zs_bench.json    zs_bench --device gpu --json: copy ceiling, fused step, norm rows
  bench_ops.json   bench/bench_ops.py --device cuda --variants mixed --json
  zero_step.json   bench/bench_zero_step.py --json
  pytest.log       the GPU tests' output (its last summary line)

A missing file or row shows as "not measured", never as a pass. `--sample DIR` writes files of
the same shape (made-up numbers) for the script's dry run, which tests this table on a CPU.
Standard library only: it runs before, and whether or not, anything else worked.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

# (row label, how to measure it, target text, test on the measured value)
COPY_ROW = "copy ceiling (d2d)"
STEP_ROW = "adamw bf16 grad+copy, no check"   # 28 B/param
CHECKED_ROW = "adamw bf16 grad+copy"          # 28 + 2 B/param (separate finite check)
NORM_ROW = "l2 norm bf16"
STEP_TARGET_PCT, NORM_TARGET_PCT = 92.0, 85.0
GPT2_SPEEDUP_TARGET, ZERO_STEP_RATIO_TARGET = 1.3, 1.03


def _load(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _steps(folder: str) -> List[Tuple[str, str, str, str]]:
    rows = []
    try:
        with open(os.path.join(folder, "steps.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 4:
                    rows.append(tuple(parts))
    except OSError:
        pass
    return rows


def _pytest_line(folder: str) -> str:
    try:
        with open(os.path.join(folder, "pytest.log"), errors="replace") as f:
            lines = [ln.strip() for ln in f if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    except OSError:
        return ""
    return lines[-1].strip("= ") if lines else ""


def _verdict(value: Optional[float], target: float, at_least: bool) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if at_least else value <= target
    return "PASS" if ok else "MISS"


def targets(folder: str) -> List[Dict]:
    """The issue's targets as rows: what, measured (text), target (text), verdict."""
    out: List[Dict] = []
    zs = _load(os.path.join(folder, "zs_bench.json")) or {}
    by_what = {r.get("what"): r for r in zs.get("rows", []) if r.get("device") == "gpu"}
    copy = by_what.get(COPY_ROW)
    copy_text = f"{copy['gb_per_s']:.0f} GB/s (r+w)" if copy else "not measured"
    out.append(dict(what="device copy (ceiling)", measured=copy_text, target="", verdict=""))

    def pct_row(label, row_name, target_pct):
        row = by_what.get(row_name)
        pct = row["pct_of_copy_ceiling"] if row and copy else None
        measured = (f"{row['gb_per_s']:.0f} GB/s = {pct:.1f}% copy, {row['ms']:.2f} ms"
                    if pct is not None else "not measured")
        out.append(dict(what=label, measured=measured,
                        target=f">= {target_pct:g}% copy" if target_pct else "(info)",
                        verdict=_verdict(pct, target_pct, True) if target_pct else "",
                        value=pct))

    n = by_what.get(STEP_ROW, {}).get("n")
    size = f", {n / 1e9:g}B" if n else ""
    pct_row(f"adamw bf16 28 B/param{size}", STEP_ROW, STEP_TARGET_PCT)
    pct_row("  + finite check, 30 B/param", CHECKED_ROW, 0.0)
    pct_row("l2 norm bf16, 2 B/param", NORM_ROW, NORM_TARGET_PCT)

    ops = _load(os.path.join(folder, "bench_ops.json")) or {}
    gpt2 = {r.get("impl"): r for r in ops.get("rows", [])
            if r.get("case") == "gpt2" and r.get("variant") == "mixed"}
    ours, base = gpt2.get("zeroshard"), gpt2.get("torch fused + copy")
    speedup = base["ms"] / ours["ms"] if ours and base else None
    out.append(dict(
        what="gpt2-medium step vs torch fused+copy",
        measured=(f"{speedup:.2f}x ({ours['ms']:.2f} vs {base['ms']:.2f} ms)"
                  if speedup is not None else "not measured"),
        target=f">= {GPT2_SPEEDUP_TARGET:g}x", verdict=_verdict(speedup, GPT2_SPEEDUP_TARGET, True),
        value=speedup))

    zero = _load(os.path.join(folder, "zero_step.json")) or {}
    ratio = zero.get("step_ratio")
    out.append(dict(
        what=f"ZeroAdamW stage {zero.get('stage', 2)} train step / torch",
        measured=(f"{ratio:.3f}x ({zero['zeroshard_step_ms']:.1f} vs "
                  f"{zero['torch_step_ms']:.1f} ms)" if ratio is not None else "not measured"),
        target=f"<= {ZERO_STEP_RATIO_TARGET:g}x",
        verdict=_verdict(ratio, ZERO_STEP_RATIO_TARGET, False), value=ratio))
    return out


def render(folder: str, elapsed: int, budget: int, out_dir: str, dry_run: bool = False) -> str:
    dry = " -- DRY RUN: nothing ran on a GPU, the numbers are made up" if dry_run else ""
    lines = [f"==== gpu_check summary: {elapsed} s of a {budget} s budget{dry} ===="]
    lines.append(f"{'step':<13}{'status':<22}{'s':>5}{'limit':>7}")
    for name, status, seconds, limit in _steps(folder):
        lines.append(f"{name:<13}{status:<22}{seconds:>5}{limit:>7}")
    tests = _pytest_line(folder)
    if tests:
        lines.append(f"gpu tests: {tests}")
    lines.append("")
    lines.append(f"{'target (issue 8)':<40}{'measured':<38}{'target':<16}verdict")
    for t in targets(folder):
        lines.append(f"{t['what']:<40}{t['measured']:<38}{t['target']:<16}{t['verdict']}")
    trace = os.path.join(out_dir, "zero_step_trace.json.gz")
    lines.append(f"trace: {trace if os.path.exists(trace) else 'not written'}; "
                 f"logs: {os.path.join(out_dir, 'gpu_check.log')}, logs.tar.gz")
    return "\n".join(lines)


SAMPLES = ("zs_bench", "bench_ops", "zero_step")


def write_sample(folder: str, which: str) -> None:
    """Made-up results of one real file's shape (zs_bench, bench_ops, zero_step), for the dry
    run: each dry step writes its own, so a step that fails leaves its targets unmeasured."""
    os.makedirs(folder, exist_ok=True)

    def zs_row(what, ms, step_bytes, check_bytes, gbps, pct):
        return dict(device="gpu", what=what, n=1000000000, ms=ms, gparams_per_s=1e9 / ms / 1e6,
                    step_bytes_per_param=step_bytes, check_bytes_per_param=check_bytes,
                    gb_per_s=gbps, pct_of_copy_ceiling=pct)
    if which == "zs_bench":
        with open(os.path.join(folder, "zs_bench.json"), "w") as f:
            json.dump(dict(settings=dict(variant="cu13"), rows=[
                zs_row(COPY_ROW, 7.44, 32, 0, 4300.0, 100.0),
                zs_row(CHECKED_ROW, 7.30, 28, 2, 4110.0, 95.6),
                zs_row(STEP_ROW, 6.90, 28, 0, 4058.0, 94.4),
                zs_row(NORM_ROW, 0.52, 2, 0, 3846.0, 89.4)]), f)
    elif which == "bench_ops":
        with open(os.path.join(folder, "bench_ops.json"), "w") as f:
            json.dump(dict(settings=dict(device="cuda"), rows=[
                dict(case="gpt2", variant="mixed", impl="zeroshard", ms=2.60),
                dict(case="gpt2", variant="mixed", impl="torch fused", ms=5.90),
                dict(case="gpt2", variant="mixed", impl="torch fused + copy", ms=5.38)]), f)
    elif which == "zero_step":
        with open(os.path.join(folder, "zero_step.json"), "w") as f:
            json.dump(dict(stage=2, step_ratio=0.98, opt_ratio=0.55, zeroshard_step_ms=101.0,
                           torch_step_ms=103.0), f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", required=True, help="the folder the steps wrote into")
    ap.add_argument("--out-dir", default="", help="where the trace and logs were saved")
    ap.add_argument("--elapsed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="say so in the table's title")
    ap.add_argument("--sample", choices=SAMPLES, help="write made-up results of this step, exit")
    args = ap.parse_args(argv)
    if args.sample:
        write_sample(args.results, args.sample)
        return 0
    print(render(args.results, args.elapsed, args.budget, args.out_dir or args.results,
                 args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
