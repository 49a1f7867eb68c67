"""The built extension exports only its module init: the core is compiled with hidden
visibility, so no zeroshard:: symbol of ours can bind to (or be bound by) another copy of the
core or another library in the process. Runs on whichever variant is imported (CPU or CUDA).
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from zeroshard import _core

NM = shutil.which("nm")


def _dynamic_symbols() -> list:
    done = subprocess.run([NM, "-D", "-C", "--defined-only", _core.__file__],
                          capture_output=True, text=True, check=True)
    return [line.split(None, 2)[-1] for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(NM is None, reason="needs binutils' nm")
def test_module_exports_its_init_and_no_zeroshard_symbols():
    symbols = _dynamic_symbols()
    assert "PyInit__core" in symbols
    ours = [s for s in symbols if "zeroshard::" in s]
    assert not ours, (f"{_core.__file__} exports {len(ours)} zeroshard:: symbols (build the core "
                      "with hidden visibility), e.g.:\n  " + "\n  ".join(ours[:10]))
