"""zeroshard.checkpoint: exact resume, resharding N -> M (1..4, stages 0/1/2), export.

Multi-rank runs are gloo processes on CPU (tests/python/_gloo_ranks.py). Bitwise checks where
the maths is the same (same world size and stage; bytes moved by resharding); a tolerance only
against the single-process torch.optim oracle, whose reduction order differs.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _gloo_ranks import check_all_ok, run_ranks  # noqa: E402

import zeroshard  # noqa: E402
from zeroshard import export  # noqa: E402

TINY_BUCKET_MB = 71 * 4 / 2 ** 20  # 71 fp32 elements: params straddle buckets and shards
GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4
K = 3


class Net(torch.nn.Module):
    """Awkward sizes, a frozen param, a buffer; optionally a bf16 layer (fp32 master)."""

    def __init__(self, bf16: bool = False) -> None:
        super().__init__()
        self.a = torch.nn.Linear(7, 13)
        self.b = torch.nn.Linear(13, 5)
        self.frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("counter", torch.zeros(2, dtype=torch.int64))
        self.c = torch.nn.Linear(5, 5).to(torch.bfloat16) if bf16 else None

    def forward(self, x):
        y = self.b(torch.tanh(self.a(x))) + self.frozen.sum()
        if self.c is not None:
            y = y + self.c(y.to(torch.bfloat16)).float()
        return y


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 7, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g)


def make(seed: int, stage: int, group=None, bf16: bool = False):
    torch.manual_seed(seed)
    model = Net(bf16)
    params = [{"params": [model.a.weight, model.a.bias, model.frozen], "lr": 2e-2},
              {"params": [p for n, p in model.named_parameters()
                          if not n.startswith(("a.", "frozen"))], "lr": 1e-2}]
    opt = zeroshard.ZeroAdamW(params, weight_decay=0.1, stage=stage, process_group=group,
                              bucket_mb=TINY_BUCKET_MB)
    return model, opt


def train(model, opt, steps, start, rank, world_size):
    per = GLOBAL_BATCH // world_size
    for step in range(start, start + steps):
        x, y = batch(step)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.counter += 1


def _exact_resume(rank, world_size, root):
    out = {}
    for stage in (1, 2):
        for bf16 in (False, True):
            straight, opt_s = make(0, stage, bf16=bf16)
            train(straight, opt_s, 2 * K, 0, rank, world_size)
            first, opt_f = make(0, stage, bf16=bf16)
            train(first, opt_f, K, 0, rank, world_size)
            path = os.path.join(root, f"s{stage}-{bf16}")
            zeroshard.checkpoint.save(path, model=first, optimizer=opt_f, extra={"step": K})
            resumed, opt_r = make(123, stage, bf16=bf16)  # different init: load must overwrite
            extra = zeroshard.checkpoint.load(path, model=resumed, optimizer=opt_r)
            train(resumed, opt_r, K, extra["step"], rank, world_size)
            a, b = straight.state_dict(), resumed.state_dict()
            out[(stage, bf16)] = all(torch.equal(a[k], b[k]) for k in a)
    return out


def test_exact_resume_bitwise_world_size_2(tmp_path):
    results = check_all_ok(run_ranks(_exact_resume, 2, str(tmp_path)))
    for rank, per_case in results.items():
        assert all(per_case.values()), f"rank {rank}: not bitwise equal: {per_case}"


def _reshard(rank, world_size, root):
    import torch.distributed as dist
    groups = {n: dist.new_group(list(range(n))) for n in range(1, world_size + 1)}
    for n in range(1, world_size + 1):  # phase 1: train K steps at world size n, save
        if rank < n:
            model, opt = make(0, 1 if n % 2 else 2, groups[n])
            train(model, opt, K, 0, rank, n)
            zeroshard.checkpoint.save(os.path.join(root, f"from{n}"), model=model, optimizer=opt)
        dist.barrier()
    finals = {}
    for m in range(1, world_size + 1):  # phase 2: load each at world size m, save, go on
        for n in range(1, world_size + 1):
            if rank < m:
                stage = 0 if (n, m) == (2, 3) else (1 if (n + m) % 2 else 2)
                model, opt = make(7, stage, groups[m])
                zeroshard.checkpoint.load(os.path.join(root, f"from{n}"), model=model,
                                          optimizer=opt)
                zeroshard.checkpoint.save(os.path.join(root, f"from{n}to{m}"), model=model,
                                          optimizer=opt)
                train(model, opt, K, K, rank, m)
                if rank == 0:
                    finals[(n, m)] = {k: v.clone() for k, v in model.state_dict().items()}
            dist.barrier()
    return finals


def _oracle():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW([{"params": [model.a.weight, model.a.bias], "lr": 2e-2},
                             {"params": list(model.b.parameters()), "lr": 1e-2}],
                            weight_decay=0.1)
    for step in range(2 * K):
        x, y = batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        model.counter += 1
    return model.state_dict()


def _exported(path, tmp_path, tag):
    w, o = str(tmp_path / f"{tag}.safetensors"), str(tmp_path / f"{tag}-opt.pt")
    export.export(path, w, optimizer_out=o)
    import safetensors.torch
    return safetensors.torch.load_file(w), torch.load(o, weights_only=True)


def test_reshard_every_world_size_pair(tmp_path):
    finals = check_all_ok(run_ranks(_reshard, 4, str(tmp_path), timeout=150))[0]
    oracle = _oracle()
    for (n, m), state in finals.items():
        for k, v in oracle.items():
            assert torch.allclose(state[k].double(), v.double(), rtol=1e-4, atol=1e-5), \
                f"{n}->{m}: {k} differs from the torch.optim oracle by " \
                f"{(state[k].double() - v.double()).abs().max():.3g}"
        # Resharding only moves bytes: what was loaded at m and saved again equals what was
        # saved at n, bitwise, weights and full-shape optimizer state.
        w_n, o_n = _exported(os.path.join(tmp_path, f"from{n}"), tmp_path, f"n{n}m{m}a")
        w_m, o_m = _exported(os.path.join(tmp_path, f"from{n}to{m}"), tmp_path, f"n{n}m{m}b")
        assert w_n.keys() == w_m.keys() and all(torch.equal(w_n[k], w_m[k]) for k in w_n)
        assert o_n["state"].keys() == o_m["state"].keys()
        for i in o_n["state"]:
            for key in o_n["state"][i]:
                assert torch.equal(o_n["state"][i][key], o_m["state"][i][key]), (n, m, i, key)


def test_export_matches_torch_optim_and_loads_into_it(tmp_path):
    model, opt = make(0, 2)
    ref_model = copy.deepcopy(model)
    train(model, opt, K, 0, 0, 1)
    zeroshard.checkpoint.save(str(tmp_path / "ck"), model=model, optimizer=opt)
    pt, st, o = (str(tmp_path / n) for n in ("w.pt", "w.safetensors", "o.pt"))
    assert export.main([str(tmp_path / "ck"), pt, "--optimizer-out", o]) == 0
    assert export.main([str(tmp_path / "ck"), st]) == 0
    import safetensors.torch
    for sd in (torch.load(pt, weights_only=True), safetensors.torch.load_file(st)):
        assert list(sd) == list(model.state_dict())
        for k, v in model.state_dict().items():
            assert sd[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype)
            assert torch.equal(sd[k], v.to(sd[k].dtype)), k
    ref_opt = torch.optim.AdamW([{"params": [ref_model.a.weight, ref_model.a.bias,
                                             ref_model.frozen], "lr": 2e-2},
                                 {"params": list(ref_model.b.parameters()), "lr": 1e-2}],
                                weight_decay=0.1)
    train(ref_model, ref_opt, K, 0, 0, 1)
    exported, ref = torch.load(o, weights_only=True), ref_opt.state_dict()
    assert exported["state"].keys() == ref["state"].keys()  # no state for the frozen param
    for i, s in ref["state"].items():
        for key, v in s.items():
            assert torch.allclose(exported["state"][i][key], v, rtol=1e-5, atol=1e-7), (i, key)
    ref_opt.load_state_dict(exported)  # torch.optim accepts it as its own
    assert ref_opt.param_groups[0]["lr"] == 2e-2


def test_bf16_export_uses_fp32_master(tmp_path):
    model, opt = make(0, 1, bf16=True)
    train(model, opt, K, 0, 0, 1)
    zeroshard.checkpoint.save(str(tmp_path / "ck"), model=model, optimizer=opt)
    export.export(str(tmp_path / "ck"), str(tmp_path / "w.pt"))
    sd = torch.load(str(tmp_path / "w.pt"), weights_only=True)
    assert sd["c.weight"].dtype == torch.float32
    assert torch.equal(sd["c.weight"].to(torch.bfloat16), model.c.weight)
    assert not torch.equal(sd["c.weight"], model.c.weight.float())  # master bits beyond bf16


def test_model_only_and_rng_roundtrip(tmp_path):
    model, _ = make(0, 2)
    torch.manual_seed(5)
    zeroshard.checkpoint.save(str(tmp_path / "m"), model=model, rng=True, extra=[1, "two"])
    expected = torch.rand(4)
    other, _ = make(9, 2)
    assert zeroshard.checkpoint.load(str(tmp_path / "m"), model=other, rng=True) == [1, "two"]
    assert torch.equal(torch.rand(4), expected)
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)


def test_bad_arguments_are_named(tmp_path):
    model, opt = make(0, 2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        zeroshard.checkpoint.save(str(tmp_path), model=opt, optimizer=opt)
    with pytest.raises(TypeError, match="optimizer must be a zeroshard optimizer"):
        zeroshard.checkpoint.save(str(tmp_path), model=model,
                                  optimizer=torch.optim.SGD(model.parameters(), lr=1))
    with pytest.raises(ValueError, match="out must end in"):
        export.export(str(tmp_path), str(tmp_path / "w.bin"))
