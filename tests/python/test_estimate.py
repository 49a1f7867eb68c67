"""`zeroshard.estimate` against the real optimizers' memory_report(), ZeRO's closed forms, known
model sizes, config.json parsing and its command line."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import zeroshard
from dist_harness import run_distributed
from zeroshard import estimate
from zeroshard.estimate import (estimate_model_states, format_bytes, formula_text,
                                param_numels_of, param_units_of, zero_formula_bytes)
from zeroshard.memory.model_shapes import (config_model, config_numels, gpt2_numels, gpt2_units,
                                    llama_numels, llama_units, preset_model, preset_numels,
                                    read_config_model, read_config_numels, uniform_numels,
                                    uniform_units)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples"))
from gpt import GPT, GPTConfig  # noqa: E402  (examples/gpt.py)
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import VOCAB  # noqa: E402

# Awkward sizes with 0.01 MiB buckets (2621 fp32 elements): buckets and shards cut parameters.
AWKWARD_SHAPES = [(7,), (1000,), (33, 17), (4099,)]
TINY_BUCKET_MB = 0.01
MODEL_STATE_KEYS = ("model_params", "grads", "master_params", "optimizer_state")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class AwkwardParams(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(*shape, generator=gen).to(dtype)) for shape in AWKWARD_SHAPES)

    def loss(self):
        return sum((w.float() ** 2).mean() for w in self.weights)


def _train_and_report(kind, stage, dtype_name, steps=3, bucket_mb=TINY_BUCKET_MB):
    model = AwkwardParams(DTYPES[dtype_name])
    kwargs = dict(lr=1e-3, momentum=0.9) if kind == "SGD" else dict(lr=1e-3)
    opt = getattr(zeroshard, "Zero" + kind)(model.parameters(), stage=stage,
                                            bucket_mb=bucket_mb, **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(model.loss())
        opt.step()
    return dict(opt.memory_report())


def _reports_on_rank(rank, world_size):
    return {(stage, dtype): _train_and_report("AdamW", stage, dtype)
            for stage in (0, 1, 2) for dtype in DTYPES}


def _expected(world_size, stage, dtype_name, optimizer="adamw", backend="gloo",
              bucket_mb=TINY_BUCKET_MB):
    numels = param_numels_of(AwkwardParams(DTYPES[dtype_name]))
    return estimate_model_states(numels, world_size=world_size, stage=stage, dtype=dtype_name,
                                 bucket_mb=bucket_mb, backend=backend, optimizer=optimizer)


def _check_model_states(report, expected, where):
    # Exact, not approximate: the estimator builds the same core Layout FlatGroup builds (same
    # alignment, bucket size and padding to world_size shards) and counts the same buffers.
    for key in MODEL_STATE_KEYS:
        assert report[key] == expected[key], f"{where} {key}: real {report[key]} B, " \
                                             f"estimated {expected[key]} B"


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("kind,optimizer", [("AdamW", "adamw"), ("SGD", "sgd")])
def test_model_states_match_memory_report_on_one_rank(stage, dtype_name, kind, optimizer):
    report = _train_and_report(kind, stage, dtype_name)
    expected = _expected(1, stage, dtype_name, optimizer)
    _check_model_states(report, expected, f"{kind} stage {stage} {dtype_name} N=1")
    assert report["comm_buffers"] == expected["comm_buffers"]


@pytest.mark.parametrize("stage", [1, 2])
def test_automatic_bucket_size_matches_the_optimizer(stage):
    report = _train_and_report("AdamW", stage, "fp32", bucket_mb=None)
    expected = _expected(1, stage, "fp32", bucket_mb=None)
    for key in MODEL_STATE_KEYS + ("comm_buffers",):
        assert report[key] == expected[key], key


@pytest.fixture(scope="module", params=[2, 4])
def gloo_reports(request):
    world_size = request.param
    return world_size, run_distributed(_reports_on_rank, world_size, timeout_s=180)


def test_model_states_match_memory_report_on_gloo_ranks(gloo_reports):
    world_size, per_rank = gloo_reports
    for rank, reports in enumerate(per_rank):
        for (stage, dtype_name), report in reports.items():
            _check_model_states(report, _expected(world_size, stage, dtype_name),
                                f"rank {rank} stage {stage} {dtype_name} N={world_size}")


def test_comm_buffers_match_memory_report_on_gloo_ranks(gloo_reports):
    world_size, per_rank = gloo_reports
    for rank, reports in enumerate(per_rank):
        for (stage, dtype_name), report in reports.items():
            expected = _expected(world_size, stage, dtype_name)["comm_buffers"]
            assert report["comm_buffers"] == expected, \
                f"rank {rank} stage {stage} {dtype_name} N={world_size}: real " \
                f"{report['comm_buffers']} B, planned {expected} B"


def test_report_keys_total_and_offload():
    numels = uniform_numels(10 ** 6)
    report = estimate_model_states(numels, world_size=4, stage=2, dtype="bf16")
    assert set(report) == {"model_params", "grads", "master_params", "optimizer_state",
                           "frozen_params", "comm_buffers", "total", "host_bytes"}
    assert report["total"] == sum(report[k] for k in MODEL_STATE_KEYS + ("comm_buffers",))
    assert report["host_bytes"] == 0
    offloaded = estimate_model_states(numels, world_size=4, stage=2, dtype=torch.bfloat16,
                                      offload="cpu")
    # Host: the fp32 master, the moments, the reduced gradient shard and the bf16 staging
    # (two buffers of a bucket's slice: the automatic bucket here is its minimum, 1/4 MiB of
    # fp32 gradients, so a slice at 4 ranks is 2**16 / 4 elements).
    slice_numel = 2 ** 18 // 4 // 4
    assert offloaded["host"] == {"master_params": report["master_params"],
                                 "optimizer_state": report["optimizer_state"],
                                 "grads": report["grads"], "staging": 2 * 2 * slice_numel}
    assert offloaded["host_bytes"] == sum(offloaded["host"].values())
    # Device: the parameters and the ring only (gloo's slots also receive the slice).
    assert offloaded["total"] == report["model_params"] + offloaded["comm_buffers"]
    assert offloaded["comm_buffers"] > report["comm_buffers"]
    nccl = dict(world_size=4, stage=2, dtype="bf16", backend="nccl")
    assert (estimate_model_states(numels, offload="cpu", **nccl)["comm_buffers"]
            == estimate_model_states(numels, **nccl)["comm_buffers"])
    # fp32 parameters get an fp32 host copy for the kernel (no master without offload).
    fp32 = estimate_model_states(numels, world_size=4, stage=1, offload="cpu")
    assert fp32["host"]["master_params"] == fp32["optimizer_state"] // 2
    assert fp32["host"]["staging"] == 0
    with pytest.raises(ValueError, match="stage 1, 2 or 3"):
        estimate_model_states(numels, world_size=4, stage=0, offload="cpu")


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="stage 3 needs each parameter's unit"):
        estimate_model_states([10], world_size=2, stage=3)
    with pytest.raises(ValueError, match="units has 1 entries, param_numels 2"):
        estimate_model_states([10, 20], world_size=2, stage=3, units=[0])
    with pytest.raises(ValueError, match="non-negative integers"):
        estimate_model_states([10, 20], world_size=2, stage=3, units=[0, -1])
    with pytest.raises(ValueError, match="prefetch must be a whole number"):
        estimate_model_states([10], world_size=2, stage=3, units=[0], prefetch=-1)
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3"):
        zero_formula_bytes(10, world_size=2, stage=4)
    with pytest.raises(ValueError, match="world_size"):
        estimate_model_states([10], world_size=0, stage=1)
    with pytest.raises(ValueError, match="non-negative integers"):
        estimate_model_states([10, -1], world_size=2, stage=1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        estimate_model_states([10], world_size=2, stage=1, dtype="int8")
    with pytest.raises(ValueError, match="unknown preset"):
        preset_numels("gpt5")
    with pytest.raises(ValueError, match="pass frozen_units= parallel to frozen_numels"):
        estimate_model_states([10], world_size=2, stage=3, units=[0], frozen_numels=[4])
    with pytest.raises(ValueError, match="frozen_units has 2 entries, frozen_numels 1"):
        estimate_model_states([10], world_size=2, stage=3, units=[0], frozen_numels=[4],
                              frozen_units=[0, 1])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("world_size", [1, 2, 8, 64])
def test_estimate_follows_zero_formula_for_a_large_model(dtype, stage, world_size):
    num_params = 10 ** 9
    # The paper keeps gradients in the parameters' precision: reduce in that dtype to compare.
    units = dict(units=uniform_units(num_params)) if stage == 3 else {}
    report = estimate_model_states(uniform_numels(num_params), world_size=world_size,
                                   stage=stage, dtype=dtype, reduce_dtype=dtype, **units)
    # Stage 1's reduced shard lives inside its full local buffer: one full buffer, as the
    # paper counts.
    model_states = sum(report[k] for k in MODEL_STATE_KEYS)
    formula = zero_formula_bytes(num_params, world_size=world_size, stage=stage, dtype=dtype)
    assert abs(model_states - formula) <= 0.01 * formula, (model_states, formula)


def test_formula_text_and_values():
    assert [formula_text(s, "bf16") for s in (0, 1, 2, 3)] == ["16Ψ", "4Ψ+12Ψ/N", "2Ψ+14Ψ/N",
                                                               "16Ψ/N"]
    assert [formula_text(s, torch.float32) for s in (0, 1, 2, 3)] == ["16Ψ", "8Ψ+8Ψ/N",
                                                                      "4Ψ+12Ψ/N", "16Ψ/N"]
    assert zero_formula_bytes(1000, world_size=8, stage=2, dtype="bf16") == 2000 + 14000 // 8
    assert zero_formula_bytes(1000, world_size=4, stage=1, dtype="fp32") == 8000 + 8000 // 4
    # ZeRO-3: 2Ψ/N params + 2Ψ/N grads + 12Ψ/N state (mixed precision); (4+4+8)Ψ/N in fp32
    assert zero_formula_bytes(1000, world_size=8, stage=3, dtype="bf16") == 16000 // 8
    assert zero_formula_bytes(1000, world_size=3, stage=3, dtype="fp32") == -(-16000 // 3)
    assert formula_text(3, "bf16", "sgd") == "12Ψ/N"  # 2 + 2 + 4 momentum + 4 master


def test_presets_have_the_published_parameter_counts():
    assert sum(preset_numels("gpt2")) == 124_439_808
    assert sum(preset_numels("gpt2-medium")) == 354_823_168
    assert sum(preset_numels("gpt2-large")) == 774_030_080
    assert sum(preset_numels("gpt2-xl")) == 1_557_611_200
    assert sum(preset_numels("llama-7b-like")) == 6_738_415_616


def test_shapes_match_hugging_face_models():
    """Tensor by tensor, in registration order, against models built on the meta device."""
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=101, n_positions=32)
    llama = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2,
                                     vocab_size=101, tie_word_embeddings=True)
    with torch.device("meta"):
        hf_gpt2 = param_numels_of(transformers.GPT2LMHeadModel(gpt2))
        hf_llama = param_numels_of(transformers.LlamaForCausalLM(llama))
        hf_gpt2_units = param_units_of(transformers.GPT2LMHeadModel(gpt2))
        hf_llama_units = param_units_of(transformers.LlamaForCausalLM(llama))
        untied = transformers.LlamaConfig(**dict(llama.to_dict(), tie_word_embeddings=False))
        hf_untied_units = param_units_of(transformers.LlamaForCausalLM(untied))
    gpt2_shape = dict(n_layer=2, n_embd=48, vocab_size=101, n_positions=32)
    llama_shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=101,
                       tie_word_embeddings=True)
    assert gpt2_numels(**gpt2_shape) == hf_gpt2
    assert llama_numels(**llama_shape) == hf_llama
    # Stage 3's units, as the optimizer finds them in the real models: blocks 1, 2, root 0.
    assert gpt2_units(**gpt2_shape) == hf_gpt2_units
    assert llama_units(**llama_shape) == hf_llama_units
    assert llama_units(**dict(llama_shape, tie_word_embeddings=False)) == hf_untied_units
    assert set(hf_gpt2_units) == set(hf_llama_units) == {0, 1, 2}


def test_param_numels_of_counts_shared_and_trainable_once():
    lin = nn.Linear(3, 5)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    model = nn.ModuleList([lin, frozen, lin])
    assert param_numels_of(model) == [15, 5]


def test_units_of_models_and_presets():
    # UnitNet: codebook (root's own parameter) and the tied embedding/head in the root.
    net = make_unit_net()
    assert param_units_of(net) == [0, 0] + [1] * 4 + [2] * 4 + [3] * 4 + [0, 0]
    assert len(param_units_of(net)) == len(param_numels_of(net))
    for name, blocks in (("gpt2", 12), ("llama-7b-like", 32)):
        numels, units = preset_model(name)
        assert numels == preset_numels(name) and len(units) == len(numels)
        assert units[0] == 0 and units[-1] == 0 and max(units) == blocks
    numels, units = preset_model("gpt2")
    assert sorted(set(units)) == list(range(13))  # root + 12 blocks
    assert sum(n for n, u in zip(numels, units) if u == 0) == 50257 * 768 + 1024 * 768 + 2 * 768
    assert uniform_units(3 * 4096 * 4096) == [1, 2, 3]


def test_config_json_gpt2_and_llama(tmp_path):
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "n_layer": 12, "n_embd": 768,
                                "vocab_size": 50257, "n_positions": 1024, "n_head": 12}))
    family, numels = read_config_numels(str(gpt2))
    assert family == "gpt2" and numels == preset_numels("gpt2")
    assert read_config_model(str(gpt2)) == ("gpt2",) + preset_model("gpt2")
    # TinyLlama-1.1B: grouped-query attention (4 key-value heads), untied head.
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps({"model_type": "llama", "hidden_size": 2048,
                                 "intermediate_size": 5632, "num_hidden_layers": 22,
                                 "num_attention_heads": 32, "num_key_value_heads": 4,
                                 "vocab_size": 32000, "tie_word_embeddings": False}))
    family, numels = read_config_numels(str(llama))
    assert family == "llama" and sum(numels) == 1_100_048_384
    family, numels3, units = config_model(json.loads(llama.read_text()))
    assert numels3 == numels and max(units) == 22 and units.count(0) == 3  # embed, norm, head


def test_config_errors_name_the_missing_keys(tmp_path):
    with pytest.raises(ValueError, match="lacks intermediate_size, num_hidden_layers"):
        config_numels({"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10})
    with pytest.raises(ValueError, match="neither GPT-2 keys"):
        config_numels({"model_type": "t5"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        read_config_numels(str(bad))


def test_cli_prints_the_table_of_estimate_model_states():
    out = subprocess.run([sys.executable, "-m", "zeroshard.estimate", "--preset", "gpt2",
                          "--world-size", "2", "4", "--stage", "0", "1", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    numels = preset_numels("gpt2")
    for stage in (0, 1, 2):
        for world_size in (2, 4):
            report = estimate_model_states(numels, world_size=world_size, stage=stage,
                                           backend="nccl")
            row = next(line.split() for line in lines
                       if line.split()[:2] == [str(stage), str(world_size)])
            cells = " ".join(row)
            for key in MODEL_STATE_KEYS + ("comm_buffers", "total"):
                assert format_bytes(report[key]) in cells, (key, cells)
            assert formula_text(stage) in cells


def test_cli_device_memory_prints_the_largest_fit(capsys):
    assert estimate.main(["--preset", "gpt2", "--world-size", "8", "--stage", "2",
                          "--dtype", "bf16", "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("stage 2, N=8"))
    largest = int(line.split("(")[-1].rstrip(")").replace(",", ""))
    settings = dict(world_size=8, stage=2, dtype="bf16", backend="nccl")
    assert estimate_model_states(uniform_numels(largest), **settings)["total"] <= 80 * 10 ** 9
    assert estimate_model_states(uniform_numels(largest + 1), **settings)["total"] > 80 * 10 ** 9


@pytest.mark.parametrize("argv,message", [
    (["--params", "-5"], "at least 1"),
    (["--params", "lots"], "cannot read 'lots' as a parameter count"),
    (["--preset", "gpt5"], "invalid choice: 'gpt5'"),
    (["--preset", "gpt2", "--world-size", "0"], "a world size is a positive integer"),
    (["--preset", "gpt2", "--stage", "4"], "a stage is 0, 1, 2 or 3, got '4'"),
    (["--preset", "gpt2", "--prefetch", "2"], "--prefetch applies to stage 3 only"),
    (["--preset", "gpt2", "--stage", "3", "--prefetch", "-1"], "prefetch is a whole number"),
    (["--preset", "gpt2", "--device-memory", "80"], "cannot read '80' as an amount of memory"),
    (["--config", "/nonexistent/config.json"], "cannot read /nonexistent/config.json"),
    (["--world-size", "2"], "name a model"),
    (["--preset", "gpt2", "--frozen", "1B", "--no-partition-frozen"],
     "--no-partition-frozen applies to frozen parameters at stage 3"),
])
def test_cli_bad_input_exits_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        estimate.main(argv)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_cli_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "memory.png"
    assert estimate.main(["--preset", "gpt2", "--world-size", "1", "4", "--plot",
                          str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises
    assert estimate.main(["--preset", "gpt2", "--plot", str(tmp_path / "x.png")]) != 0
    assert "pip install matplotlib" in capsys.readouterr().err


# ---- stage 3 -----------------------------------------------------------------------------------
# examples/gpt.py's GPT (blocks in an nn.ModuleList, the head tied to the token embedding, so
# the root unit holds embeddings, final norm and head) at awkward sizes, and tests' UnitNet.
GPT_CONFIG = GPTConfig(vocab_size=37, block_size=16, n_layer=3, n_head=2, d_model=22,
                       default_seq_len=8)
# automatic (one bucket per unit), 71 fp32 elements (buckets cut every parameter), 0.001 MiB
CUTTING_BUCKET_MB = 71 * 4 / 2 ** 20
STAGE3_BUCKETS = (None, CUTTING_BUCKET_MB, 0.001)
ALL_KEYS = MODEL_STATE_KEYS + ("comm_buffers", "total")


def _stage3_model(kind, dtype_name):
    if kind == "gpt":
        return GPT(GPT_CONFIG).to(DTYPES[dtype_name])
    return make_unit_net(dtype=DTYPES[dtype_name])


def _stage3_train_and_report(kind, dtype_name, bucket_mb, prefetch=1, steps=3):
    """memory_report() after `steps` steps, the most model_params seen at any block's forward
    (the running unit and its prefetched ones gathered), and the units' full bytes."""
    model = _stage3_model(kind, dtype_name)
    opt = zeroshard.ZeroAdamW(model, stage=3, lr=1e-3, bucket_mb=bucket_mb, prefetch=prefetch)
    seen = []
    blocks = model.blocks
    for block in blocks:
        block.register_forward_pre_hook(
            lambda m, args: seen.append(opt.memory_report()["model_params"]))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    gen = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        opt.zero_grad()
        if kind == "gpt":
            tokens = torch.randint(0, GPT_CONFIG.vocab_size, (2, 9), generator=gen)
            loss = model(tokens[:, :-1], tokens[:, 1:])
        else:
            loss = model(torch.randint(0, VOCAB, (4,), generator=gen)).float().pow(2).mean()
        opt.backward(loss)
        opt.step()
    report = dict(opt.memory_report())
    report.pop("measured")
    report["forward_model_params"] = max(seen)
    report["unit_bytes"] = {u.index: u.full_nbytes for u in opt.units.units}
    return report


