"""Multi-rank test harness: run one function on N gloo processes on CPU and return each rank's result.

Owns process start-up, rendezvous (a FileStore in a fresh temporary directory, so parallel test runs
never race for a TCP port), result transport (one `torch.save` file per rank) and failure handling:
an exception in any rank is re-raised in the pytest process with the rank and its traceback; a rank
that hangs is killed after a hard timeout and the test fails instead of hanging the suite. A run
whose process group could not be set up (gloo's connection mesh broke before the function ran:
"Connection closed by peer" in connectFullMesh, seen once in ~1900 tests on a loaded machine) is
run again from scratch, up to SETUP_ATTEMPTS times; a failure of the function itself never is.

It knows nothing of zeroshard: tests hand it a module-level function `fn(rank, world_size, *args)`.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, List, Optional

import torch

__all__ = ["run_distributed", "DistributedTestError", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 120.0
# After one rank fails, the others are often blocked in a collective waiting for it: give them this
# long to finish (and report their own errors) before killing them, so a failure is fast.
FAILURE_GRACE_S = 5.0
POLL_INTERVAL_S = 0.02
SETUP_ATTEMPTS = 3
# First line of a rank's error file when init_process_group itself failed
SETUP_FAILED = "process group setup failed"


class DistributedTestError(AssertionError):
    """A rank raised, died, or did not finish in time. The message names the rank(s) and why."""


class _SetupFailed(DistributedTestError):
    """The first rank to fail failed inside init_process_group: the function never ran there."""


def _forkserver_context():
    # forkserver (with torch preloaded) starts each rank in milliseconds instead of re-importing
    # torch per process as spawn would, and unlike fork it never copies the pytest process's threads.
    ctx = multiprocessing.get_context("forkserver")
    # torch._dynamo is what the first torch.optim step imports lazily (~3 s of CPU per rank).
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "torch.nn.parallel"])
    return ctx


def _function_address(fn: Callable) -> tuple:
    """Where a child finds `fn`: its module's name and file (pytest test modules are not packages)."""
    if not callable(fn) or "<locals>" in getattr(fn, "__qualname__", "<locals>"):
        raise TypeError(f"run_distributed: fn must be a module-level function, got {fn!r}; "
                        "define it at the top level of a test module so child processes can import it")
    module = sys.modules[fn.__module__]
    return fn.__module__, fn.__qualname__, getattr(module, "__file__", None)


