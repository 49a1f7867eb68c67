"""Tied weights through zeroshard.checkpoint and export: a model whose output head is its
embedding (as GPT-2's lm_head.weight is transformer.wte.weight) exports every state_dict key,
so that `load_state_dict(..., strict=True)` takes the .pt and the .safetensors file."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_harness import run_distributed  # noqa: E402
from test_checkpoint import TINY_BUCKET_MB  # noqa: E402

import zeroshard  # noqa: E402
from zeroshard import export  # noqa: E402
from zeroshard.checkpoint import CheckpointError  # noqa: E402

VOCAB, WIDTH, TOKENS = 11, 6, 12


class TiedLM(torch.nn.Module):
    """Embedding, one layer, and a head that shares the embedding's weight (unless untied)."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(VOCAB, WIDTH)
        self.body = torch.nn.Linear(WIDTH, WIDTH)
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))
        self.lm_head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        return self.lm_head(torch.tanh(self.body(self.wte(tokens))))


def _tokens(step: int):
    g = torch.Generator().manual_seed(50 + step)
    return torch.randint(0, VOCAB, (TOKENS + 1,), generator=g)


def _train_and_save(rank, world_size, path):
    torch.manual_seed(0)
    model = TiedLM()
    opt = zeroshard.ZeroAdamW(model.parameters(), lr=5e-2, stage=2, bucket_mb=TINY_BUCKET_MB)
    per = TOKENS // world_size
    for step in range(3):
        tokens = _tokens(step)[rank * per:(rank + 1) * per + 1]
        loss = torch.nn.functional.cross_entropy(model(tokens[:-1]), tokens[1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.seen += 1
    zeroshard.checkpoint.save(path, model=model, optimizer=opt)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tied") / "ck")
    trained = run_distributed(_train_and_save, 2, path)[0]
    return path, trained


def test_export_writes_tied_keys_and_loads_strictly(saved, tmp_path):
    path, trained = saved
    assert not torch.equal(trained["wte.weight"], TiedLM().wte.weight)  # training moved it
    pt, st = str(tmp_path / "w.pt"), str(tmp_path / "w.safetensors")
    export.export(path, pt)
    export.export(path, st)
    import safetensors.torch
    from_pt, from_st = torch.load(pt, weights_only=True), safetensors.torch.load_file(st)
    # As torch.save(model.state_dict()) has it: every key, in order, the tied ones on one storage.
    assert list(from_pt) == list(trained)
    assert from_pt["lm_head.weight"].data_ptr() == from_pt["wte.weight"].data_ptr()
    assert set(from_st) == set(trained)
    for state in (from_pt, from_st):
        model = TiedLM()
        model.load_state_dict(state, strict=True)
        for k, v in trained.items():
            assert torch.equal(model.state_dict()[k], v), k
        assert model.lm_head.weight is model.wte.weight  # still tied after the load


def test_load_into_tied_and_untied_models(saved):
    path, trained = saved
    for tied in (True, False):
        model = TiedLM(tied)
        zeroshard.checkpoint.load(path, model=model)
        for k, v in trained.items():
            assert torch.equal(model.state_dict()[k], v), (tied, k)


def test_untied_checkpoint_refuses_a_tied_model(tmp_path):
    path = str(tmp_path / "untied")
    zeroshard.checkpoint.save(path, model=TiedLM(tied=False))
    with pytest.raises(CheckpointError, match="lm_head.weight and wte.weight are one tied tensor "
                                              "in the model but two tensors in the checkpoint"):
        zeroshard.checkpoint.load(path, model=TiedLM())


def test_checkpoint_without_aliases_still_loads_and_exports(saved, tmp_path):
    path, trained = saved
    snapshot = os.path.join(path, open(os.path.join(path, "LATEST")).read())
    meta_path = os.path.join(snapshot, "metadata.json")
    meta = json.load(open(meta_path))
    position = list(trained).index("lm_head.weight")
    assert meta["aliases"] == [["lm_head.weight", "wte.weight", position]]
    del meta["aliases"]  # as saved before tied weights were recorded
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    model = TiedLM()
    zeroshard.checkpoint.load(path, model=model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    export.export(path, str(tmp_path / "old.pt"))
    old = torch.load(str(tmp_path / "old.pt"), weights_only=True)
    assert list(old) == [k for k in trained if k != "lm_head.weight"]
    model = TiedLM()
    model.load_state_dict(old, strict=False)  # what such a file always needed
    assert torch.equal(model.lm_head.weight, trained["lm_head.weight"])