def _stage3_expected(kind, world_size, dtype_name, bucket_mb, prefetch=1, backend="gloo"):
    model = _stage3_model(kind, dtype_name)
    return estimate_model_states(param_numels_of(model), units=param_units_of(model),
                                 world_size=world_size, stage=3, dtype=dtype_name,
                                 bucket_mb=bucket_mb, prefetch=prefetch, backend=backend)


def _stage3_cases():
    return [("gpt", dtype, bucket) for dtype in DTYPES for bucket in STAGE3_BUCKETS] + [
        ("unitnet", dtype, bucket) for dtype in DTYPES
        for bucket in (None, TINY_BUCKET_MB, CUTTING_BUCKET_MB)]


def _stage3_reports_on_rank(rank, world_size):
    return {case: _stage3_train_and_report(*case) for case in _stage3_cases()}


@pytest.fixture(scope="module", params=[1, 2, 4])
def stage3_reports(request):
    world_size = request.param
    if world_size == 1:
        return world_size, [_stage3_reports_on_rank(0, 1)]
    return world_size, run_distributed(_stage3_reports_on_rank, world_size, timeout_s=300)


def _stage3_automatic_bucket(rank, world_size):
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=96,
                          default_seq_len=8))
    opt = zeroshard.ZeroAdamW(model, stage=3, lr=1e-3)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(rank))
    opt.backward(model(tokens[:, :-1], tokens[:, 1:]))
    opt.step()
    report = dict(opt.memory_report())
    block = sum(p.numel() for p in model.blocks[0].parameters())
    buckets = {u.name: [fg.layout.num_buckets for fg in u.groups] for u in opt.units.units}
    expected = estimate_model_states(param_numels_of(model), units=param_units_of(model),
                                     world_size=world_size, stage=3)
    return report, expected, opt.bucket_mb, block, buckets


