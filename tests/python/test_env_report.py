"""`python -m zeroshard.env` states the torch claim that CI backs (issue 8)."""
import os
import re
import subprocess
import sys

import torch
from zeroshard import env


SETUP_ENV = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "scripts", "setup_env.sh")


def test_tested_minor_is_the_one_ci_runs():
    # scripts/setup_env.sh pins the torch CI runs; TESTED_TORCH must name exactly that minor.
    with open(SETUP_ENV) as script:
        pinned = re.search(r"torch==(\d+)\.(\d+)", script.read())
    assert pinned, "scripts/setup_env.sh no longer pins torch==X.Y"
    assert env.TESTED_TORCH == ((int(pinned.group(1)), int(pinned.group(2))),)
    assert env.torch_tested_note(f"{pinned.group(1)}.{pinned.group(2)}.0+cpu").startswith(
        "tested in CI")


def test_other_minors_are_reported_untested():
    for version in ("2.4.1", "2.11.0+cu130", "2.14.1"):
        note = env.torch_tested_note(version)
        assert note.startswith("untested") and "2.13" in note, note


def test_report_row_says_whether_this_torch_is_tested():
    done = subprocess.run([sys.executable, "-m", "zeroshard.env"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("torch "))
    assert torch.__version__ in row
    assert ("tested in CI" in row) != ("untested" in row), row
