"""Helpers for the framework tests (HF Trainer, Lightning) that train every configuration in one
distributed session: each part's result per rank is {"ok": ...} or {"error": traceback}."""
from __future__ import annotations

import pytest
import torch


def ok_results(runs, name):
    """The part's result on each rank, or the test fails with the part's traceback."""
    errors = [f"--- rank {r}:\n{res[name]['error']}" for r, res in enumerate(runs)
              if "error" in res[name]]
    if errors:
        pytest.fail(f"part {name!r} raised:\n" + "\n".join(errors), pytrace=False)
    return [res[name]["ok"] for res in runs]


def assert_same_weights(got, want, what, **tolerance):
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m: f"{what}, {name}: {m}",
                                   **tolerance)