def test_stage3_automatic_bucket_is_a_unit_in_the_optimizer_and_the_estimate():
    """Blocks of 0.42 MiB in a 0.9 MiB model (1/32 of it is under the 1/4 MiB floor): each
    block is one bucket, and the estimate follows to the byte."""
    for report, expected, bucket_mb, block, buckets in run_distributed(
            _stage3_automatic_bucket, 2, timeout_s=120):
        assert bucket_mb == block * 4 / 2 ** 20 > 0.25
        assert all(n == [1] for name, n in buckets.items() if name != "<root>"), buckets
        for key in ALL_KEYS:
            assert report[key] == expected[key], (key, report[key], expected[key])


def test_stage3_matches_memory_report_between_steps(stage3_reports):
    """Every key and the total to the byte, fp32 and bf16, at 1, 2 and 4 ranks."""
    world_size, per_rank = stage3_reports
    for rank, reports in enumerate(per_rank):
        for (kind, dtype_name, bucket_mb), report in reports.items():
            expected = _stage3_expected(kind, world_size, dtype_name, bucket_mb)
            where = f"{kind} rank {rank} {dtype_name} bucket_mb={bucket_mb} N={world_size}"
            for key in ALL_KEYS:
                assert report[key] == expected[key], \
                    f"{where} {key}: real {report[key]} B, estimated {expected[key]} B"
            assert report["units"]["gathered"] == 0, where  # nothing gathered between steps


