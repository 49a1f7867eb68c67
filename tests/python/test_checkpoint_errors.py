"""zeroshard.checkpoint on bad input and crashes: errors name what is wrong, nothing is
half-loaded, and a save killed at any point leaves a loadable checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _gloo_ranks import check_all_ok, run_ranks  # noqa: E402
from test_checkpoint import K, Net, make, train  # noqa: E402

import zeroshard  # noqa: E402
from zeroshard.checkpoint import CheckpointError  # noqa: E402


def _saved(tmp_path, stage=2):
    model, opt = make(0, stage)
    train(model, opt, K, 0, 0, 1)
    path = str(tmp_path / "ck")
    zeroshard.checkpoint.save(path, model=model, optimizer=opt)
    snapshot = os.path.join(path, open(os.path.join(path, "LATEST")).read())
    return path, snapshot


def _snapshot_of(model, opt):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(len(opt.flat_groups)):
        tensors, scalars = opt.checkpoint_state(i)
        state.update({f"opt{i}.{k}": v.clone() for k, v in tensors.items()})
        state.update({f"opt{i}.{k}": v for k, v in scalars.items()})
    state["lr"] = [g["lr"] for g in opt.param_groups]
    return state


def _assert_unchanged(before, model, opt):
    after = _snapshot_of(model, opt)
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert (torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]), k


def _load_fails(path, match, model=None):
    model, opt = (model, None) if model is not None else make(5, 1)
    opt = opt or zeroshard.ZeroAdamW(model.parameters(), lr=0.5, stage=1)
    if model.frozen.shape == (3,):
        train(model, opt, 1, 0, 0, 1)  # state that a half-load would disturb
    before = _snapshot_of(model, opt)
    with pytest.raises(CheckpointError, match=match):
        zeroshard.checkpoint.load(path, model=model, optimizer=opt)
    _assert_unchanged(before, model, opt)


def test_corrupted_byte_is_caught_by_checksum(tmp_path):
    path, snap = _saved(tmp_path)
    rank_file = os.path.join(snap, "rank-00000-of-00001.bin")
    with open(rank_file, "r+b") as f:
        f.seek(300)
        byte = f.read(1)
        f.seek(300)
        f.write(bytes([byte[0] ^ 0x40]))
    _load_fails(path, r"rank-00000-of-00001\.bin: checksum mismatch in record 'g\d\.\w+'")


def test_truncated_and_missing_shard(tmp_path):
    path, snap = _saved(tmp_path)
    rank_file = os.path.join(snap, "rank-00000-of-00001.bin")
    os.truncate(rank_file, os.path.getsize(rank_file) - 8)
    _load_fails(path, r"rank-00000-of-00001\.bin has \d+ bytes, the metadata says \d+")
    os.remove(rank_file)
    _load_fails(path, r"rank-00000-of-00001\.bin is missing")


def test_newer_format_version(tmp_path):
    path, snap = _saved(tmp_path)
    meta_path = os.path.join(snap, "metadata.json")
    meta = json.load(open(meta_path))
    meta["format"] = 99
    json.dump(meta, open(meta_path, "w"))
    _load_fails(path, r"format version 99; this zeroshard reads format <= 1")


def test_model_with_other_names_or_shapes(tmp_path):
    path, _ = _saved(tmp_path)
    torch.manual_seed(3)
    wider = Net()
    wider.frozen = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    _load_fails(path, r"frozen has shape \[4\] in the model, \[3\] in the checkpoint",
                model=wider)
    extended = Net()
    extended.extra = torch.nn.Parameter(torch.zeros(2))
    _load_fails(path, r"extra is in the model but not in the checkpoint", model=extended)


def test_no_checkpoint_and_incomplete_save(tmp_path):
    os.makedirs(tmp_path / "ck" / "ckpt-crashed")
    _load_fails(str(tmp_path / "ck"), r"LATEST is missing \(found 1 incomplete save")


def _corrupt_rank1_load(rank, world_size, root):
    model, opt = make(0, 2)
    train(model, opt, K, 0, rank, world_size)
    path = os.path.join(root, "ck")
    zeroshard.checkpoint.save(path, model=model, optimizer=opt)
    if rank == 0:  # corrupt the last chunk of rank 1's file: exp_avg_sq, read by rank 1 only
        snap = os.path.join(path, open(os.path.join(path, "LATEST")).read())
        f = os.path.join(snap, "rank-00001-of-00002.bin")
        with open(f, "r+b") as fh:
            fh.seek(os.path.getsize(f) - 4)
            fh.write(b"\xff\xff\xff\x7f")
    import torch.distributed as dist
    dist.barrier()
    fresh, fresh_opt = make(9, 2)
    before = _snapshot_of(fresh, fresh_opt)
    try:
        zeroshard.checkpoint.load(path, model=fresh, optimizer=fresh_opt)
        message = None
    except CheckpointError as e:
        message = str(e)
    _assert_unchanged(before, fresh, fresh_opt)
    return message


def test_one_rank_failing_fails_every_rank(tmp_path):
    messages = check_all_ok(run_ranks(_corrupt_rank1_load, 2, str(tmp_path)))
    assert "checksum mismatch" in messages[1] and "rank-00001-of-00002.bin" in messages[1]
    assert messages[0] is not None and "failed on rank 1" in messages[0], messages[0]


KILLED_SAVE = textwrap.dedent("""
    import os, signal, shutil, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)  # no thread pool: this process forks
    import zeroshard
    from test_checkpoint import make, train
    path = {path!r}
    model, opt = make(0, 2)
    train(model, opt, 1, 0, 0, 1)
    zeroshard.checkpoint.save(path, model=model, optimizer=opt, extra={{"version": 1}})
    refs = {{1: {{k: v.clone() for k, v in model.state_dict().items()}}}}
    other, other_opt = make(0, 2)
    train(other, other_opt, 2, 0, 0, 1)  # what version 2 holds: the same two steps
    refs[2] = other.state_dict()
    for kill_at in range(1, 40):
        pid = os.fork()
        if pid == 0:  # save version 2, SIGKILLed at the kill_at-th fsync/replace/rmtree
            calls = [0]
            def dying(fn):
                def wrapper(*a, **k):
                    calls[0] += 1
                    if calls[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*a, **k)
                return wrapper
            os.fsync, os.replace, shutil.rmtree = (dying(os.fsync), dying(os.replace),
                                                   dying(shutil.rmtree))
            train(model, opt, 1, 1, 0, 1)
            zeroshard.checkpoint.save(path, model=model, optimizer=opt, extra={{"version": 2}})
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        fresh, fresh_opt = make(7, 2)
        version = zeroshard.checkpoint.load(path, model=fresh, optimizer=fresh_opt)["version"]
        print("kill_at", kill_at, "killed", os.WIFSIGNALED(status), "loaded", version, flush=True)
        ref = refs[version]
        assert all(torch.equal(ref[k], v) for k, v in fresh.state_dict().items()), kill_at
        if not os.WIFSIGNALED(status):
            break
    print("done", flush=True)
