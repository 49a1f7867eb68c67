"""How many threads a rank's CPU kernels use: its share of the cores (ops.default_num_threads)
once an optimizer will run them, whether it offloads or trains on the CPU, unless the script or
ZEROSHARD_NUM_THREADS chose. Each case runs in a fresh interpreter: the thread count is
process-wide."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys, torch
from zeroshard import ZeroAdamW, ops
chosen = json.loads(sys.argv[1])
if chosen is not None:
    ops.set_num_threads(chosen)
before = ops.num_threads()
model = torch.nn.Linear(8, 8)
ZeroAdamW(model.parameters(), lr=1e-3, stage=2, node_size=1)  # one process, alone
print(json.dumps({"before": before, "after": ops.num_threads(),
                  "default": ops.default_num_threads()}))
"""


def probe(local_world_size: int, chosen=None, env_threads=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ZEROSHARD_NUM_THREADS"}
    env["LOCAL_WORLD_SIZE"] = str(local_world_size)
    if env_threads is not None:
        env["ZEROSHARD_NUM_THREADS"] = str(env_threads)
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(chosen)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_cpu_optimizer_takes_its_share_of_the_cores():
    # Every local rank's kernels on every core: 2 ranks on 2 cores spent 40-70 ms a step on
    # 5 ms of update kernels, waiting on descheduled threads.
    many = max(2, os.cpu_count() or 1)
    seen = probe(local_world_size=many)
    assert seen["after"] == seen["default"] == 1
    if seen["before"] == 1:
        pytest.skip("this machine's core defaults to one thread already: nothing changes")
    assert seen["before"] > 1
    alone = probe(local_world_size=1)
    assert alone["after"] == alone["default"] >= 1


def test_a_chosen_thread_count_is_kept():
    assert probe(local_world_size=64, chosen=3)["after"] == 3
    assert probe(local_world_size=64, env_threads=2)["after"] == 2
