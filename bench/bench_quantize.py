"""Block quantization (zeroshard.ops.quantize / dequantize / dequantize_add_) against the memory
bandwidth bound and against the same rule written with torch ops, measured in the same process.

The bound: a torch copy moving the same bytes as the kernel must (quantize reads x and writes q
and the scales; dequantize reads q and scales and writes x; dequantize_add reads q, scales and
acc and writes acc), timed here; `of bound` is that copy's time over the kernel's (1.0: the
kernel runs at memory speed). `vs torch` is the torch-ops version's time over the kernel's.

  PYTHONPATH=python python3 bench/bench_quantize.py [--numel 16777216] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

from zeroshard import ops

QMAX = {8: 127.0, 4: 7.0}


def torch_quantize(x: torch.Tensor, bits: int, block: int):
    """The rule with torch ops (int8 values, one byte each even at 4 bits: no packing)."""
    rows = x.float().view(-1, block)
    scales = rows.abs().amax(dim=1) / QMAX[bits]
    q = torch.round(rows / scales[:, None]).clamp_(-QMAX[bits], QMAX[bits]).to(torch.int8)
    return q, scales


def torch_dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scales[:, None]).to(dtype).view(-1)


def timed(fn: Callable[[], object], device: str, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_time(nbytes_in: int, nbytes_out: int, device: str, reps: int) -> float:
    """A copy reading nbytes_in and writing nbytes_out (the larger one's bytes copied, the rest
    read): the bound for a kernel that moves those bytes."""
    src = torch.empty(max(nbytes_in, 1), dtype=torch.uint8, device=device)
    dst = torch.empty(max(nbytes_out, 1), dtype=torch.uint8, device=device)
    m = min(nbytes_in, nbytes_out)

    def move():
        dst[:m].copy_(src[:m])
        if nbytes_in > m:
            src[m:].max()  # read the rest
        elif nbytes_out > m:
            dst[m:].zero_()  # write the rest
    return timed(move, device, reps)


def bench(numel: int, device: str, bits: int, block: int, dtype: torch.dtype, reps: int
          ) -> List[Dict]:
    x = torch.randn(numel, device=device).to(dtype)
    q, scales = ops.quantize(x, bits=bits, block=block)
    out = torch.empty_like(x)
    acc = torch.zeros(numel, device=device)
    xb, qb, sb, ab = x.numel() * x.element_size(), q.numel(), scales.numel() * 4, numel * 4
    rows = []
    cases = [
        ("quantize", lambda: ops.quantize(x, bits=bits, block=block, out=(q, scales)),
         lambda: torch_quantize(x, bits, block), xb, qb + sb),
        ("dequantize", lambda: ops.dequantize(q, scales, numel, bits=bits, block=block, out=out),
         None if bits == 4 else (lambda: torch_dequantize(q.view(-1, block), scales, dtype)),
         qb + sb, xb),
        ("dequantize_add", lambda: ops.dequantize_add_(acc, q, scales, bits=bits, block=block),
         None if bits == 4 else (lambda: acc.add_(torch_dequantize(q.view(-1, block), scales,
                                                                   torch.float32))),
         qb + sb + ab, ab),
    ]
    for name, ours, theirs, read, written in cases:
        t = timed(ours, device, reps)
        bound = copy_time(read, written, device, reps)
        row = {"op": name, "bits": bits, "dtype": str(dtype).replace("torch.", ""),
               "numel": numel, "block": block, "ms": t * 1e3,
               "GB/s": (read + written) / t / 1e9, "of bound": bound / t}
        if theirs is not None:
            row["vs torch"] = timed(theirs, device, reps) / t
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--block", type=int, default=2048)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    numel = args.numel - args.numel % args.block or args.block  # whole blocks for torch's view
    rows = []
    for bits in (8, 4):
        for dtype in (torch.bfloat16, torch.float32):
            rows += bench(numel, args.device, bits, args.block, dtype, args.reps)
    print(f"{'op':15s} {'bits':>4s} {'dtype':>8s} {'ms':>9s} {'GB/s':>7s} {'of bound':>8s} "
          f"{'vs torch':>8s}")
    for r in rows:
        vs = f"{r['vs torch']:.2f}x" if "vs torch" in r else "-"
        print(f"{r['op']:15s} {r['bits']:4d} {r['dtype']:>8s} {r['ms']:9.3f} {r['GB/s']:7.2f} "
              f"{r['of bound']:8.2f} {vs:>8s}")
    print(f"numel {numel}, block {args.block}, device {args.device}, threads {ops.num_threads()}, "
          f"simd {ops.simd_level()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "numel": numel, "device": args.device}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
