"""One full mixed-precision training step: zeroshard.ZeroAdamW vs a baseline.

Both train the same bf16 model from examples/gpt.py on the same batch. The default baseline,
torch.optim.AdamW(fused=True), keeps an fp32 master copy and does what mixed precision costs
with stock torch: cast the bf16 grads to fp32, run the fused AdamW step on the masters, copy the
masters back into the bf16 params. The zeroshard row runs ZeroAdamW (stage 2 by default) whose
kernel reads bf16 grads and writes the bf16 params in the same pass. `--baseline stage2` times
ZeroAdamW at stage 2 instead (the stage-3 check: `--stage 3 --baseline stage2`), `--baseline
none` nothing. Prints the median optimizer-step time and full-step time of each and the ratio
zeroshard/baseline (<= 1.0 means zeroshard is no slower).

    python bench/bench_zero_step.py --device cuda --model gpt2-medium          # GPU machine
    python bench/bench_zero_step.py --device cuda --stage 3 --baseline stage2  # stage 3 vs 2
    python bench/bench_zero_step.py --device cpu --model tiny --reps 3         # smoke run
    python bench/bench_zero_step.py --device cuda --model gpt2-xl --batch-size 4 --seq-len 1024 \
        --offload cpu --baseline stage2                # CPU offload vs the same stage on the GPU
Runs at world size 1 unless launched by torchrun; with CUDA under torchrun, gradients (and at
stage 3 the parameter all-gathers) go through zeroshard's NCCL communicator. Stage 3 takes the
model itself (ZeroAdamW(model, ..., stage=3)); between its steps the parameters are sharded,
so nothing here reads them after the optimizer is built (the parameter count comes from a
meta-device copy). `--trace out.json.gz` profiles two more zeroshard steps after
the timed ones with torch.profiler (CPU + CUDA) and saves the gzipped Chrome trace: every
kernel, copy and NCCL collective of a step on one timeline (open it in Perfetto or
chrome://tracing). The communicator's calls are labelled zeroshard::all_gather,
zeroshard::reduce_scatter, ... in it, and the JSON's "overlap" says how much of each kind's GPU
time ran while compute kernels ran on another stream (see collective_overlap).
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import gc
import gzip
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from gpt import GPT, preset  # noqa: E402

import zeroshard  # noqa: E402

BASELINES = ("torch", "stage2", "none")
BASELINE_LABELS = {"torch": "torch AdamW fused + casts", "stage2": "zeroshard stage 2"}


def timer(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def batch(config, batch_size: int, seq_len: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=g)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def build_model(model_name: str, device: torch.device) -> torch.nn.Module:
    """The bf16 model on `device` (built there directly on CUDA), peak memory counted from here."""
    config = preset(model_name)
    if device.type == "cuda":
        with torch.device(device):
            model = GPT(config)  # its init draws on the GPU there
    else:
        model = GPT(config)
    model = model.to(device=device, dtype=torch.bfloat16)
    if device.type == "cuda":  # the fp32 init above is no part of any optimizer's footprint
        torch.cuda.reset_peak_memory_stats(device)
    return model


def release(device: torch.device) -> None:
    """Frees what the previous run left (optimizers hold reference cycles) before the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_torch(args, device, x, y):
    model = build_model(args.model, device)
    params = [p for p in model.parameters()]
    master = [p.detach().float().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(master, lr=1e-4, weight_decay=0.1,
                            fused=True if device.type == "cuda" or hasattr(torch, "_fused_adamw_") else None)
    step_ms, opt_ms = [], []
    for it in range(args.warmup + args.reps):
        t0 = timer(device)
        loss = model(x, y)
        loss.backward()
        t1 = timer(device)
        with torch.no_grad():
            for m, p in zip(master, params):
                m.grad = p.grad.float()
            opt.step()
            for m, p in zip(master, params):
                p.copy_(m)
                p.grad = None
        t2 = timer(device)
        if it >= args.warmup:
            step_ms.append((t2 - t0) * 1e3)
            opt_ms.append((t2 - t1) * 1e3)
    return statistics.median(step_ms), statistics.median(opt_ms), None, None


def run_zeroshard(args, device, x, y, stage: int, trace: str = "", offload=None):
    """Median full-step and optimizer ms, memory_report() after the timed steps, and (with
    `trace`) collective_overlap() of the profiled steps."""
    model = build_model(args.model, device)
    # Stage 3 shards the parameters module by module: it takes the model itself.
    opt = zeroshard.ZeroAdamW(model if stage == 3 else model.parameters(), lr=1e-4,
                              weight_decay=0.1, stage=stage, offload=offload)

    def train_step():
        loss = model(x, y)
        opt.backward(loss)
        t1 = timer(device)
        opt.step()
        opt.zero_grad()
        return t1

    step_ms, opt_ms = [], []
    for it in range(args.warmup + args.reps):
        t0 = timer(device)
        t1 = train_step()
        t2 = timer(device)
        if it >= args.warmup:
            step_ms.append((t2 - t0) * 1e3)
            opt_ms.append((t2 - t1) * 1e3)
    memory = opt.memory_report()  # before the profiler adds its own buffers
    overlap = None
    if trace:  # every rank steps (collectives); each writes its own file
        rank = dist.get_rank() if dist.is_initialized() else 0
        with label_collectives(opt.comm):
            overlap = save_trace(trace if rank == 0 else f"{trace}.rank{rank}", device,
                                 train_step)
    return statistics.median(step_ms), statistics.median(opt_ms), memory, overlap


# ---- the profiler trace ------------------------------------------------------------------------

# Communicator methods labelled in the trace, and the label of each. The outermost label of a
# call counts: all_gather_buckets may call all_gather, all_gather_control (stage 3's unit tags)
# calls all_gather.
LABELS = {"all_gather_buckets": "all_gather", "all_gather": "all_gather",
          "all_gather_control": "control", "control_all_reduce": "control",
          "reduce_scatter": "reduce_scatter", "all_reduce": "all_reduce",
          "broadcast": "broadcast"}
LABEL_PREFIX = "zeroshard::"


@contextlib.contextmanager
def label_collectives(comm):
    """Inside, each call of comm's collectives runs in torch.profiler.record_function(
    "zeroshard::<kind>"), so the trace ties the GPU work they launch (by correlation id) to the
    kind. Instance attributes shadow the class's methods and are removed on leaving."""
    from torch.profiler import record_function
    missing = object()
    saved = {}
    for name, kind in LABELS.items():
        method = getattr(comm, name, None)
        if method is None:
            continue
        saved[name] = comm.__dict__.get(name, missing)

        def labelled(*a, _method=method, _label=LABEL_PREFIX + kind, **kw):
            with record_function(_label):
                return _method(*a, **kw)
        setattr(comm, name, functools.wraps(method)(labelled))
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is missing:
                del comm.__dict__[name]
            else:
                setattr(comm, name, old)


GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
NCCL_KINDS = (("AllGather", "all_gather"), ("ReduceScatter", "reduce_scatter"),
              ("AllReduce", "all_reduce"), ("Broadcast", "broadcast"))


def _merge(intervals: List[Tuple[float, float]]) -> Tuple[List[float], List[float]]:
    starts, ends = [], []
    for s, e in sorted(intervals):
        if starts and s <= ends[-1]:
            ends[-1] = max(ends[-1], e)
        else:
            starts.append(s)
            ends.append(e)
    return starts, ends


def _covered(s: float, e: float, starts: List[float], ends: List[float]) -> float:
    """How much of [s, e] the merged intervals cover."""
    total, i = 0.0, max(0, bisect.bisect_right(starts, s) - 1)
    while i < len(starts) and starts[i] < e:
        total += max(0.0, min(e, ends[i]) - max(s, starts[i]))
        i += 1
    return total


def collective_overlap(events: List[dict]) -> Dict[str, Dict[str, object]]:
    """Per collective kind in a torch.profiler Chrome trace's events: "calls" (outermost
    zeroshard::<kind> labels), "gpu_ops" (GPU kernels/copies launched inside them, matched by
    correlation id, or NCCL kernels named after the kind), "gpu_ms" their GPU time,
    "overlapped_ms" the part of it during which a compute kernel ran on another stream,
    "overlap_fraction", "ops_overlapping" (ops with any overlap) and their "streams". At world
    size 1 NCCL copies instead of launching kernels: those copies are the kind's GPU ops.
    "side_stream" is the same for all GPU work off the busiest compute stream, whatever
    launched it. Times in the trace are microseconds."""
    spans = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"
             and isinstance(e.get("ts"), (int, float))]
    # outermost labels per thread, and the kind of each launch made inside one
    labels: Dict[tuple, List[Tuple[float, float, str]]] = defaultdict(list)
    for e in spans:
        name = str(e.get("name", ""))
        if e.get("cat") == "user_annotation" and name.startswith(LABEL_PREFIX):
            start = float(e["ts"])
            labels[(e.get("pid"), e.get("tid"))].append(
                (start, start + float(e.get("dur", 0.0)), name[len(LABEL_PREFIX):]))
    calls: Dict[str, int] = defaultdict(int)
    outer: Dict[tuple, List[Tuple[float, float, str]]] = {}
    for thread, spans_of in labels.items():
        spans_of.sort(key=lambda t: (t[0], -t[1]))
        kept: List[Tuple[float, float, str]] = []
        for s, e, kind in spans_of:
            if kept and s < kept[-1][1]:
                continue  # nested in the previous outermost label
            kept.append((s, e, kind))
            calls[kind] += 1
        outer[thread] = kept
    starts_of = {thread: [k[0] for k in kept] for thread, kept in outer.items()}
    corr_kind: Dict[object, str] = {}
    for e in spans:
        if e.get("cat") not in LAUNCH_CATS:
            continue
        corr = (e.get("args") or {}).get("correlation")
        thread = (e.get("pid"), e.get("tid"))
        kept = outer.get(thread)
        if corr is None or not kept:
            continue
        ts = float(e["ts"])
        i = bisect.bisect_right(starts_of[thread], ts) - 1
        if i >= 0 and kept[i][0] <= ts <= kept[i][1]:
            corr_kind[corr] = kept[i][2]

    gpu = []  # (start, end, stream, kind or None, is_kernel)
    for e in spans:
        if e.get("cat") not in GPU_CATS:
            continue
        args = e.get("args") or {}
        kind = corr_kind.get(args.get("correlation"))
        name = str(e.get("name", ""))
        if kind is None and "nccl" in name.lower():
            kind = next((k for tag, k in NCCL_KINDS if tag in name), "nccl")
        start = float(e["ts"])
        gpu.append((start, start + float(e.get("dur", 0.0)), args.get("stream", e.get("tid")),
                    kind, e.get("cat") == "kernel"))
    compute: Dict[object, List[Tuple[float, float]]] = defaultdict(list)
    for s, e, stream, kind, is_kernel in gpu:
        if is_kernel and kind is None:
            compute[stream].append((s, e))
    merged_cache: Dict[object, Tuple[List[float], List[float]]] = {}

    def compute_off(stream):  # compute kernels on every stream but this one, merged
        if stream not in merged_cache:
            merged_cache[stream] = _merge([iv for st, ivs in compute.items() if st != stream
                                           for iv in ivs])
        return merged_cache[stream]

    def stats(ops, n_calls=None):
        gpu_ms = overlapped = 0.0
        touching = 0
        for s, e, stream in ops:
            covered = _covered(s, e, *compute_off(stream))
            gpu_ms += e - s
            overlapped += covered
            touching += covered > 0
        row = {"gpu_ops": len(ops), "gpu_ms": gpu_ms / 1e3, "overlapped_ms": overlapped / 1e3,
               "overlap_fraction": overlapped / gpu_ms if gpu_ms > 0 else None,
               "ops_overlapping": touching, "streams": sorted({str(o[2]) for o in ops})}
        if n_calls is not None:
            row = {"calls": n_calls, **row}
        return row

    out: Dict[str, Dict[str, object]] = {}
    for kind in sorted(set(calls) | {k for *_, k, _ in gpu if k is not None}):
        out[kind] = stats([(s, e, st) for s, e, st, k, _ in gpu if k == kind], calls.get(kind, 0))
    if compute:
        busiest = max(compute, key=lambda st: sum(e - s for s, e in compute[st]))
        out["side_stream"] = stats([(s, e, st) for s, e, st, _, _ in gpu if st != busiest])
        out["side_stream"]["compute_stream"] = str(busiest)
    return out


