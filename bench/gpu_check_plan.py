"""The time model behind bench/gpu_check.sh's step limits, and the check that they add up.

Each step's expected seconds on the lent machine (one H100/H200, 16 cores, torch 2.11+cu130) are
the sum of its parts, each a (low, high) estimate with where it comes from; a step's limit is its
high estimate with a quarter more, rounded up to 5 s. The script's limits must equal these, and
their sum must fit the budget, which must leave the whole run under 8 minutes (the device tool's
15 minutes then hold a rerun). None of this has been checked against a GPU run yet: a session
that gets one should put the real step times (the summary table's seconds column, pytest's
--durations) in here.

    python bench/gpu_check_plan.py          # the plan, as a table
    python bench/gpu_check_plan.py --check  # exit 1 if the script's limits or the budget disagree
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Dict, List, Tuple

BUDGET_S = 475
WHOLE_RUN_CAP_S = 480  # 8 minutes
FINISH_RESERVE_S = 5  # the report, tar and summary after the last step
MARGIN = 1.25

# step -> [(part, low s, high s)]
PLAN: Dict[str, List[Tuple[str, float, float]]] = {
    "preflight": [("python + torch import, cold page cache", 4, 8),
                  ("nvidia-smi, nvcc --version, header lookups", 1, 2)],
    "configure": [("cmake: CUDA compiler identification (two nvcc test compiles)", 5, 9),
                  ("python/pybind11/NCCL header discovery, generate", 2, 4)],
    "build": [("critical path: the slowest .cu translation unit for sm_90 "
               "(not measured: a guess from the kernels' size)", 25, 45),
              ("the other units in parallel on 16 cores, then the pybind11 module link", 10, 20),
              ("zs_bench and its link", 3, 6)],
    "env": [("python -m zeroshard.env: torch import, CUDA init, NCCL dlopen", 4, 8)],
    "pytest": [("collection: torch + zeroshard import, CUDA context", 5, 8),
               ("test_gpu_ops.py: kernels against torch on the device", 10, 20),
               ("test_gpu_nccl.py: four NCCL tests in spawned processes (init ~4 s each)",
                16, 32),
               ("test_zero_offload.py CUDA tests: two spawned runs, pinned buffers, a few steps",
                8, 20)],
    "zs_bench": [("CUDA init, 18 GB of 1e9-element buffers allocated and filled", 3, 6),
                 ("10 reps (+2 warm-up) of step, norm, copy at ~3-4 TB/s", 1, 3)],
    "bench_ops": [("torch import, CUDA init", 4, 6),
                  ("gpt2-medium shapes and the 1e9 flat case against torch's fused AdamW",
                   6, 12)],
    "zero_step": [("torchrun + NCCL init", 5, 8),
                  ("two gpt2-medium models built on the GPU", 3, 5),
                  ("13 steps each (~0.1 s), 2 profiled steps", 5, 8),
                  ("trace export, gzip", 5, 10)],
    "zero_step3": [("torchrun + NCCL init", 5, 8),
                   ("gpt2-medium at stage 2, then at stage 3", 4, 7),
                   ("13 steps each, 2 profiled steps at stage 3", 5, 9),
                   ("trace export and the all-gather overlap analysis", 7, 14)],
    "offload": [("torchrun + NCCL init", 5, 8),
                ("two gpt2-xl models (1.56B bf16) built on the GPU", 4, 8),
                ("25 GB of host master and state: first touch and page-locking at ~2-5 GB/s",
                 8, 18),
                ("7 steps without offload (~0.15 s)", 1, 2),
                ("7 offloaded steps: a 1.56B-element CPU Adam update (~47 GB of host traffic "
                 "at 15-40 GB/s, 1.2-3 s) and 3.1 GB of bf16 gradients over PCIe", 8, 30),
                ("unlocking and freeing the host memory", 2, 6)],
    "example": [("torchrun + NCCL init, 20 steps of a small GPT", 8, 12)],
}

def limit_of(step: str) -> int:
    high = sum(h for _, _, h in PLAN[step])
    return int(5 * math.ceil(high * MARGIN / 5))


def limits() -> Dict[str, int]:
    return {step: limit_of(step) for step in PLAN}


def script_limits(path: str) -> Dict[str, int]:
    """The LIMIT table of bench/gpu_check.sh."""
    text = open(path).read()
    table = re.search(r"declare -A LIMIT=\((.*?)\)", text, re.S)
    if table is None:
        raise ValueError(f"no `declare -A LIMIT=(...)` in {path}")
    return {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", table.group(1))}


def script_budget(path: str) -> int:
    m = re.search(r"BUDGET=\$\{GPU_CHECK_BUDGET_S:-(\d+)\}", open(path).read())
    if m is None:
        raise ValueError(f"no default budget in {path}")
    return int(m.group(1))


def problems(script: str) -> List[str]:
    out = []
    planned, actual = limits(), script_limits(script)
    if planned != actual:
        out.append(f"gpu_check.sh's limits {actual} are not the plan's {planned}")
    total = sum(planned.values())
    if total > BUDGET_S:
        out.append(f"the limits add up to {total} s, over the {BUDGET_S} s budget")
    if BUDGET_S + FINISH_RESERVE_S > WHOLE_RUN_CAP_S:
        out.append(f"a {BUDGET_S} s budget and {FINISH_RESERVE_S} s to finish exceed "
                   f"{WHOLE_RUN_CAP_S} s")
    if script_budget(script) != BUDGET_S:
        out.append(f"gpu_check.sh's default budget {script_budget(script)} s is not {BUDGET_S} s")
    return out


def table() -> str:
    lines = [f"{'step':<11}{'expected s':>12}{'limit s':>9}  parts"]
    for step, parts in PLAN.items():
        low, high = sum(p[1] for p in parts), sum(p[2] for p in parts)
        lines.append(f"{step:<11}{f'{low:g}-{high:g}':>12}{limit_of(step):>9}  "
                     + "; ".join(f"{name} {lo:g}-{hi:g}" for name, lo, hi in parts))
    total_low = sum(p[1] for parts in PLAN.values() for p in parts)
    total_high = sum(p[2] for parts in PLAN.values() for p in parts)
    lines.append(f"{'total':<11}{f'{total_low:g}-{total_high:g}':>12}"
                 f"{sum(limits().values()):>9}  budget {BUDGET_S} s, whole run < "
                 f"{WHOLE_RUN_CAP_S} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--script", default=os.path.join(os.path.dirname(__file__),
                                                         "gpu_check.sh"))
    args = parser.parse_args(argv)
    print(table())
    if args.check:
        found = problems(args.script)
        for p in found:
            print(f"gpu_check plan: {p}", file=sys.stderr)
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
