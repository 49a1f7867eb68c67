"""`zeroshard.estimate` against the real optimizers' memory_report(), ZeRO's closed forms, known
model sizes, config.json parsing and its command line."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import zeroshard
from dist_harness import run_distributed
from zeroshard import estimate
from zeroshard.estimate import (estimate_model_states, format_bytes, formula_text,
                                param_numels_of, zero_formula_bytes)
from zeroshard.model_shapes import (config_numels, gpt2_numels, llama_numels, preset_numels,
                                    read_config_numels, uniform_numels)

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
                           "comm_buffers", "total", "host_bytes"}
    assert report["total"] == sum(report[k] for k in MODEL_STATE_KEYS + ("comm_buffers",))
    assert report["host_bytes"] == 0
    offloaded = estimate_model_states(numels, world_size=4, stage=2, dtype=torch.bfloat16,
                                      offload="cpu")
    assert offloaded["host_bytes"] == report["master_params"] + report["optimizer_state"]
    assert offloaded["total"] == report["total"] - offloaded["host_bytes"]
    assert offloaded["optimizer_state"] == report["optimizer_state"]


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="stage 3 is not built yet"):
        estimate_model_states([10], world_size=2, stage=3)
    with pytest.raises(ValueError, match="stage 3 is not built yet"):
        zero_formula_bytes(10, world_size=2, stage=3)
    with pytest.raises(ValueError, match="world_size"):
        estimate_model_states([10], world_size=0, stage=1)
    with pytest.raises(ValueError, match="non-negative integers"):
        estimate_model_states([10, -1], world_size=2, stage=1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        estimate_model_states([10], world_size=2, stage=1, dtype="int8")
    with pytest.raises(ValueError, match="unknown preset"):
        preset_numels("gpt5")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 8, 64])
def test_estimate_follows_zero_formula_for_a_large_model(dtype, stage, world_size):
    num_params = 10 ** 9
    # The paper keeps gradients in the parameters' precision: reduce in that dtype to compare.
    report = estimate_model_states(uniform_numels(num_params), world_size=world_size,
                                   stage=stage, dtype=dtype, reduce_dtype=dtype)
    # Stage 1's reduced shard lives inside its full local buffer: one full buffer, as the
    # paper counts.
    model_states = sum(report[k] for k in MODEL_STATE_KEYS)
    formula = zero_formula_bytes(num_params, world_size=world_size, stage=stage, dtype=dtype)
    assert abs(model_states - formula) <= 0.01 * formula, (model_states, formula)


def test_formula_text_and_values():
    assert [formula_text(s, "bf16") for s in (0, 1, 2)] == ["16Ψ", "4Ψ+12Ψ/N", "2Ψ+14Ψ/N"]
    assert [formula_text(s, torch.float32) for s in (0, 1, 2)] == ["16Ψ", "8Ψ+8Ψ/N", "4Ψ+12Ψ/N"]
    assert zero_formula_bytes(1000, world_size=8, stage=2, dtype="bf16") == 2000 + 14000 // 8
    assert zero_formula_bytes(1000, world_size=4, stage=1, dtype="fp32") == 8000 + 8000 // 4


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
    assert gpt2_numels(n_layer=2, n_embd=48, vocab_size=101, n_positions=32) == hf_gpt2
    assert llama_numels(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, vocab_size=101,
                        tie_word_embeddings=True) == hf_llama


def test_param_numels_of_counts_shared_and_trainable_once():
    lin = nn.Linear(3, 5)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    model = nn.ModuleList([lin, frozen, lin])
    assert param_numels_of(model) == [15, 5]


def test_config_json_gpt2_and_llama(tmp_path):
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "n_layer": 12, "n_embd": 768,
                                "vocab_size": 50257, "n_positions": 1024, "n_head": 12}))
    family, numels = read_config_numels(str(gpt2))
    assert family == "gpt2" and numels == preset_numels("gpt2")
    # TinyLlama-1.1B: grouped-query attention (4 key-value heads), untied head.
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps({"model_type": "llama", "hidden_size": 2048,
                                 "intermediate_size": 5632, "num_hidden_layers": 22,
                                 "num_attention_heads": 32, "num_key_value_heads": 4,
                                 "vocab_size": 32000, "tie_word_embeddings": False}))
    family, numels = read_config_numels(str(llama))
    assert family == "llama" and sum(numels) == 1_100_048_384


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
    (["--preset", "gpt2", "--stage", "3"], "stage 3 is not built yet"),
    (["--preset", "gpt2", "--device-memory", "80"], "cannot read '80' as an amount of memory"),
    (["--config", "/nonexistent/config.json"], "cannot read /nonexistent/config.json"),
    (["--world-size", "2"], "name a model"),
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