def test_stage3_live_units_are_the_gathered_peak(stage3_reports):
    """The root plus the 1 + prefetch largest units, whole: what a block's forward sees."""
    world_size, per_rank = stage3_reports
    for rank, reports in enumerate(per_rank):
        for (kind, dtype_name, bucket_mb), report in reports.items():
            expected = _stage3_expected(kind, world_size, dtype_name, bucket_mb)
            units = report["unit_bytes"]
            largest = sorted((b for u, b in units.items() if u != 0), reverse=True)
            assert expected["live_units"] == units[0] + sum(largest[:2])
            assert expected["peak_total"] == expected["total"] + expected["live_units"]
            assert report["units"]["peak_gathered"] <= 2
            assert report["units"]["largest_unit_bytes"] == max(units.values())
            if kind == "gpt":  # equal blocks: the first block's forward reaches the bound
                assert report["forward_model_params"] == \
                    report["model_params"] + expected["live_units"], (kind, dtype_name)
            else:
                assert report["forward_model_params"] <= \
                    report["model_params"] + expected["live_units"]


def _stage3_prefetch_on_rank(rank, world_size):
    return {prefetch: _stage3_train_and_report("gpt", "bf16", None, prefetch=prefetch)
            for prefetch in (0, 2)}


def test_stage3_live_units_follow_prefetch():
    per_rank = run_distributed(_stage3_prefetch_on_rank, 2, timeout_s=180)
    for reports in per_rank:
        for prefetch, report in reports.items():
            expected = _stage3_expected("gpt", 2, "bf16", None, prefetch=prefetch)
            for key in ALL_KEYS:
                assert report[key] == expected[key], (prefetch, key)
            assert report["units"]["peak_gathered"] <= 1 + prefetch
            assert report["forward_model_params"] == \
                report["model_params"] + expected["live_units"], prefetch
    one = _stage3_expected("gpt", 2, "bf16", None, prefetch=1)
    none = _stage3_expected("gpt", 2, "bf16", None, prefetch=0)
    assert none["live_units"] < one["live_units"]


