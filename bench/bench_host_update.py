"""The host update of CPU offload (issue 11): zeroshard.ops.adam_step against torch's fused CPU
AdamW and DeepSpeedCPUAdam, one row per dtype path, interleaved in one process.

Paths (same work for every implementation; torch and DeepSpeed add the casts a user needs):
  mixed      bf16 grad in, fp32 master + moments, bf16 param copy out
  fp32       fp32 grad in, fp32 params, no copy (DeepSpeed ZeRO-Offload's shape)
  fp32+copy  fp32 grad in, fp32 params, bf16 param copy out
zeroshard runs with check_finite=False (the others do not check either), AdamW, one flat buffer.

Timing: for each (size, path) all implementations are built, warmed up, then stepped in rounds,
one step each per round in a rotating order, so a noisy neighbour or a frequency change hits them
alike; the table shows medians. --settle-ms S sleeps S ms before each timed step: torch's
OpenMP workers spin for some milliseconds after each parallel op and, on a machine with as many
cores as threads, take a core from whichever pool runs next (zeroshard's, not torch's own); with
a settle time every implementation starts from a quiet machine, as the host update of an offloaded
step does (its inputs arrive by device copies, not CPU ops). GB/s counts the bytes a fused step must move (p, m, v read and
written, grad read, copy written). "bound" is an in-place read+write of the same byte count by
torch (x.mul_), measured in the same rounds: the memory bandwidth a streaming kernel can reach
here.

  PYTHONPATH=python .venv/bin/python bench/bench_host_update.py --sizes 1e7,5e7 --reps 15
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from zeroshard import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import cpu_model  # noqa: E402  (the same machine line as the kernel benchmark)

LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.95), 1e-8, 0.1
PATHS = {  # name: (grad dtype, copy dtype or None)
    "mixed": (torch.bfloat16, torch.bfloat16),
    "fp32": (torch.float32, None),
    "fp32+copy": (torch.float32, torch.bfloat16),
}
TARGETS = {"torch fused": 1.0, "deepspeed CPUAdam": 1.2}  # required impl_ms / zeroshard_ms


def bytes_per_param(path: str) -> int:
    grad, copy = PATHS[path]
    return 24 + torch.empty((), dtype=grad).element_size() + (
        0 if copy is None else torch.empty((), dtype=copy).element_size())


def _filled(n, dtype, bound):
    # Uniform values: no zeros or subnormals in the moments, which slow some CPUs down.
    return torch.empty(n, dtype=dtype).uniform_(-bound, bound)


def zeroshard_fn(n: int, path: str) -> Callable[[], None]:
    grad_dtype, copy_dtype = PATHS[path]
    p, g = _filled(n, torch.float32, 1.0), _filled(n, grad_dtype, 1e-2)
    m, v = _filled(n, torch.float32, 1e-3), _filled(n, torch.float32, 1e-3).abs_()
    copy = None if copy_dtype is None else torch.empty(n, dtype=copy_dtype)
    state = {"step": 0}

    def step():
        state["step"] += 1
        ops.adam_step(p, g, m, v, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                      step=state["step"], decoupled=True, param_copy=copy, check_finite=False)
    return step


def optimizer_fn(n: int, path: str, make_opt) -> Callable[[], None]:
    """A torch.optim-style optimizer over one fp32 param, with the casts `path` needs: bf16
    grads cast into the fp32 .grad before the step, fp32 params cast into the copy after it."""
    grad_dtype, copy_dtype = PATHS[path]
    p = torch.nn.Parameter(_filled(n, torch.float32, 1.0))
    grad_in = _filled(n, grad_dtype, 1e-2)
    p.grad = grad_in if grad_dtype == torch.float32 else torch.empty_like(p)
    copy = None if copy_dtype is None else torch.empty(n, dtype=copy_dtype)
    opt = make_opt([p])

    def step():
        if grad_dtype != torch.float32:
            p.grad.copy_(grad_in)
        opt.step()
        if copy is not None:
            copy.copy_(p.detach())
    return step


def bound_fn(n: int, path: str) -> Callable[[], None]:
    # Reads and writes bytes_per_param(path) * n bytes in place, like the optimizer's p, m, v.
    x = _filled(bytes_per_param(path) * n // 8, torch.float32, 1.0)
    return lambda: x.mul_(1.0)


def torch_fused(params):
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                             fused=True)


def deepspeed_factory():
    """DeepSpeedCPUAdam (adamw_mode=True) as a factory, or (None, why) when unusable."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as err:  # not installed, or its import fails: the column is left out
        return None, f"{type(err).__name__}: {err}"
    return (lambda params: DeepSpeedCPUAdam(params, lr=LR, betas=BETAS, eps=EPS,
                                            weight_decay=WEIGHT_DECAY, adamw_mode=True)), ""