""")


def test_save_killed_at_every_durability_point_leaves_a_loadable_checkpoint(tmp_path):
    script = KILLED_SAVE.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                path=str(tmp_path / "ck"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [l.split() for l in proc.stdout.splitlines() if l.startswith("kill_at")]
    killed = [l for l in lines if l[3] == "True"]
    assert len(killed) >= 6, lines  # fsyncs of data, metadata, dirs, pointer; replace; cleanup
    assert any(l[5] == "1" for l in killed) and any(l[5] == "2" for l in killed), lines
    assert lines[-1][3] == "False" and lines[-1][5] == "2" and proc.stdout.endswith("done\n")


class _FrameworkWrapper:
    """What accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer look like to
    zeroshard.checkpoint: the real optimizer in `.optimizer`."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_framework_optimizer_wrappers_are_unwrapped(tmp_path):
    model, opt = make(0, 2)
    train(model, opt, K, 0, 0, 1)
    path = str(tmp_path / "wrapped")
    zeroshard.checkpoint.save(path, model=model, optimizer=_FrameworkWrapper(
        _FrameworkWrapper(opt)))
    again_model, again = make(5, 2)
    zeroshard.checkpoint.load(path, model=again_model, optimizer=_FrameworkWrapper(again))
    assert _snapshot_of(again_model, again).keys() == _snapshot_of(model, opt).keys()
    for key, value in _snapshot_of(model, opt).items():
        other = _snapshot_of(again_model, again)[key]
        assert (torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other), key
    with pytest.raises(TypeError, match="zeroshard optimizer"):
        zeroshard.checkpoint.save(path, model=model, optimizer=_FrameworkWrapper(object()))
