"""Step-time ratios with every row in the same processes, steps interleaved.

    python bench/bench_step_ratio.py                          # gpt-17m, 2 gloo ranks, ~4 min
    python bench/bench_step_ratio.py --rounds 30 --rows ddp zero2

bench_train.py runs one torchrun job per row, one after another: its memory columns need a
process per row, but on a shared machine its step times drift between rows by as much as the
differences it compares (±10% here from run to run). This benchmark builds every row's model
and optimizer (examples/train_gpt.py's setups: the same model, data, clipping and AdamW as
bench_train's rows) in one job and takes one step of each row in turn, round after round,
starting each round at the next row; so every row sees the same machine, and the ratios are
medians of steps taken seconds apart. It prints the median step time of each row (and of its
forward, backward, and clipping + step, each a median on its own), issue 21's
targets (stages 1-2 at most STAGES12_VS_DDP times DDP's step, stage 3 at most
STAGE3_VS_STAGE2 times our stage 2's), and the rows' first losses, which must agree (every row
trains the same model on the same batch). Memory is bench_train.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_train  # noqa: E402  (targets, presets, the launch environment)

ROWS = ("ddp", "zero1", "zero2", "zero3")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt-17m")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=12, help="steps of each row")
    parser.add_argument("--warmup-rounds", type=int, default=2, help="rounds not timed")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--worker", metavar="JSON_OUT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _train_args(args, row: str):
    import train_gpt
    extra = (["--optimizer", "ddp"] if row == "ddp"
             else ["--optimizer", "zeroshard", "--stage", row[len("zero"):]])
    return train_gpt.parse_args(["--device", "cpu", "--model", args.model, "--dtype", "fp32",
                                 "--batch-size", str(args.batch_size), "--seq-len",
                                 str(args.seq_len), "--warmup", "0"] + extra)


def worker(args) -> None:
    """One rank: every row's setup, then rounds of one step per row."""
    import torch.distributed as dist
    import train_gpt

    rank, world, device = train_gpt.init_distributed("cpu")
    config = train_gpt.gpt.preset(args.model)
    setups = {}
    for row in args.rows:
        row_args = _train_args(args, row)
        model = train_gpt.gpt.GPT(config, seed=row_args.seed)
        setups[row] = (row_args, train_gpt.SETUPS[row_args.optimizer](row_args, model, world))
    data = train_gpt.gpt.MarkovTokenStream(config.vocab_size, seed=1)
    times: Dict[str, List[float]] = {row: [] for row in args.rows}
    phases: Dict[str, List[List[float]]] = {row: [] for row in args.rows}
    first_loss: Dict[str, float] = {}
    rows = list(args.rows)
    for step in range(args.warmup_rounds + args.rounds):
        inputs, targets = data.batch(step, args.batch_size * world, args.seq_len,
                                     slice(rank * args.batch_size, (rank + 1) * args.batch_size))
        start = step % len(rows)
        for row in rows[start:] + rows[:start]:
            row_args, setup = setups[row]
            dist.barrier()
            began = time.perf_counter()
            loss = setup.forward_module(inputs, targets)
            forward_done = time.perf_counter()
            setup.backward(loss)
            backward_done = time.perf_counter()
            setup.clip_and_step(row_args.clip)
            setup.optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - began
            if step >= args.warmup_rounds:
                times[row].append(elapsed)
                phases[row].append([forward_done - began, backward_done - forward_done,
                                    began + elapsed - backward_done])
            if step == 0:
                first_loss[row] = train_gpt.global_mean(loss.detach(), world)
    if rank == 0:
        with open(args.worker, "w") as out:
            json.dump({"step_s": {row: statistics.median(t) for row, t in times.items()},
                       "phase_s": {row: [statistics.median(p[i] for p in rows_phases)
                                         for i in range(3)]
                                   for row, rows_phases in phases.items()},
                       "first_loss": first_loss, "world_size": world}, out)
    dist.destroy_process_group()


def run(args) -> Dict:
    """Launches the job (torchrun, one thread per rank) and returns rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ratio.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.nproc}", os.path.abspath(__file__), "--worker", out,
                   "--model", args.model, "--batch-size", str(args.batch_size), "--seq-len",
                   str(args.seq_len), "--rounds", str(args.rounds), "--warmup-rounds",
                   str(args.warmup_rounds), "--rows", *args.rows]
        done = subprocess.run(command, env=bench_train.row_environment(), capture_output=True,
                              text=True, timeout=args.timeout)
        if done.returncode != 0 or not os.path.exists(out):
            tail = (done.stderr + done.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"the benchmark job failed (exit {done.returncode}): "
                               + " | ".join(tail))
        with open(out) as source:
            return json.load(source)


def report(results: Dict) -> List[str]:
    step = results["step_s"]
    phase = results["phase_s"]
    lines = [f"{bench_train.ROWS[row][0]:<24} {step[row] * 1e3:8.1f} ms"
             + (f"  {step[row] / step['ddp']:.3f}x DDP" if "ddp" in step else "")
             + "   (forward {:.0f}, backward {:.0f}, clip + step {:.0f} ms)".format(
                 *(t * 1e3 for t in phase[row]))
             for row in step]
    for stage in (1, 2):
        if f"zero{stage}" in step and "ddp" in step:
            lines.append(f"stage {stage} step: " + bench_train.time_target(
                step[f"zero{stage}"] / step["ddp"], bench_train.STAGES12_VS_DDP, "DDP"))
    if "zero3" in step and "zero2" in step:
        lines.append("stage 3 step: " + bench_train.time_target(
            step["zero3"] / step["zero2"], bench_train.STAGE3_VS_STAGE2, "our stage 2"))
    losses = results["first_loss"]
    spread = max(losses.values()) - min(losses.values())
    lines.append(f"first-step losses {', '.join(f'{r} {v:.4f}' for r, v in losses.items())}: "
                 + ("the same model and batch in every row" if spread < 1e-4
                    else f"DIFFER by {spread:.2e}: the rows do not train the same thing"))
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    print(f"bench_step_ratio: {args.model}, {args.nproc} gloo ranks on CPU, fp32, batch "
          f"{args.batch_size}x{args.seq_len} per rank, {args.rounds} interleaved steps a row "
          f"(median; {args.warmup_rounds} rounds of warm-up)", flush=True)
    for line in report(run(args)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
