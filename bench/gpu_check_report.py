"""The table bench/gpu_check.sh prints last: each step's status, then the GPU targets of issue 8,
of stage 3 and of CPU offload (issue 11) as measured vs target. Reads what the steps left in one results folder:

  steps.tsv        name <TAB> status <TAB> seconds <TAB> limit   (one line per step, by the script)
  zs_bench.json    zs_bench --device gpu --json: copy ceiling, fused step, norm rows
  bench_ops.json   bench/bench_ops.py --device cuda --variants mixed --json
  zero_step.json   bench/bench_zero_step.py --stage 2 --json (vs torch)
  zero_step3.json  bench/bench_zero_step.py --stage 3 --baseline stage2 --json: stage 3 vs 2
                   in one process, memory of both, the all-gathers' overlap from its trace
  offload.json     bench/bench_zero_step.py --model gpt2-xl --stage 2 --offload cpu
                   --baseline stage2 --json: offload vs the same run without it, in one process
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
STAGE3_RATIO_TARGET = 1.05  # stage 3 step time / stage 2's, world size 1 (NCCL), gpt2-medium bf16
# Issue 11, GPT-2 XL bf16 batch 4x1024 at stage 2: offload="cpu" keeps >= 85% of the tokens/s of
# the same run without offload, and a step takes <= 0.6 s (DeepSpeed ZeRO-2 + CPU offload: 1.19 s
# a step on an H100).
OFFLOAD_TOKENS_TARGET_PCT, OFFLOAD_STEP_TARGET_S = 85.0, 0.6
OFFLOAD_MODEL, OFFLOAD_BATCH = "gpt2-xl", [4, 1024]
OFFLOAD_TOKENS_ROW = "offload tokens/s vs the same run without offload"
OFFLOAD_STEP_ROW = "offload step time"
OFFLOAD_MEMORY_ROW = "  offload device / host memory"
TRACES = ("zero_step_trace.json.gz", "zero_step3_trace.json.gz")


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
    out.extend(stage3_rows(zero, _load(os.path.join(folder, "zero_step3.json")) or {}))
    out.extend(offload_rows(_load(os.path.join(folder, "offload.json")) or {}))
    return out


def _ms(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) else None


def stage3_rows(zero2: dict, zero3: dict) -> List[Dict]:
    """Stage 3 vs stage 2: step time ratio (from zero_step3.json's own stage-2 baseline, else
    from zero_step.json's stage-2 run), the all-gathers' overlap with compute in its trace, and
    the peak memory of both (information: at one rank stage 3 shards nothing)."""
    out: List[Dict] = []
    s3 = _ms(zero3.get("zeroshard_step_ms")) if zero3.get("stage") == 3 else None
    s2, note = None, ""
    if s3 is not None and zero3.get("baseline") == "stage2":
        s2 = _ms(zero3.get("baseline_step_ms"))
    if s3 is not None and s2 is None and zero2.get("stage", 2) == 2:
        s2, note = _ms(zero2.get("zeroshard_step_ms")), ", 2 runs"
    ratio = s3 / s2 if s3 is not None and s2 else None
    out.append(dict(
        what="ZeroAdamW stage 3 step / stage 2",
        measured=(f"{ratio:.3f}x ({s3:.1f} vs {s2:.1f} ms{note})" if ratio is not None
                  else f"not measured{f' (stage 3: {s3:.1f} ms)' if s3 is not None else ''}"),
        target=f"<= {STAGE3_RATIO_TARGET:g}x", verdict=_verdict(ratio, STAGE3_RATIO_TARGET, False),
        value=ratio, stage3_ms=s3, stage2_ms=s2))

    overlap = zero3.get("overlap") if s3 is not None else None
    overlap = overlap if isinstance(overlap, dict) else {}
    row, what = overlap.get("all_gather") or {}, "gathers"
    if not row.get("gpu_ops") and (overlap.get("side_stream") or {}).get("gpu_ops"):
        row, what = overlap["side_stream"], "comm ops"  # launches not tied to labels
    fraction = row.get("overlap_fraction") if row.get("gpu_ops") else None
    if fraction is not None:
        measured = (f"{fraction * 100:.0f}% of {row['gpu_ms']:.2f} ms, "
                    f"{row.get('ops_overlapping', 0)}/{row['gpu_ops']} {what}")
        verdict = "PASS" if row.get("overlapped_ms", 0) > 0 else "MISS"
    else:
        measured = "not measured" + (f" ({overlap['error']})"[:26] if "error" in overlap else "")
        verdict = "not measured"
    out.append(dict(what="stage 3 all-gathers overlap compute", measured=measured,
                    target="visible (> 0)", verdict=verdict, value=fraction))

    def peak(memory) -> Optional[float]:
        measured = (memory or {}).get("measured") if isinstance(memory, dict) else None
        value = (measured or {}).get("peak_bytes")
        return value / 2 ** 30 if isinstance(value, (int, float)) else None
    p3 = peak(zero3.get("zeroshard_memory")) if s3 is not None else None
    p2 = peak(zero3.get("baseline_memory")) if zero3.get("baseline") == "stage2" else None
    if p2 is None and zero2.get("stage", 2) == 2:
        p2 = peak(zero2.get("zeroshard_memory"))
    measured = "not measured"
    if p3 is not None:
        measured = f"{p3:.2f} GiB peak" + (f" vs {p2:.2f} GiB" if p2 is not None else "")
    out.append(dict(what="  stage 3 / stage 2 memory", measured=measured,
                    target="(info)", verdict="", value=p3))
    return out


def offload_rows(data: dict) -> List[Dict]:
    """Issue 11 from offload.json: tokens/s with offload="cpu" as a share of the same stage-2
    run's without it (its own baseline, same process), the offloaded step's time (the target is
    for GPT-2 XL at batch 4x1024 only: another shape is reported, not judged), and the bytes on
    the device and on the host (information). A file whose run did not offload measures nothing."""
    out: List[Dict] = []
    on = data.get("offload") == "cpu"
    ours = _ms(data.get("zeroshard_tokens_per_s")) if on else None
    base = (_ms(data.get("baseline_tokens_per_s"))
            if on and data.get("baseline") == "stage2" and data.get("stage", 2) == 2 else None)
    pct = ours / base * 100 if ours is not None and base else None
    out.append(dict(
        what=OFFLOAD_TOKENS_ROW,
        measured=(f"{pct:.1f}% ({ours:,.0f} vs {base:,.0f} tok/s)" if pct is not None
                  else "not measured"),
        target=f">= {OFFLOAD_TOKENS_TARGET_PCT:g}%",
        verdict=_verdict(pct, OFFLOAD_TOKENS_TARGET_PCT, True), value=pct))

    step_ms = _ms(data.get("zeroshard_step_ms")) if on else None
    seconds = step_ms / 1e3 if step_ms is not None else None
    batch = data.get("batch")
    shape = f"{data.get('model', '?')} {'x'.join(map(str, batch)) if batch else '?'}"
    same_shape = data.get("model") == OFFLOAD_MODEL and batch == OFFLOAD_BATCH
    if seconds is None:
        measured, verdict = "not measured", "not measured"
    else:
        measured = f"{seconds:.3f} s/step ({shape})"
        verdict = (_verdict(seconds, OFFLOAD_STEP_TARGET_S, False) if same_shape
                   else "not comparable")
    out.append(dict(what=OFFLOAD_STEP_ROW, measured=measured,
                    target=f"<= {OFFLOAD_STEP_TARGET_S:g} s/step", verdict=verdict,
                    value=seconds if same_shape else None))

    memory = data.get("zeroshard_memory") if on else None
    memory = memory if isinstance(memory, dict) else {}
    device, host = _ms(memory.get("total")), _ms(memory.get("host_bytes"))
    measured = "not measured"
    if device is not None and host is not None:
        measured = f"{device / 2 ** 30:.2f} GiB device, {host / 2 ** 30:.2f} GiB host"
    out.append(dict(what=OFFLOAD_MEMORY_ROW, measured=measured, target="(info)", verdict="",
                    value=device, device_bytes=device, host_bytes=host))
    return out


# Issue 19's GPU-only defects (fixed on CPU, as far as a CPU can prove) and the step of this
# script that would show each one, if it came back; "-" where one GPU cannot (NCCL at world size
# 1, everything on GPU 0): those are proven on CPU by the named test.
DEFECT_STEPS = [
    ("1 offload host buffers not pinned", "pytest",
     "test_cuda_offload_pipeline_matches_the_device_step"),
    ("2 landing thread opens a context on GPU 0", "-",
     "needs 2+ GPUs; CPU: the worker binds the device"),
    ("3 host pages pinned for the wrong context", "-",
     "needs 2+ GPUs; CPU: rendezvous device tests"),
    ("4 control all-reduce beside in-flight ones", "-",
     "needs 2+ GPUs; CPU: ZEROSHARD_SIMULATE_ASYNC suites"),
    ("5 host grads zeroed under landing copies", "pytest",
     "CUDA offload tests; CPU: simulated landing"),
    ("6 fp32 landing, norm re-read, no overlap", "offload", "tokens/s and step-time rows"),
    ("7 unit buffers held by record_stream", "zero_step3", "stage 3 / stage 2 memory row"),
    ("7 pinning holds the GIL; unpin under DMA", "offload", "step time; a crash at exit"),
    ("7 adam_step(check_finite=False) flag", "pytest", "test_gpu_ops.py"),
    ("7 landing overlap test that cannot fail", "pytest",
     "test_cuda_gradients_land_on_the_host_while_backward_runs"),
]


def defect_lines(folder: str) -> List[str]:
    status = {name: st for name, st, _, _ in _steps(folder)}
    lines = [f"{'issue 19 defect (GPU only)':<45}{'step':<12}{'step status':<22}shown by"]
    for what, step, how in DEFECT_STEPS:
        lines.append(f"{what:<45}{step:<12}{status.get(step, '-') if step != '-' else '-':<22}"
                     f"{how}")
    return lines


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
    lines.extend(defect_lines(folder))
    lines.append("")
    lines.append(f"{'target (issues 8 and 11, stage 3)':<50}{'measured':<38}{'target':<16}"
                 "verdict")
    for t in targets(folder):
        lines.append(f"{t['what']:<50}{t['measured']:<38}{t['target']:<16}{t['verdict']}")
    traces = [os.path.join(out_dir, t) if os.path.exists(os.path.join(out_dir, t))
              else f"{t} not written" for t in TRACES]
    lines.append(f"trace: {', '.join(traces)}; "
                 f"logs: {os.path.join(out_dir, 'gpu_check.log')}, logs.tar.gz")
    return "\n".join(lines)


SAMPLES = ("zs_bench", "bench_ops", "zero_step", "zero_step3", "offload")


def write_sample(folder: str, which: str) -> None:
    """Made-up results of one real file's shape (see SAMPLES), for the dry
    run: each dry step writes its own, so a step that fails leaves its targets unmeasured."""
    os.makedirs(folder, exist_ok=True)

    def memory(peak_gib):
        return dict(total=int(5.7 * 2 ** 30), measured=dict(
            kind="cuda", peak_bytes=int(peak_gib * 2 ** 30), current_bytes=int(5.8 * 2 ** 30)))

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
            json.dump(dict(stage=2, baseline="torch", step_ratio=0.98, opt_ratio=0.55,
                           zeroshard_step_ms=101.0, torch_step_ms=103.0, baseline_step_ms=103.0,
                           zeroshard_memory=memory(6.1)), f)
    elif which == "zero_step3":
        gather = dict(calls=100, gpu_ops=100, gpu_ms=2.4, overlapped_ms=2.1,
                      overlap_fraction=0.875, ops_overlapping=94, streams=["13"])
        with open(os.path.join(folder, "zero_step3.json"), "w") as f:
            json.dump(dict(stage=3, baseline="stage2", step_ratio=1.02, opt_ratio=1.01,
                           zeroshard_step_ms=103.0, baseline_step_ms=101.0,
                           zeroshard_memory=memory(6.3), baseline_memory=memory(6.1),
                           overlap=dict(all_gather=gather)), f)
    elif which == "offload":
        tokens = OFFLOAD_BATCH[0] * OFFLOAD_BATCH[1]
        offloaded = dict(memory(8.0), total=int(6.6 * 2 ** 30), host_bytes=int(27.0 * 2 ** 30))
        with open(os.path.join(folder, "offload.json"), "w") as f:
            json.dump(dict(model=OFFLOAD_MODEL, batch=OFFLOAD_BATCH, stage=2, baseline="stage2",
                           offload="cpu", zeroshard_step_ms=450.0, baseline_step_ms=400.0,
                           zeroshard_tokens_per_s=tokens / 0.45,
                           baseline_tokens_per_s=tokens / 0.40, step_ratio=450.0 / 400.0,
                           zeroshard_memory=offloaded,
                           baseline_memory=dict(memory(30.0), total=int(24.2 * 2 ** 30))), f)


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