def test_stage3_keys_and_shards_of_a_preset():
    numels, units = preset_model("gpt2")
    stage2 = estimate_model_states(numels, world_size=8, stage=2, dtype="bf16")
    stage3 = estimate_model_states(numels, world_size=8, stage=3, dtype="bf16", units=units)
    assert set(stage3) == set(stage2) | {"live_units", "peak_total"}
    assert stage3["total"] == sum(stage3[k] for k in ALL_KEYS[:-1])
    # Only this rank's shard of the parameters; grads, master and state as at stage 2
    # (within the padding of 13 layouts instead of one).
    assert abs(stage3["model_params"] - stage2["model_params"] / 8) < 13 * 8 * 128
    for key in ("grads", "master_params", "optimizer_state"):
        assert abs(stage3[key] - stage2[key]) <= 13 * 8 * 128 * 8, key
    block = sum(n for n, u in zip(numels, units) if u == 1)
    root = sum(n for n, u in zip(numels, units) if u == 0)
    assert 2 * (root + 2 * block) <= stage3["live_units"] < 2 * (root + 2 * block) + 64 * 1024
    offloaded = estimate_model_states(numels, world_size=8, stage=3, dtype="bf16", units=units,
                                      offload="cpu")
    assert offloaded["peak_total"] == offloaded["total"] + offloaded["live_units"]
    assert offloaded["host_bytes"] == (stage3["master_params"] + stage3["optimizer_state"]
                                       + stage3["grads"] + offloaded["host"]["staging"])
    assert 0 < offloaded["host"]["staging"] < stage3["master_params"] // 8  # not a shard copy
    assert offloaded["total"] == (stage3["model_params"] + offloaded["comm_buffers"])


