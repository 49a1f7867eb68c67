"""The offloaded step on CPU, measured against zeroshard.memory.offload_time's prediction.

What a CPU can measure of offload: the host update (the CPU kernels over master and state, the
staging of updated parameters) and the gradients' landing (copies into the host shard, the
landing worker's upcast), here with the copies done by the CPU's memcpy or, with --simulate,
by simulated asynchrony's copy streams (ZEROSHARD_SIMULATE_ASYNC=1: late copies on worker
threads). The prediction takes this machine's own bandwidths, measured in the same process:
host = an in-place read+write of a large tensor (x.mul_), link = a large tensor copy. On CPU
the "device" is the same memory, so this checks the model's byte counts and pacing, not PCIe.

One rank (world size 1), ZeroAdamW stage 2, offload="cpu", a stack of Linear layers of about
--params parameters in --dtype. Prints, per phase, measured and predicted seconds and their
ratio (medians over --reps steps).

  PYTHONPATH=python .venv/bin/python bench/bench_offload_time.py --params 2e7 --reps 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def _bandwidths(numel: int, reps: int = 5):
    """(host read+write bytes/s, copy bytes/s) of this machine, medians."""
    x, y = torch.ones(numel), torch.empty(numel)
    rw, cp = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.mul_(1.0)
        rw.append(2 * x.numel() * 4 / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        y.copy_(x)
        cp.append(2 * x.numel() * 4 / (time.perf_counter() - t0))
    # a copy reads and writes: the link's one-way rate is its bytes over the time
    return statistics.median(rw), statistics.median(cp) / 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=2e7)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--simulate", action="store_true",
                        help="copies by ZEROSHARD_SIMULATE_ASYNC=1's copy streams")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.simulate:
        os.environ["ZEROSHARD_SIMULATE_ASYNC"] = "1"
    import zeroshard
    from zeroshard.memory.offload_time import offloaded_step_time

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    width = 1024
    layers = max(1, round(args.params / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(dtype)
    numel = sum(p.numel() for p in model.parameters())
    opt = zeroshard.ZeroAdamW(model, stage=2, lr=1e-4, offload="cpu")
    x = torch.randn(4, width).to(dtype)
    host_bw, link_bw = _bandwidths(max(numel, 1 << 24))
    landing, update = [], []
    for step in range(args.reps + 1):
        opt.zero_grad()
        opt.backward(model(x).float().pow(2).mean())
        t0 = time.perf_counter()
        opt.offload.finish_landing()  # what of the landing outlasts backward
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if step:  # the first step allocates the state
            landing.append(t1 - t0)
            update.append(t2 - t1)
    predicted = offloaded_step_time(numel, world_size=1, host_bytes_per_s=host_bw,
                                    link_bytes_per_s=link_bw, param_dtype=dtype)
    measured_update = statistics.median(update)
    predicted_update = predicted["step_s"] - predicted["exposed_landing_s"]
    rows = {"params": numel, "dtype": args.dtype, "simulate": args.simulate,
            "host_gbps": host_bw / 1e9, "link_gbps": link_bw / 1e9,
            "update_s": measured_update, "update_predicted_s": predicted_update,
            "landing_tail_s": statistics.median(landing),
            "landing_predicted_s": predicted["landing_s"]}
    print(f"{numel:,} {args.dtype} parameters, world size 1, stage 2, offload cpu"
          f"{' (simulated copy streams)' if args.simulate else ''}; this machine: host "
          f"{host_bw / 1e9:.1f} GB/s read+write, copy {link_bw / 1e9:.1f} GB/s")
    print(f"{'phase':<34}{'measured s':>12}{'predicted s':>13}{'ratio':>8}")
    print(f"{'update + upload (step())':<34}{measured_update:>12.4f}{predicted_update:>13.4f}"
          f"{measured_update / predicted_update:>8.2f}")
    print(f"{'landing after backward returned':<34}{rows['landing_tail_s']:>12.4f}"
          f"{predicted['landing_s']:>13.4f}  (the whole landing; only its tail is measured)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
