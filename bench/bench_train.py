"""End-to-end training benchmark: the example GPT on 2 gloo ranks on CPU, one row per optimizer.

    python bench/bench_train.py                      # all rows, about 2 minutes here
    python bench/bench_train.py --rows ddp zero2 --model tiny --steps 20

Owns the benchmark's row list, the launching of one `torchrun` job per row (each runs
examples/train_gpt.py with --metrics-json), and the comparison table: median step time after
warm-up, each rank's peak RSS and measured model-state bytes, with ratios against torch DDP +
AdamW. Knows nothing of how a row trains; that is examples/train_gpt.py's job.
DeepSpeed rows run only where `import deepspeed` works; otherwise the table says so.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(REPO, "examples", "train_gpt.py")
MiB = 2 ** 20

# name -> (label, train_gpt.py flags)
ROWS: Dict[str, tuple] = {
    "ddp": ("torch DDP + AdamW", ["--optimizer", "ddp"]),
    "torch-zero": ("torch ZeroRedundancyOptimizer + DDP", ["--optimizer", "torch-zero"]),
    "zero0": ("zeroshard stage 0", ["--optimizer", "zeroshard", "--stage", "0"]),
    "zero1": ("zeroshard stage 1", ["--optimizer", "zeroshard", "--stage", "1"]),
    "zero2": ("zeroshard stage 2", ["--optimizer", "zeroshard", "--stage", "2"]),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        help="which rows to run (ddp is always run first: it is the baseline)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per row")
    parser.add_argument("--model", default="small")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup-steps", type=int, default=3,
                        help="first steps left out of the median step time")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per row")
    args = parser.parse_args(argv)
    if args.nproc <= 0 or args.batch_size <= 0 or args.seq_len <= 0:
        parser.error("--nproc, --batch-size and --seq-len must be positive")
    if not 0 <= args.warmup_steps < args.steps:
        parser.error("--warmup-steps must be in [0, --steps)")
    if "ddp" not in args.rows:
        args.rows = ["ddp"] + args.rows
    return args


def run_row(name: str, args, workdir: str) -> Dict:
    """Launch one torchrun job; its metrics dict, or {"error": why} when it failed."""
    metrics_path = os.path.join(workdir, f"{name}.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", TRAIN_SCRIPT, "--device", "cpu",
               "--model", args.model, "--dtype", args.dtype, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--warmup", "0", "--log-every", str(args.steps),
               "--metrics-json", metrics_path] + ROWS[name][1]
    env = dict(os.environ)
    # Ranks import the zeroshard this process imported (a developer build or the installed one).
    try:
        import zeroshard
        root = os.path.dirname(os.path.dirname(os.path.abspath(zeroshard.__file__)))
    except ImportError:  # not installed: the checkout's developer build
        root = os.path.join(REPO, "python")
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: ranks share the cores
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:.0f} s"}
    wall = time.perf_counter() - started
    if done.returncode != 0 or not os.path.exists(metrics_path):
        tail = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        # The rank's own exception, not torchrun's ChildFailedError wrapper around it.
        raised = [line for line in tail
                  if re.match(r"^(\[rank\d+\]:)?\s*[\w.]*(Error|Exception)\b", line)
                  and "ChildFailedError" not in line]
        why = raised[0] if raised else (tail[-1] if tail else "")
        return {"error": f"exit {done.returncode}: {why.strip()[:160]}"}
    with open(metrics_path) as source:
        metrics = json.load(source)
    metrics["wall_s"] = wall
    return metrics


def summarise(metrics: Dict, warmup_steps: int) -> Dict:
    times = metrics["step_times_s"][warmup_steps:]
    ranks = metrics["ranks"]
    return {"step_s": statistics.median(times),
            "rss": [r["peak_rss_bytes"] for r in ranks],
            "state": [r["memory"]["total"] for r in ranks],
            "formula": metrics["formula"], "formula_bytes": metrics["formula_bytes"],
            "final_loss": metrics["final_loss"], "wall_s": metrics["wall_s"],
            "params": metrics["params"]}


def print_table(results: Dict[str, Dict]) -> None:
    base = results.get("ddp", {})
    header = (f"{'row':<36} {'step ms':>8} {'xDDP':>5} | {'peak RSS MiB/rank':>18} {'xDDP':>5} | "
              f"{'model state MiB/rank':>20} {'xDDP':>5} | {'formula':<28} | {'loss':>6}")
    print(header)
    print("-" * len(header))
    for name, row in results.items():
        label = ROWS[name][0]
        if "error" in row:
            print(f"{label:<36} FAILED: {row['error']}")
            continue
        rss = "/".join(f"{b / MiB:.0f}" for b in row["rss"])
        state = "/".join(f"{b / MiB:.1f}" for b in row["state"])
        ratio = (lambda key, pick: f"{pick(row[key]) / pick(base[key]):.2f}"
                 if "error" not in base else "-")
        print(f"{label:<36} {row['step_s'] * 1e3:>8.1f} {ratio('step_s', float):>5} | "
              f"{rss:>18} {ratio('rss', max):>5} | {state:>20} {ratio('state', max):>5} | "
              f"{row['formula']:<28} | {row['final_loss']:>6.3f}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    print(f"bench_train: model {args.model}, {args.nproc} gloo ranks on CPU, {args.dtype}, "
          f"{args.steps} steps (median over the last {args.steps - args.warmup_steps}), "
          f"batch {args.batch_size}x{args.seq_len} tokens per rank", flush=True)
    results: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as workdir:
        for name in args.rows:
            print(f"  running {ROWS[name][0]} ...", flush=True)
            metrics = run_row(name, args, workdir)
            results[name] = metrics if "error" in metrics else summarise(metrics,
                                                                          args.warmup_steps)
    first = next((r for r in results.values() if "params" in r), None)
    if first:
        print(f"\nΨ = {first['params']:,} params; model state = params + grads + master + "
              f"optimizer state (+ zeroshard's comm buffers), measured on each rank")
    print_table(results)
    if importlib.util.find_spec("deepspeed") is None:
        print("DeepSpeed ZeRO-1/2: not run, `import deepspeed` fails here (not installed).")
    else:
        print("DeepSpeed ZeRO-1/2: deepspeed is importable but this benchmark has no DeepSpeed "
              "rows yet.")
    failed = [name for name, row in results.items() if "error" in row]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
