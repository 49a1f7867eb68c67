"""Benchmark of zeroshard.ops.adam_step against torch.optim.AdamW (foreach and fused), and
DeepSpeed's Adam where it is importable, measured in the same process on the same machine.

Cases: one flat buffer (--numel) and the GPT-2-medium parameter shapes (292 tensors, ~355M).
zeroshard steps GPT-2 as ONE flat buffer holding all parameters, as the ZeRO optimizer lays them
out; torch steps the 292 tensors. Variants: fp32 (fp32 grads and params) and mixed (bf16 grads
in, fp32 master and moments, bf16 copy of the params out). In mixed, torch and DeepSpeed do the
same work the way a user must today: cast the grads to fp32, step, cast the params to bf16.
Mixed also has "torch fused + copy": fp32 grads already there (no cast), the fused step and a
separate bf16 copy of the params -- the baseline of the GPU target (zeroshard >= 1.3x faster on
the GPT-2-medium shapes; DESIGN.md's H100 anchor: 5.38 ms).

Timing: warm-up steps, then the median of --reps steps (CUDA: events around each step).
GB/s counts the bytes a fused step must move per parameter, from the dtypes: p, m, v read and
written (24 B) + grad read + copy written; the same count for every implementation, so it is an
effective bandwidth. zeroshard's finite check reads the grad once more; that is not counted.

  PYTHONPATH=python python3 bench/bench_ops.py                 # CPU, 2 threads
  PYTHONPATH=python python3 bench/bench_ops.py --device cuda --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from zeroshard import ops

Shape = Tuple[int, ...]
LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.95), 1e-8, 0.1


def gpt2_medium_shapes(scale: float = 1.0) -> List[Shape]:
    """GPT-2-medium's parameter shapes (24 layers, d=1024, vocab 50257, ctx 1024): 292 tensors.
    `scale` shrinks d, vocab and ctx alike (params ~ scale^2) and keeps the tensor count."""
    d = max(8, int(round(1024 * scale / 8)) * 8)
    vocab, ctx = max(1, int(round(50257 * scale))), max(1, int(round(1024 * scale)))
    shapes: List[Shape] = [(vocab, d), (ctx, d)]  # token and position embeddings
    for _ in range(24):
        shapes += [(d,), (d,),                      # ln_1
                   (d, 3 * d), (3 * d,),            # attention qkv
                   (d, d), (d,),                    # attention output projection
                   (d,), (d,),                      # ln_2
                   (d, 4 * d), (4 * d,),            # mlp in
                   (4 * d, d), (d,)]                # mlp out
    shapes += [(d,), (d,)]                          # ln_f
    return shapes


def numel_of(shapes: List[Shape]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for k in s:
            n *= k
        total += n
    return total


def bytes_per_param(grad_dtype: torch.dtype, copy_dtype: Optional[torch.dtype]) -> int:
    copy = 0 if copy_dtype is None else torch.empty((), dtype=copy_dtype).element_size()
    return 24 + torch.empty((), dtype=grad_dtype).element_size() + copy


# ---- implementations: each returns a step function over freshly allocated buffers ----------

def _filled(shape, dtype, device, bound):
    # Uniform values: no zeros or subnormals in the moments, which would slow some CPUs down.
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-bound, bound)


def torch_step_fn(shapes, mixed, device, impl, optimizer_cls=None,
                  cast_grads=True) -> Callable[[], None]:
    """torch's step over `shapes`. Mixed: bf16 copy of the params out; with `cast_grads` the
    bf16 grads are cast to fp32 first, without it the fp32 grads are simply there."""
    params = [_filled(s, torch.float32, device, 1.0) for s in shapes]
    if mixed and not cast_grads:
        copies = [torch.empty(s, dtype=torch.bfloat16, device=device) for s in shapes]
        for p in params:
            p.grad = _filled(p.shape, torch.float32, device, 1e-2)
    elif mixed:
        grads_in = [_filled(s, torch.bfloat16, device, 1e-2) for s in shapes]
        copies = [torch.empty(s, dtype=torch.bfloat16, device=device) for s in shapes]
        for p in params:
            p.grad = torch.empty_like(p)
        fp32_grads = [p.grad for p in params]
    else:
        for p in params:
            p.grad = _filled(p.shape, torch.float32, device, 1e-2)
    if optimizer_cls is None:
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                foreach=impl == "foreach", fused=impl == "fused")
    else:
        opt = optimizer_cls(params)

    def step():
        if mixed and cast_grads:
            torch._foreach_copy_(fp32_grads, grads_in)  # bf16 grads -> fp32
        opt.step()
        if mixed:
            torch._foreach_copy_(copies, params)        # fp32 params -> bf16 model copy
    return step


def zeroshard_step_fn(numel, mixed, device) -> Callable[[], None]:
    p = _filled(numel, torch.float32, device, 1.0)
    g = _filled(numel, torch.bfloat16 if mixed else torch.float32, device, 1e-2)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    copy = torch.empty(numel, dtype=torch.bfloat16, device=device) if mixed else None
    state = {"step": 0}

    def step():
        state["step"] += 1
        ops.adam_step(p, g, m, v, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                      step=state["step"], decoupled=True, param_copy=copy)
    return step


def deepspeed_optimizer(device):
    """DeepSpeed's Adam class for `device` as a factory, or (None, why) when it is unusable."""
    try:
        if device == "cuda":
            from deepspeed.ops.adam import FusedAdam as cls
            kw = dict(adam_w_mode=True)
        else:
            from deepspeed.ops.adam import DeepSpeedCPUAdam as cls
            kw = dict(adamw_mode=True)
    except Exception as err:  # not installed, or its import fails: the column is left out
        return None, f"{type(err).__name__}: {err}"
    return (lambda params: cls(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                               **kw)), ""


