"""One full mixed-precision training step: zeroshard.ZeroAdamW vs torch.optim.AdamW(fused=True).

Both train the same bf16 model from examples/gpt.py on the same batch. The torch row keeps an
fp32 master copy and does what mixed precision costs with stock torch: cast the bf16 grads to
fp32, run the fused AdamW step on the masters, copy the masters back into the bf16 params. The
zeroshard row runs ZeroAdamW (stage 2 by default) whose kernel reads bf16 grads and writes the
bf16 params in the same pass. Prints the median optimizer-step time and full-step time of each
and the ratio zeroshard/torch (<= 1.0 means zeroshard is no slower).

    python bench/bench_zero_step.py --device cuda --model gpt2-medium          # GPU machine
    python bench/bench_zero_step.py --device cpu --model tiny --reps 3         # smoke run
Runs at world size 1 unless launched by torchrun; with CUDA under torchrun, gradients go through
zeroshard's NCCL communicator. `--trace out.json.gz` profiles two more zeroshard steps after the
timed ones with torch.profiler (CPU + CUDA) and saves the gzipped Chrome trace: every kernel,
copy and NCCL collective of a step on one timeline (open it in Perfetto or chrome://tracing).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from gpt import GPT, preset  # noqa: E402

import zeroshard  # noqa: E402


def timer(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def batch(config, batch_size: int, seq_len: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=g)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def run_torch(args, device, x, y):
    model = GPT(preset(args.model)).to(device=device, dtype=torch.bfloat16)
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
    return statistics.median(step_ms), statistics.median(opt_ms)


def run_zeroshard(args, device, x, y):
    model = GPT(preset(args.model)).to(device=device, dtype=torch.bfloat16)
    opt = zeroshard.ZeroAdamW(model.parameters(), lr=1e-4, weight_decay=0.1, stage=args.stage)

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
    if args.trace:  # every rank steps (collectives); each writes its own file
        rank = dist.get_rank() if dist.is_initialized() else 0
        save_trace(args.trace if rank == 0 else f"{args.trace}.rank{rank}", device, train_step)
    return statistics.median(step_ms), statistics.median(opt_ms), opt.memory_report()


def save_trace(path: str, device: torch.device, train_step, steps: int = 2) -> None:
    """Profile `steps` training steps and write the Chrome trace, gzipped when path ends .gz."""
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
    if raw != path:
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            dst.write(src.read())
        os.remove(raw)
    print(f"trace: {path} ({os.path.getsize(path) / 1e6:.1f} MB, {steps} steps)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="gpt2-medium")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
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
    with torch.device("meta"):  # sizes only: no 355M-parameter init on the CPU
        numel = sum(p.numel() for p in GPT(config).parameters())
    torch_step, torch_opt = run_torch(args, device, x, y)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ours_step, ours_opt, memory = run_zeroshard(args, device, x, y)
    rows = {"params": numel, "device": str(device), "model": args.model, "stage": args.stage,
            "torch_step_ms": torch_step, "torch_opt_ms": torch_opt,
            "zeroshard_step_ms": ours_step, "zeroshard_opt_ms": ours_opt,
            "opt_ratio": ours_opt / torch_opt, "step_ratio": ours_step / torch_step,
            "zeroshard_memory": memory, "trace": args.trace}
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"model {args.model} ({numel/1e6:.1f}M params, bf16) on {device}, batch "
              f"{args.batch_size}x{x.shape[1]}, zeroshard stage {args.stage}")
        print(f"{'':28s}{'full step ms':>14s}{'optimizer ms':>14s}")
        print(f"{'torch AdamW fused + casts':28s}{torch_step:14.2f}{torch_opt:14.2f}")
        print(f"{'zeroshard ZeroAdamW':28s}{ours_step:14.2f}{ours_opt:14.2f}")
        print(f"ratio zeroshard/torch: optimizer {rows['opt_ratio']:.3f}x, full step "
              f"{rows['step_ratio']:.3f}x (<= 1.0: no slower)")
        if args.json:
            with open(args.json, "w") as out:
                json.dump(rows, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
