"""Shared pytest fixtures for the zeroshard Python tests.

Owns: which CPU SIMD paths a test runs on, and putting the core's global settings (SIMD path,
thread count) back after a test changes them. Knows nothing of what the tests check.
"""
from __future__ import annotations

import glob
import os
import sys

import pytest

# Developer builds drop _core*.so into python/zeroshard; let `pytest tests/python` find it
# without PYTHONPATH. Without such a build (a clean clone, CI) the installed package is used.
_SOURCE_TREE = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "python")
if glob.glob(os.path.join(_SOURCE_TREE, "zeroshard", "_core*.so")) and not os.environ.get(
        "ZEROSHARD_TEST_INSTALLED"):
    sys.path.insert(0, os.path.abspath(_SOURCE_TREE))

import torch  # noqa: E402

from zeroshard import ops  # noqa: E402

# torch only computes references here. Its OpenMP workers spin while zeroshard's pool runs and
# make small tensor ops 20x slower on a shared machine; one thread keeps the suite fast.
torch.set_num_threads(1)

ALL_SIMD_LEVELS = ("scalar", "avx2", "avx512")


def available_simd_levels() -> list:
    """The SIMD paths this CPU and build can run (set_simd_level refuses the others)."""
    start = ops.simd_level()
    levels = []
    try:
        for level in ALL_SIMD_LEVELS:
            try:
                ops.set_simd_level(level)
            except ValueError:
                continue
            levels.append(level)
    finally:
        ops.set_simd_level(start)
    return levels


@pytest.fixture(params=ALL_SIMD_LEVELS)
def simd_level(request):
    """Runs the test once per SIMD path; skips paths this CPU/build lacks; restores the path."""
    start = ops.simd_level()
    try:
        ops.set_simd_level(request.param)
    except ValueError as err:
        pytest.skip(f"SIMD path {request.param} unavailable: {err}")
    yield request.param
    ops.set_simd_level(start)


@pytest.fixture
def restore_num_threads():
    """Puts the core's thread count back after a test that changes it."""
    start = ops.num_threads()
    yield start
    ops.set_num_threads(start)