# ---- timing --------------------------------------------------------------------------------

def time_steps(step: Callable[[], None], device: str, warmup: int, reps: int) -> List[float]:
    """Seconds per step for `reps` steps after `warmup` steps."""
    for _ in range(warmup):
        step()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def release(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def bench_case(case, shapes, variant, args, ds_factory) -> List[Dict]:
    mixed = variant == "mixed"
    numel = numel_of(shapes)
    bpp = bytes_per_param(torch.bfloat16 if mixed else torch.float32, torch.bfloat16 if mixed else None)
    makers = [("zeroshard", lambda: zeroshard_step_fn(numel, mixed, args.device)),
              ("torch foreach", lambda: torch_step_fn(shapes, mixed, args.device, "foreach")),
              ("torch fused", lambda: torch_step_fn(shapes, mixed, args.device, "fused"))]
    if mixed:
        makers.append(("torch fused + copy", lambda: torch_step_fn(
            shapes, mixed, args.device, "fused", cast_grads=False)))
    if ds_factory is not None:
        name = "deepspeed FusedAdam" if args.device == "cuda" else "deepspeed CPUAdam"
        makers.append((name, lambda: torch_step_fn(shapes, mixed, args.device, "ds", ds_factory)))
    rows = []
    for impl, make in makers:
        step = make()
        times = time_steps(step, args.device, args.warmup, args.reps)
        del step
        release(args.device)
        sec = statistics.median(times)
        rows.append(dict(case=case, variant=variant, impl=impl, numel=numel, tensors=len(shapes),
                         ms=sec * 1e3, gparams_per_s=numel / sec / 1e9,
                         gb_per_s=numel * bpp / sec / 1e9, bytes_per_param=bpp,
                         times_ms=[t * 1e3 for t in times]))
        print(f"  {case:<6} {variant:<5} {impl:<20} {sec * 1e3:10.2f} ms", file=sys.stderr, flush=True)
    zs_ms = rows[0]["ms"]
    for r in rows:
        r["ratio_vs_zeroshard"] = r["ms"] / zs_ms  # torch_time / zeroshard_time: > 1 we win
    return rows


def print_table(rows: List[Dict]) -> None:
    head = f"{'case':<7}{'variant':<8}{'implementation':<21}{'params':>8}{'ms/step':>11}" \
           f"{'Gparam/s':>10}{'GB/s':>9}{'impl/zs':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['case']:<7}{r['variant']:<8}{r['impl']:<21}{r['numel'] / 1e6:7.0f}M"
              f"{r['ms']:11.2f}{r['gparams_per_s']:10.3f}{r['gb_per_s']:9.1f}"
              f"{r['ratio_vs_zeroshard']:9.2f}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--numel", type=float, default=None,
                    help="flat buffer size (default 1e8 on CPU, 1e9 on CUDA)")
    ap.add_argument("--gpt2-scale", type=float, default=1.0,
                    help="shrink GPT-2-medium's d/vocab/ctx by this factor (params ~ scale^2)")
    ap.add_argument("--cases", default="flat,gpt2", help="comma list of flat, gpt2")
    ap.add_argument("--variants", default="fp32,mixed", help="comma list of fp32, mixed")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch and zeroshard")
    ap.add_argument("--warmup", type=int, default=None, help="default: 1 on CPU, 3 on CUDA")
    ap.add_argument("--reps", type=int, default=None, help="default: 3 on CPU, 20 on CUDA")
    ap.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed columns")
    ap.add_argument("--json", default=None, help="write rows and settings to this path")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    args.numel = int(args.numel if args.numel is not None else (1e8 if cpu else 1e9))
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    args.reps = args.reps if args.reps is not None else (3 if cpu else 20)
    for name in ("numel", "threads", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.gpt2_scale <= 0:
        ap.error("--gpt2-scale must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    ds_factory, ds_why = (None, "--no-deepspeed") if args.no_deepspeed else deepspeed_optimizer(args.device)
    settings = dict(device=args.device, torch=torch.__version__, python=platform.python_version(),
                    torch_threads=torch.get_num_threads(), zeroshard_threads=ops.num_threads(),
                    simd=ops.simd_level(), warmup=args.warmup, reps=args.reps,
                    cpu=cpu_model(), cores=os.cpu_count(),
                    deepspeed=("yes" if ds_factory else f"no ({ds_why})"))
    if args.device == "cuda":
        settings["gpu"] = torch.cuda.get_device_name()
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print("zeroshard steps the GPT-2 case as one flat buffer holding all its parameters (the ZeRO "
          "layout); torch and DeepSpeed step its 292 tensors.")
    print("GB/s = params x (24 + grad bytes + copy bytes) / time, the same count for every "
          "implementation; impl/zs = impl ms / zeroshard ms (> 1: zeroshard is faster).")
    cases = {"flat": [(args.numel,)], "gpt2": gpt2_medium_shapes(args.gpt2_scale)}
    rows = []
    for case in args.cases.split(","):
        if case not in cases:
            print(f"unknown case {case!r}; use flat, gpt2", file=sys.stderr)
            return 2
        for variant in args.variants.split(","):
            if variant not in ("fp32", "mixed"):
                print(f"unknown variant {variant!r}; use fp32, mixed", file=sys.stderr)
                return 2
            rows += bench_case(case, cases[case], variant, args, ds_factory)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(settings=settings, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