def _resolve(address: tuple) -> Callable:
    module_name, qualname, module_file = address
    if module_file is not None:
        module_dir = os.path.dirname(os.path.abspath(module_file))
        if module_dir not in sys.path:
            sys.path.insert(0, module_dir)
    if module_name == "__main__" and module_file is not None:
        spec = importlib.util.spec_from_file_location("__harness_main__", module_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    target = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _rank_main(rank: int, world_size: int, store_path: str, result_dir: str, address: tuple,
               args: tuple, collective_timeout_s: float,
               fail_setup_marker: Optional[str] = None) -> None:
    """Child entry: join the group, run the function, write the result or the traceback to a file."""
    import torch.distributed as dist

    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    # N ranks share 2 cores: one thread each avoids oversubscription stalls.
    torch.set_num_threads(1)
    result_path = os.path.join(result_dir, f"rank{rank}.pt")
    error_path = os.path.join(result_dir, f"rank{rank}.err")
    try:
        fn = _resolve(address)
        try:
            # test hook: rank 0 of the first run fails its setup
            if rank == 0 and fail_setup_marker and not os.path.exists(fail_setup_marker):
                open(fail_setup_marker, "w").close()
                raise RuntimeError("simulated: Gloo connectFullMesh failed (test hook)")
            dist.init_process_group(
                "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                timeout=datetime.timedelta(seconds=collective_timeout_s))
        except Exception:  # noqa: BLE001 - reported apart: the parent runs the group again
            with open(error_path + ".tmp", "w") as f:
                f.write(f"{SETUP_FAILED}\n{traceback.format_exc()}")
            os.replace(error_path + ".tmp", error_path)
            os._exit(1)
        result = fn(rank, world_size, *args)
        torch.save(result, result_path + ".tmp")
        os.replace(result_path + ".tmp", result_path)  # the parent never reads a half-written file
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, even SystemExit
        with open(error_path + ".tmp", "w") as f:
            f.write(traceback.format_exc())
        os.replace(error_path + ".tmp", error_path)
        os._exit(1)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown trouble after a written result is not a test failure
        pass
    os._exit(0)


def _kill(processes) -> None:
    for proc in processes:
        if proc.is_alive():
            proc.kill()
    for proc in processes:
        proc.join(timeout=5)


def run_distributed(fn: Callable, world_size: int, *args: Any,
                    timeout_s: float = DEFAULT_TIMEOUT_S,
                    _fail_setup_marker: Optional[str] = None) -> List[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo processes; return results by rank.

    `fn` must be a module-level function; `args` and the results must survive `torch.save`/pickle
    (tensors, dicts, lists, numbers, strings). Raises DistributedTestError naming the rank and its
    traceback if any rank raises or dies, or naming the ranks still running after `timeout_s`.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"run_distributed: world_size must be an int >= 1, got {world_size!r}")
    if not timeout_s > 0:
        raise ValueError(f"run_distributed: timeout_s must be > 0, got {timeout_s!r}")
    address = _function_address(fn)
    for attempt in range(1, SETUP_ATTEMPTS + 1):
        try:
            return _run_once(fn, world_size, args, timeout_s, address, _fail_setup_marker)
        except _SetupFailed as error:
            if attempt == SETUP_ATTEMPTS:
                raise DistributedTestError(
                    f"the process group could not be set up in {SETUP_ATTEMPTS} attempts; "
                    f"the last:\n{error}") from None


def _run_once(fn: Callable, world_size: int, args: tuple, timeout_s: float,
              address: tuple, fail_setup_marker: Optional[str]) -> List[Any]:
    ctx = _forkserver_context()
    with tempfile.TemporaryDirectory(prefix="zeroshard_dist_") as tmp:
        store_path = os.path.join(tmp, "store")
        processes = [
            ctx.Process(target=_rank_main, name=f"rank{rank}",
                        args=(rank, world_size, store_path, tmp, address, args, timeout_s,
                              fail_setup_marker),
                        daemon=True)
            for rank in range(world_size)]
        for proc in processes:
            proc.start()
        deadline = time.monotonic() + timeout_s
        first_failure_at = None
        try:
            while any(p.is_alive() for p in processes):
                now = time.monotonic()
                if first_failure_at is None and any(p.exitcode not in (None, 0) for p in processes):
                    first_failure_at = now
                if first_failure_at is not None and now - first_failure_at > FAILURE_GRACE_S:
                    break
                if now > deadline:
                    hung = [r for r, p in enumerate(processes) if p.is_alive()]
                    raise DistributedTestError(
                        f"{fn.__qualname__} at world_size={world_size}: rank(s) {hung} still running "
                        f"after the {timeout_s:.0f} s timeout (a hang or a collective some rank "
                        "never joined); killed")
                time.sleep(POLL_INTERVAL_S)
        finally:
            _kill(processes)
        return _collect(fn, world_size, processes, tmp)


def _collect(fn: Callable, world_size: int, processes, result_dir: str) -> List[Any]:
    failures = {}
    for rank, proc in enumerate(processes):
        error_path = os.path.join(result_dir, f"rank{rank}.err")
        if os.path.exists(error_path):
            with open(error_path) as f:
                failures[rank] = f"--- rank {rank} raised:\n{f.read()}"
        elif proc.exitcode != 0:
            why = ("killed after another rank failed" if proc.exitcode == -9
                   else f"died with exit code {proc.exitcode} without reporting an exception")
            failures[rank] = f"--- rank {rank} {why}"
        elif not os.path.exists(os.path.join(result_dir, f"rank{rank}.pt")):
            failures[rank] = f"--- rank {rank} exited without returning a result"
    if failures:
        # Once one rank fails, its peers often fail too (a broken collective): name the first.
        error_times = {r: os.stat(os.path.join(result_dir, f"rank{r}.err")).st_mtime_ns
                       for r in range(world_size)
                       if os.path.exists(os.path.join(result_dir, f"rank{r}.err"))}
        raised = sorted(error_times, key=error_times.get)
        first = f"first to fail: rank {raised[0]}; " if raised else ""
        setup = bool(raised) and failures[raised[0]].split("\n")[1] == SETUP_FAILED
        raise (_SetupFailed if setup else DistributedTestError)(
            f"{fn.__qualname__} at world_size={world_size} failed ({first}ranks that raised, "
            f"in order: {raised})\n"
            + "\n".join(failures[r] for r in _failure_order(failures, raised)))
    results = []
    for rank in range(world_size):
        results.append(torch.load(os.path.join(result_dir, f"rank{rank}.pt"), weights_only=False))
    return results


def _failure_order(failures: dict, raised: List[int]) -> List[int]:
    return raised + [r for r in sorted(failures) if r not in raised]