def save_trace(path: str, device: torch.device, train_step, steps: int = 2):
    """Profile `steps` training steps, write the Chrome trace (gzipped when path ends .gz) and
    return collective_overlap() of it (an {"error": ...} when the trace cannot be read)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for i in range(steps):
            with record_function(f"zeroshard_step_{i}"):
                train_step()
        timer(device)
    raw = path[:-3] if path.endswith(".gz") else path
    prof.export_chrome_trace(raw)
    with open(raw, "rb") as src:
        data = src.read()
    if raw != path:
        with gzip.open(path, "wb", compresslevel=6) as dst:
            dst.write(data)
        os.remove(raw)
    print(f"trace: {path} ({os.path.getsize(path) / 1e6:.1f} MB, {steps} steps)")
    try:
        trace = json.loads(data)
        events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
        return collective_overlap(events)
    except Exception as err:  # noqa: BLE001 - the timing stands without the analysis
        return {"error": f"{type(err).__name__}: {err}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="gpt2-medium")
    parser.add_argument("--stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--baseline", default="torch", choices=BASELINES,
                        help="what zeroshard is timed against: torch.optim.AdamW(fused) with "
                        "fp32 masters (torch), ZeroAdamW at stage 2 (stage2), or nothing (none)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--offload", choices=("none", "cpu"), default="none",
                        help="the zeroshard row with offload='cpu' (the baseline never offloads)")
    parser.add_argument("--json", default="")
    parser.add_argument("--trace", default="", help="save a torch.profiler Chrome trace of two "
                        "zeroshard steps here (.json or .json.gz)")
    args = parser.parse_args(argv)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" \
        else torch.device("cpu")
    config = preset(args.model)
    x, y = batch(config, args.batch_size, min(args.seq_len, config.block_size), device)
    # Sizes only, before any optimizer (a stage-3 model's parameters are sharded between
    # steps) and with no 355M-parameter init on the CPU.
    with torch.device("meta"):
        numel = sum(p.numel() for p in GPT(config).parameters())
    base_step = base_opt = base_memory = None
    if args.baseline == "torch":
        base_step, base_opt, base_memory, _ = run_torch(args, device, x, y)
    elif args.baseline == "stage2":
        base_step, base_opt, base_memory, _ = run_zeroshard(args, device, x, y, stage=2)
    release(device)
    offload = "cpu" if args.offload == "cpu" else None
    ours_step, ours_opt, memory, overlap = run_zeroshard(args, device, x, y, args.stage,
                                                         args.trace, offload=offload)
    tokens = args.batch_size * int(x.shape[1])
    rows = {"params": numel, "device": str(device), "model": args.model, "stage": args.stage,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "batch": [args.batch_size, int(x.shape[1])], "warmup": args.warmup, "reps": args.reps,
            "baseline": args.baseline, "baseline_step_ms": base_step, "baseline_opt_ms": base_opt,
            "offload": args.offload, "zeroshard_tokens_per_s": tokens / ours_step * 1e3,
            "baseline_tokens_per_s": tokens / base_step * 1e3 if base_step else None,
            "zeroshard_step_ms": ours_step, "zeroshard_opt_ms": ours_opt,
            "opt_ratio": ours_opt / base_opt if base_opt else None,
            "step_ratio": ours_step / base_step if base_step else None,
            "zeroshard_memory": memory, "baseline_memory": base_memory,
            "trace": args.trace, "overlap": overlap}
    if args.baseline == "torch":
        rows.update(torch_step_ms=base_step, torch_opt_ms=base_opt)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"model {args.model} ({numel/1e6:.1f}M params, bf16) on {device}, batch "
              f"{args.batch_size}x{x.shape[1]}, zeroshard stage {args.stage}, world size "
              f"{rows['world_size']}, median of {args.reps} steps after {args.warmup}")
        print(f"{'':28s}{'full step ms':>14s}{'optimizer ms':>14s}")
        if base_step is not None:
            print(f"{BASELINE_LABELS[args.baseline]:28s}{base_step:14.2f}{base_opt:14.2f}")
        label = f"zeroshard ZeroAdamW stage {args.stage}" + (" +offload" if offload else "")
        print(f"{label:34s}{ours_step:8.2f}{ours_opt:14.2f}  "
              f"({rows['zeroshard_tokens_per_s']:,.0f} tokens/s)")
        if base_step is not None:
            name = "torch" if args.baseline == "torch" else "stage 2"
            print(f"ratio zeroshard stage {args.stage}/{name}: optimizer {rows['opt_ratio']:.3f}x, "
                  f"full step {rows['step_ratio']:.3f}x (<= 1.0: no slower)")
        for which, mem in (("baseline", base_memory), ("zeroshard", memory)):
            if mem:
                measured = mem.get("measured", {})
                peak = measured.get("peak_bytes", 0) / 2 ** 30
                print(f"memory {which}: {mem['total'] / 2**30:.2f} GiB accounted, "
                      f"{measured.get('kind', '?')} peak {peak:.2f} GiB")
        for kind, row in (overlap or {}).items():
            if isinstance(row, dict) and row.get("gpu_ops"):
                frac = row["overlap_fraction"]
                print(f"trace {kind}: {row.get('calls', '-')} calls, {row['gpu_ops']} GPU ops, "
                      f"{row['gpu_ms']:.2f} ms, {row['overlapped_ms']:.2f} ms "
                      f"({(frac or 0) * 100:.0f}%) during compute on another stream")
            elif isinstance(row, dict) and row.get("calls"):
                print(f"trace {kind}: {row['calls']} calls (no GPU activity in the trace)")
        if args.json:
            with open(args.json, "w") as out:
                json.dump(rows, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