def measure(makers: Dict[str, Callable[[], Callable[[], None]]], warmup: int,
            reps: int, settle_s: float = 0.0) -> Dict[str, List[float]]:
    steps = {name: make() for name, make in makers.items()}
    for _ in range(warmup):
        for step in steps.values():
            step()
    names = list(steps)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(reps):
        for k in range(len(names)):  # rotate who goes first each round
            name = names[(r + k) % len(names)]
            if settle_s > 0:
                time.sleep(settle_s)
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def bench(sizes: List[int], paths: List[str], warmup: int, reps: int, ds,
          settle_s: float = 0.0) -> List[Dict]:
    rows = []
    for n in sizes:
        for path in paths:
            makers = {"zeroshard": lambda: zeroshard_fn(n, path),
                      "torch fused": lambda: optimizer_fn(n, path, torch_fused)}
            if ds is not None:
                makers["deepspeed CPUAdam"] = lambda: optimizer_fn(n, path, ds)
            makers["bound"] = lambda: bound_fn(n, path)
            times = measure(makers, warmup, reps, settle_s)
            zs_ms = statistics.median(times["zeroshard"]) * 1e3
            for impl, ts in times.items():
                ms = statistics.median(ts) * 1e3
                row = dict(numel=n, path=path, impl=impl, ms=ms,
                           gb_per_s=n * bytes_per_param(path) / ms / 1e6,
                           ratio=ms / zs_ms, times_ms=[t * 1e3 for t in ts])
                if impl in TARGETS:
                    row["target"] = TARGETS[impl]
                    row["meets_target"] = row["ratio"] >= TARGETS[impl]
                rows.append(row)
            print(f"  {n / 1e6:.0f}M {path}: " + ", ".join(
                f"{r['impl']} {r['ms']:.2f} ms" for r in rows if r["numel"] == n and r["path"] == path),
                file=sys.stderr, flush=True)
    return rows


def print_table(rows: List[Dict]) -> None:
    head = (f"{'params':>7} {'path':<10}{'implementation':<19}{'ms/step':>9}{'GB/s':>7}"
            f"{'impl/zs':>9}  target")
    print(head)
    print("-" * len(head))
    for r in rows:
        target = ""
        if "target" in r:
            target = f">= {r['target']:.1f}x {'ok' if r['meets_target'] else 'MISSED'}"
        print(f"{r['numel'] / 1e6:6.0f}M {r['path']:<10}{r['impl']:<19}{r['ms']:9.2f}"
              f"{r['gb_per_s']:7.1f}{r['ratio']:9.2f}  {target}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e7,5e7", help="comma list of parameter counts")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma list of " + ", ".join(PATHS))
    ap.add_argument("--threads", type=int, default=2, help="threads for every implementation")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--settle-ms", type=float, default=0.0,
                    help="sleep this long before each timed step (see the module doc)")
    ap.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed column")
    ap.add_argument("--json", default=None, help="write rows and settings to this path")
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    paths = args.paths.split(",")
    for p in paths:
        if p not in PATHS:
            ap.error(f"unknown path {p!r}; use {', '.join(PATHS)}")
    if args.threads < 1 or args.reps < 1 or min(sizes) < 1:
        ap.error("--threads, --reps and sizes must be >= 1")
    if args.settle_ms < 0:
        ap.error("--settle-ms must be >= 0")
    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    # DeepSpeed's kernel uses OpenMP: it follows OMP_NUM_THREADS, torch.set_num_threads sets it too.
    ds, ds_why = (None, "--no-deepspeed") if args.no_deepspeed else deepspeed_factory()
    settings = dict(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    zeroshard_threads=ops.num_threads(), simd=ops.simd_level(),
                    omp_num_threads=os.environ.get("OMP_NUM_THREADS", ""), warmup=args.warmup,
                    reps=args.reps, settle_ms=args.settle_ms, cpu=cpu_model(), cores=os.cpu_count(),
                    deepspeed="yes" if ds else f"no ({ds_why})")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print("impl/zs = impl ms / zeroshard ms (> 1: zeroshard is faster); medians of interleaved "
          "rounds; bound = torch in-place x.mul_ over the same bytes.")
    rows = bench(sizes, paths, args.warmup, args.reps, ds, args.settle_ms / 1e3)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(settings=settings, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
