"""The main job's output carries no FutureWarning or DeprecationWarning (issue 8).

Why the filter covers every module and not only `zeroshard`: the module field of `-W` and
PYTHONWARNINGS is matched literally and whole (`error::FutureWarning:zeroshard` matches the
module `zeroshard` alone, not `zeroshard.communicator`), and a warning is attributed to the frame
its `stacklevel` names, often a torch module (torch.distributed's deprecation of
all_gather_into_tensor) or the user's script, even when our call caused it. A user sees them all,
so the zeroshard run turns every such warning into an error. The same run with DDP + torch.optim
instead of zeroshard is the control: when it fails, torch or the example warn by themselves.

PYTHONWARNINGS rather than `-W`: torchrun starts the ranks as new interpreters, which inherit the
environment but not the launcher's `-W` flags.
"""
import os
import subprocess
import sys

import zeroshard

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_SCRIPT = os.path.join(REPO, "examples", "train_gpt.py")
ZEROSHARD_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(zeroshard.__file__)))
WARNINGS_AS_ERRORS = "error::FutureWarning,error::DeprecationWarning"
# scripts/main_job.sh on CPU: 2 gloo ranks, tiny model, stage 2; fewer steps, same code paths
# (checkpoint-free training: construction, backward, clip, step, zero_grad, metrics).
MAIN_JOB = ["--device", "cpu", "--model", "tiny", "--steps", "4",
            "--seq-len", "32", "--batch-size", "2", "--log-every", "2"]


def run_main_job(optimizer_args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", TRAIN_SCRIPT] + optimizer_args + MAIN_JOB
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS=WARNINGS_AS_ERRORS,
               PYTHONPATH=os.pathsep.join(filter(None, [ZEROSHARD_ROOT,
                                                        os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    return done.returncode, output


def test_control_ddp_run_is_warning_free():
    code, output = run_main_job(["--optimizer", "ddp"])
    assert code == 0, ("torch or examples/train_gpt.py warn without zeroshard, so the zeroshard "
                       "check below cannot tell whose warning it sees:\n" + output[-4000:])
    assert "final loss" in output


def test_main_job_with_zeroshard_is_warning_free():
    code, output = run_main_job(["--optimizer", "zeroshard", "--stage", "2"])
    assert code == 0, ("the main job raised under " + WARNINGS_AS_ERRORS + ":\n" + output[-4000:])
    assert "final loss" in output
    assert "Warning" not in output, output[-4000:]