def _row(lines, stage, world_size):
    return " ".join(next(line.split() for line in lines
                         if line.split()[:2] == [str(stage), str(world_size)]))


def test_cli_stage3_prints_estimate_and_peak(capsys):
    assert estimate.main(["--preset", "gpt2", "--world-size", "2", "4", "--stage", "2", "3",
                          "--dtype", "bf16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    numels, units = preset_model("gpt2")
    for world_size in (2, 4):
        report = estimate_model_states(numels, world_size=world_size, stage=3, dtype="bf16",
                                       backend="nccl", units=units)
        cells = _row(lines, 3, world_size)
        for key in ALL_KEYS + ("live_units", "peak_total"):
            assert format_bytes(report[key]) in cells, (key, cells)
        assert "16Ψ/N" in cells
        assert " - " in _row(lines, 2, world_size)  # no live units at stage 2
    text = "\n".join(lines)
    assert "12 blocks" in text and "prefetch 1" in text


def test_cli_stage3_with_params_says_what_it_assumes(capsys):
    assert estimate.main(["--params", "1B", "--world-size", "8", "--stage", "3",
                          "--prefetch", "2"]) == 0
    out = capsys.readouterr().out
    assert "assumed to be a unit of its own" in out
    report = estimate_model_states(uniform_numels(10 ** 9), world_size=8, stage=3,
                                   units=uniform_units(10 ** 9), prefetch=2, backend="nccl")
    assert format_bytes(report["peak_total"]) in _row(out.splitlines(), 3, 8)
    # three whole units of one tensor each (fp32), padded to 8 shards of 128-byte pieces
    whole = 3 * 4 * max(uniform_numels(10 ** 9))
    assert whole <= report["live_units"] < whole + 3 * 8 * 128 * 4


def test_cli_stage3_device_memory_fits_the_peak(capsys):
    assert estimate.main(["--world-size", "8", "--stage", "3", "--dtype", "bf16",
                          "--device-memory", "2GB"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("stage 3, N=8"))
    largest = int(line.split("(")[-1].rstrip(")").replace(",", ""))

    def peak(n):
        return estimate_model_states(uniform_numels(n), units=uniform_units(n), world_size=8,
                                     stage=3, dtype="bf16", backend="nccl")["peak_total"]
    assert peak(largest) <= 2 * 10 ** 9 < peak(largest + 1)
    # More than one device's worth of parameters fits at 8 ranks (16 B per parameter / 8)
    assert largest > 2 * 10 ** 9 / 16


def test_cli_plot_stage3(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "memory3.png"
    assert estimate.main(["--preset", "gpt2", "--world-size", "4", "--stage", "2", "3",
                          "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
