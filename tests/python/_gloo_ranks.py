"""Runs a function on N gloo ranks in spawned processes on 127.0.0.1, with a hard deadline.

Owns process start-up, the free port, collecting each rank's return value (or traceback) and
killing ranks that outlive the deadline, so that a bug ends a test instead of hanging the suite.
Used by test_checkpoint*.py and test_faults.py.
"""
from __future__ import annotations

import io
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, fn, args, results):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)  # 2 shared cores: keep N ranks from oversubscribing them
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        value = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(value, buf)  # plain bytes: tensors in a Queue would need this process alive
        results.put((rank, "ok", buf.getvalue(), time.time()))
    except BaseException:  # report, then let the parent decide
        results.put((rank, "error", traceback.format_exc(), time.time()))


def run_ranks(fn, world_size: int, *args, timeout: float = 90.0, expect: int | None = None):
    """fn(rank, world_size, *args) on every rank; returns {rank: (status, value, finish_time)}
    for the ranks that reported. Waits for `expect` reports (default: all ranks), then gives
    the processes a few seconds to exit and kills what is left. Raises on the deadline."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    expect = world_size if expect is None else expect
    out, deadline = {}, time.time() + timeout
    try:
        while len(out) < expect:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError(f"only ranks {sorted(out)} reported within {timeout}s: {out}")
            try:
                rank, status, value, t = results.get(timeout=min(left, 1.0))
                if status == "ok":
                    import torch
                    value = torch.load(io.BytesIO(value), weights_only=False)
                out[rank] = (status, value, t)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    time.sleep(0.2)
                    if results.empty():
                        raise RuntimeError(f"all ranks exited; reports: {out}; exit codes "
                                           f"{[p.exitcode for p in procs]}")
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(10.0, deadline - time.time())))
        for p in procs:
            if p.is_alive():
                p.kill()  # only the processes this call started
                p.join(5)
    return out


def check_all_ok(out):
    bad = {r: v for r, (s, v, _) in out.items() if s != "ok"}
    assert not bad, "\n".join(f"rank {r}:\n{v}" for r, v in bad.items())
    return {r: v for r, (s, v, _) in out.items()}
