"""Stage 3 across two "machines" joined by a thin link: plain ZeRO against hybrid sharding
(shard_size="node"), quantized forward gathers (qwZ) and quantized gradient reduce-scatters
(qgZ, int4) and all three of ZeRO++ (with hpZ's node-local copies for backward), same model, same data, same process, each rank's step time and the bytes it
sent across nodes per step. Run under the two-nodes tool (torchrun --nnodes=2, gloo):

  ../shared/tools/two-nodes --rate 200mbit -- bench/bench_two_nodes.py --model gpt-17m

Rank 0 prints the table (median step seconds over --steps after --warmup, ratio to plain, bytes
per step across nodes from comm_stats(), which each rank's ring model splits) and, with --json,
writes it. Every rank of a config runs the same steps; the step time is rank 0's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                "examples"))
import gpt  # noqa: E402

import zeroshard  # noqa: E402

CONFIGS = {
    "plain": {},
    "qwZ": {"quantize_weights": "int8"},
    "qwZ+qgZ": {"quantize_weights": "int8", "quantize_grads": "int4"},
    "ZeRO++ (hpZ+qwZ+qgZ)": {"secondary_shard": "node", "quantize_weights": "int8",
                             "quantize_grads": "int4"},
    "shard_size=node": {"shard_size": "node"},
}


def run(name: str, options: dict, args) -> dict:
    config = gpt.preset(args.model)
    model = gpt.GPT(config, seed=0)
    opt = zeroshard.ZeroAdamW(model, lr=1e-4, stage=3, bucket_mb=args.bucket_mb or None,
                              **options)
    data = gpt.MarkovTokenStream(config.vocab_size, seed=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    seq = args.seq_len or config.default_seq_len
    times, inter = [], []
    for step in range(args.warmup + args.steps):
        inputs, targets = data.batch(step, args.batch_size * world, seq,
                                     slice(rank * args.batch_size, (rank + 1) * args.batch_size))
        opt.reset_comm_stats()
        dist.barrier()
        start = time.perf_counter()
        loss = model(inputs, targets)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
        inter.append(sum(r["inter_node_bytes"] for r in opt.comm_stats().values()))
    times, inter = times[args.warmup:], inter[args.warmup:]
    sent = torch.tensor([float(sum(inter)) / len(inter)])
    dist.all_reduce(sent)  # every rank's bytes across nodes per step, added up
    return {"config": name, "step_s": statistics.median(times), "loss": loss.item(),
            "inter_node_bytes_per_step_all_ranks": int(sent.item()),
            "inter_node_bytes_per_step_rank0": int(inter[-1]),
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt-17m", choices=sorted(gpt.PRESETS))
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per rank")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    # 16 MiB: a few large collectives a step. With the automatic size (1/16 of gpt-17m) the
    # quantized options' many small collectives and kernel calls, 4 ranks sharing 2 cores,
    # spend more time waiting for a core than the link saves (docs/measured.md).
    ap.add_argument("--bucket-mb", type=float, default=16.0,
                    help="every config's bucket size (default 16; 0: automatic)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rows = [run(name, CONFIGS[name], args) for name in args.configs.split(",")]
    if dist.get_rank() == 0:
        plain = next((r for r in rows if r["config"] == "plain"), rows[0])
        print(f"stage 3, {args.model} ({rows[0]['params']:,} params), bucket_mb "
              f"{args.bucket_mb or 'auto'}, "
              f"{dist.get_world_size()} ranks as {os.environ.get('LOCAL_WORLD_SIZE')} a node")
        print(f"{'config':22s} {'step s':>8s} {'vs plain':>8s} {'MB across/step':>15s} "
              f"{'vs plain':>8s}")
        for r in rows:
            across = r["inter_node_bytes_per_step_all_ranks"]
            print(f"{r['config']:22s} {r['step_s']:8.3f} {r['step_s'] / plain['step_s']:8.2f} "
                  f"{across / 1e6:15.1f} "
                  f"{across / plain['inter_node_bytes_per_step_all_ranks']:8.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "model": args.model}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
