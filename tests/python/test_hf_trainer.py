"""zeroshard under the Hugging Face Trainer, on 2 gloo ranks: ZeroTrainer trains like the
Trainer's own AdamW (the oracle: transformers.Trainer, torch.optim.AdamW, accelerate's DDP) at
stages 0, 1 and 2, and the plain `optimizers=(ZeroAdamW(...), None)` path stops with an error
that points at ZeroTrainer.

Checked against the oracle, same model init, data and seed: every logged loss and grad_norm
(rtol 1e-5) with max_grad_norm small enough that every step clips, gradient_accumulation_steps=2
with no gradient reduction on the non-final micro-steps (counted by opt.comm_stats()), the
final weights. Also: ZeroTrainer given an optimizer built before the Trainer moved the model;
a checkpoint saved through the Trainer at step 3 and resumed with resume_from_checkpoint ends at
the uninterrupted run's weights, and a plain Trainer's checkpoint (optimizer.pt) resumes too.

Importing transformers costs each rank ~8 s of CPU, so one distributed session trains every
run once (module fixture) and the tests check its parts. A part that raises is recorded with
its traceback and the session goes on; the tests of that part fail with it.
"""
import contextlib
import os
import subprocess
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a tiny model built locally: never the network

import pytest  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402

import zeroshard  # noqa: E402
from dist_harness import run_distributed  # noqa: E402
from framework_runs import assert_same_weights as _assert_same_weights  # noqa: E402
from framework_runs import ok_results as _ok  # noqa: E402
from zeroshard.integrations.transformers import OPTIMIZER_SHARDS_DIR, ZeroTrainer  # noqa: E402

WORLD_SIZE = 2
STEPS = 6
SAVE_AT = 3
GRAD_ACCUM = 2
PER_DEVICE_BATCH = 4
SEQ_LEN = 16
MAX_GRAD_NORM = 0.05  # below every step's gradient norm here: clipping is active throughout
STAGES = (0, 1, 2, 3)
HYBRID = {"shard_size": "node", "node_size": 1}
ZERO_PP = {"node_size": 1, "secondary_shard": "node", "quantize_weights": "int8",
           "quantize_grads": "int8"}
SAMPLES = STEPS * GRAD_ACCUM * PER_DEVICE_BATCH * WORLD_SIZE  # one epoch is the whole run


# ---- what every rank runs -----------------------------------------------------------------------

def _join_trainer_env(rank: int, world_size: int) -> None:
    """What accelerate reads to join the harness's already-initialised gloo group on CPU."""
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _tiny_gpt2():
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=101,
                                     n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)  # every rank and every run starts from the same weights
    return transformers.GPT2LMHeadModel(config)


class _Sequences(torch.utils.data.Dataset):
    """Arithmetic sequences mod the vocabulary (learnable), fixed by a seeded generator."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(1234)
        start = torch.randint(0, 101, (n, 1), generator=g)
        stride = torch.randint(1, 7, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ_LEN)) % 101

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _training_args(output_dir: str, save: bool):
    return transformers.TrainingArguments(
        output_dir=output_dir, use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
        dataloader_num_workers=0, per_device_train_batch_size=PER_DEVICE_BATCH,
        gradient_accumulation_steps=GRAD_ACCUM, max_steps=STEPS, learning_rate=1e-2,
        weight_decay=0.1, max_grad_norm=MAX_GRAD_NORM, logging_steps=1,
        save_strategy="steps" if save else "no", save_steps=SAVE_AT, save_only_model=False)


class _ReductionCounter(transformers.TrainerCallback):
    """Gradient-reduction collectives (all_reduce, reduce_scatter) per micro-step, from the
    zeroshard optimizer's comm_stats(): non-final micro-steps end at on_substep_end, the final
    one's reduction is done by on_optimizer_step."""

    def __init__(self) -> None:
        self.trainer = None
        self.non_final, self.final = [], []
        self._seen = 0

    def _delta(self) -> int:
        stats = self.trainer.zero_optimizer.comm_stats()
        calls = stats["all_reduce"]["calls"] + stats["reduce_scatter"]["calls"]
        delta, self._seen = calls - self._seen, calls
        return delta

    def on_step_begin(self, args, state, control, **kwargs):
        self._delta()  # whatever ran between steps is not a micro-step's

    def on_substep_end(self, args, state, control, **kwargs):
        self.non_final.append(self._delta())

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.final.append(self._delta())


def _logged(trainer):
    history = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    return {"steps": [h["step"] for h in history], "loss": [h["loss"] for h in history],
            "grad_norm": [float(h["grad_norm"]) for h in history]}


def _weights(model, trainer=None):
    """Whole weights (a stage-3 ZeroTrainer holds them whole only inside full_params)."""
    optimizer = trainer.zero_optimizer if isinstance(trainer, ZeroTrainer) else None
    with (optimizer.full_params() if optimizer is not None else contextlib.nullcontext()):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def _oracle_run(tmp):
    model = _tiny_gpt2()
    trainer = transformers.Trainer(model=model, args=_training_args(tmp, save=True),
                                   train_dataset=_Sequences(SAMPLES))
    trainer.train()
    return {**_logged(trainer), "weights": _weights(model),
            "wrapped_in_ddp": isinstance(trainer.model_wrapped,
                                         torch.nn.parallel.DistributedDataParallel)}


def _zero_run(tmp, stage, offload=None, options=None):
    model = _tiny_gpt2()
    counter = _ReductionCounter()
    trainer = ZeroTrainer(model=model, args=_training_args(tmp, save=True),
                          train_dataset=_Sequences(SAMPLES), callbacks=[counter],
                          zero_stage=stage, zero_kwargs={"timeout_s": 60, "offload": offload,
                                                         **(options or {})})
    counter.trainer = trainer
    trainer.train()
    return {**_logged(trainer), "weights": _weights(model, trainer),
            "non_final_reductions": counter.non_final, "final_reductions": counter.final,
            "optimizer": type(trainer.zero_optimizer).__name__,
            "stage": trainer.zero_optimizer.stage,
            "wrapped_in_ddp": isinstance(trainer.model_wrapped,
                                         torch.nn.parallel.DistributedDataParallel)}


def _given_optimizer_run(tmp):
    """ZeroTrainer with an optimizer the script built before the Trainer existed: the
    Trainer's model.to(args.device) then replaces the parameters' storage under it."""
    model = _tiny_gpt2()
    # The Trainer's own grouping (the method reads only its model argument).
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay],
               "weight_decay": 0.1},
              {"params": [p for n, p in model.named_parameters() if n not in decay],
               "weight_decay": 0.0}]
    opt = zeroshard.ZeroAdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, stage=2,
                              timeout_s=60)
    trainer = ZeroTrainer(model=model, args=_training_args(tmp, save=False),
                          train_dataset=_Sequences(SAMPLES), optimizers=(opt, None))
    trainer.train()
    return {**_logged(trainer), "weights": _weights(model)}


def _resumed_run(tmp, checkpoint, stage, offload=None, options=None):
    model = _tiny_gpt2()  # fresh weights: the checkpoint must bring back everything
    trainer = ZeroTrainer(model=model, args=_training_args(tmp, save=False),
                          train_dataset=_Sequences(SAMPLES), zero_stage=stage,
                          zero_kwargs={"timeout_s": 60, "offload": offload, **(options or {})})
    trainer.train(resume_from_checkpoint=checkpoint)
    return {**_logged(trainer), "weights": _weights(model, trainer),
            "checkpoint_files": sorted(os.listdir(checkpoint))}


def _plain_trainer_run(tmp):
    """The path ZeroTrainer replaces: a zeroshard optimizer handed to the plain Trainer, which
    then wraps the model in DDP itself."""
    model = _tiny_gpt2()
    opt = zeroshard.ZeroAdamW(model.parameters(), lr=1e-2, stage=2, timeout_s=60)
    trainer = transformers.Trainer(model=model, args=_training_args(tmp, save=False),
                                   train_dataset=_Sequences(SAMPLES), optimizers=(opt, None))
    trainer.train()
    return {"trained": True}


def _part(results, name, fn, *args):
    try:
        results[name] = {"ok": fn(*args)}
    except Exception:  # noqa: BLE001 - recorded for the test of this part; the session goes on
        results[name] = {"error": traceback.format_exc()}


def _all_runs(rank, world_size, tmp):
    _join_trainer_env(rank, world_size)
    results = {}
    _part(results, "oracle", _oracle_run, os.path.join(tmp, "oracle"))
    _part(results, "from_oracle", _resumed_run, os.path.join(tmp, "from_oracle"),
          os.path.join(tmp, "oracle", f"checkpoint-{SAVE_AT}"), 2)
    for stage in STAGES:
        out = os.path.join(tmp, f"zero{stage}")
        _part(results, f"zero{stage}", _zero_run, out, stage)
        checkpoint = os.path.join(out, f"checkpoint-{SAVE_AT}")
        _part(results, f"resumed{stage}", _resumed_run, os.path.join(tmp, f"resumed{stage}"),
              checkpoint, stage)
    # offload="cpu" through zero_kwargs; resumed from the non-offloaded stage-2 checkpoint.
    _part(results, "offload2", _zero_run, os.path.join(tmp, "offload2"), 2, "cpu")
    _part(results, "resumed_offload2", _resumed_run, os.path.join(tmp, "resumed_offload2"),
          os.path.join(tmp, "zero2", f"checkpoint-{SAVE_AT}"), 2, "cpu")
    # Many machines' options through zero_kwargs, 2 ranks as 2 nodes of 1: hybrid sharding
    # (exact; its checkpoint resumes) and ZeRO++ (quantized).
    _part(results, "hybrid3", _zero_run, os.path.join(tmp, "hybrid3"), 3, None, HYBRID)
    _part(results, "resumed_hybrid3", _resumed_run, os.path.join(tmp, "resumed_hybrid3"),
          os.path.join(tmp, "hybrid3", f"checkpoint-{SAVE_AT}"), 3, None, HYBRID)
    _part(results, "zeropp3", _zero_run, os.path.join(tmp, "zeropp3"), 3, None, ZERO_PP)
    _part(results, "given", _given_optimizer_run, os.path.join(tmp, "given"))
    # Last: it leaves a DDP-wrapped model behind.
    _part(results, "plain", _plain_trainer_run, os.path.join(tmp, "plain"))
    return results


# ---- the checks ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every rank's results of every part."""
    tmp = str(tmp_path_factory.mktemp("hf_trainer"))
    return run_distributed(_all_runs, WORLD_SIZE, tmp, timeout_s=420)


def test_oracle_is_the_trainers_own_adamw_under_ddp(runs):
    oracle = _ok(runs, "oracle")
    assert all(o["wrapped_in_ddp"] for o in oracle)
    assert oracle[0]["steps"] == list(range(1, STEPS + 1))
    # Every step clips, so the comparisons below check clipping, not only the norm.
    assert min(oracle[0]["grad_norm"]) > MAX_GRAD_NORM, oracle[0]["grad_norm"]
    assert oracle[0]["loss"][-1] < oracle[0]["loss"][0], oracle[0]["loss"]


@pytest.mark.parametrize("stage", STAGES)
def test_zero_trainer_matches_trainer_adamw(runs, stage):
    oracle = _ok(runs, "oracle")[0]
    zero = _ok(runs, f"zero{stage}")
    assert [z["optimizer"] for z in zero] == ["ZeroAdamW"] * WORLD_SIZE
    assert [z["stage"] for z in zero] == [stage] * WORLD_SIZE
    assert not any(z["wrapped_in_ddp"] for z in zero), "ZeroTrainer let accelerate wrap in DDP"
    assert zero[0]["steps"] == oracle["steps"]
    torch.testing.assert_close(zero[0]["loss"], oracle["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(zero[0]["grad_norm"], oracle["grad_norm"], rtol=1e-5, atol=0)
    _assert_same_weights(zero[0]["weights"], oracle["weights"], f"stage {stage} vs AdamW",
                         rtol=1e-4, atol=1e-5)
    _assert_same_weights(zero[1]["weights"], zero[0]["weights"], "rank 1 vs rank 0",
                         rtol=0, atol=0)


def test_zero_trainer_with_cpu_offload_trains_what_stage2_trains(runs):
    """zero_kwargs={"offload": "cpu"}: the same losses, norms and weights as stage 2 without
    it (bitwise: the same CPU kernels on the same values), and a non-offloaded checkpoint
    resumes into an offloaded run like the uninterrupted stage-2 run."""
    zero2, offload = _ok(runs, "zero2"), _ok(runs, "offload2")
    resumed = _ok(runs, "resumed_offload2")
    assert offload[0]["loss"] == zero2[0]["loss"] and resumed[0]["loss"] == zero2[0]["loss"]
    assert offload[0]["grad_norm"] == zero2[0]["grad_norm"]
    for rank in range(WORLD_SIZE):
        for run, what in ((offload, "offloaded"), (resumed, "resumed offloaded")):
            _assert_same_weights(run[rank]["weights"], zero2[rank]["weights"],
                                 f"rank {rank}: {what} vs stage 2", rtol=0, atol=0)


def test_zero_trainer_with_hybrid_sharding_matches_and_resumes(runs):
    """zero_kwargs={"shard_size": "node"} (2 replicas of 1 rank): the Trainer's AdamW's numbers,
    as stage 3 gives them, and its checkpoint resumes to the uninterrupted run's weights."""
    oracle = _ok(runs, "oracle")[0]
    hybrid, resumed = _ok(runs, "hybrid3"), _ok(runs, "resumed_hybrid3")
    assert hybrid[0]["final_reductions"] and hybrid[0]["stage"] == 3
    torch.testing.assert_close(hybrid[0]["loss"], oracle["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(hybrid[0]["grad_norm"], oracle["grad_norm"], rtol=1e-5, atol=0)
    _assert_same_weights(hybrid[0]["weights"], oracle["weights"], "hybrid vs AdamW",
                         rtol=1e-4, atol=1e-5)
    assert OPTIMIZER_SHARDS_DIR in resumed[0]["checkpoint_files"]
    torch.testing.assert_close(resumed[0]["loss"], hybrid[0]["loss"], rtol=1e-6, atol=0)
    for rank in range(WORLD_SIZE):
        _assert_same_weights(resumed[rank]["weights"], hybrid[rank]["weights"],
                             f"rank {rank}: hybrid resumed vs uninterrupted", rtol=0, atol=0)


def test_zero_trainer_with_zero_plus_plus_trains(runs):
    """hpZ + qwZ + qgZ(int8) through zero_kwargs: quantized, so not the oracle's numbers, but
    every logged loss within 2% of them, and the ranks agree on the weights."""
    oracle = _ok(runs, "oracle")[0]
    zeropp = _ok(runs, "zeropp3")
    assert zeropp[0]["loss"] != oracle["loss"]
    torch.testing.assert_close(zeropp[0]["loss"], oracle["loss"], rtol=2e-2, atol=0)
    _assert_same_weights(zeropp[1]["weights"], zeropp[0]["weights"], "rank 1 vs rank 0",
                         rtol=0, atol=0)


def test_zero_trainer_with_an_optimizer_built_before_the_trainer(runs):
    oracle = _ok(runs, "oracle")[0]
    given = _ok(runs, "given")
    torch.testing.assert_close(given[0]["loss"], oracle["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(given[0]["grad_norm"], oracle["grad_norm"], rtol=1e-5, atol=0)
    _assert_same_weights(given[0]["weights"], oracle["weights"], "given optimizer vs AdamW",
                         rtol=1e-4, atol=1e-5)
    _assert_same_weights(given[1]["weights"], given[0]["weights"], "rank 1 vs rank 0",
                         rtol=0, atol=0)


@pytest.mark.parametrize("stage", STAGES)
def test_gradient_accumulation_reduces_only_on_the_final_micro_step(runs, stage):
    for rank, zero in enumerate(_ok(runs, f"zero{stage}")):
        assert zero["non_final_reductions"] == [0] * (STEPS * (GRAD_ACCUM - 1)), \
            f"rank {rank}: gradient reductions on non-final micro-steps"
        assert len(zero["final_reductions"]) == STEPS
        assert all(n > 0 for n in zero["final_reductions"]), \
            f"rank {rank}: an optimizer step without a gradient reduction"


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_resume_continues_like_the_uninterrupted_run(runs, stage):
    uninterrupted = _ok(runs, f"zero{stage}")
    resumed = _ok(runs, f"resumed{stage}")
    assert OPTIMIZER_SHARDS_DIR in resumed[0]["checkpoint_files"], resumed[0]["checkpoint_files"]
    # The resumed log_history starts with the checkpoint's (steps 1..SAVE_AT) as saved.
    assert resumed[0]["steps"] == uninterrupted[0]["steps"] == list(range(1, STEPS + 1))
    torch.testing.assert_close(resumed[0]["loss"], uninterrupted[0]["loss"], rtol=1e-6, atol=0)
    torch.testing.assert_close(resumed[0]["grad_norm"], uninterrupted[0]["grad_norm"],
                               rtol=1e-6, atol=0)
    for rank in range(WORLD_SIZE):
        _assert_same_weights(resumed[rank]["weights"], uninterrupted[rank]["weights"],
                             f"stage {stage} rank {rank}: resumed vs uninterrupted",
                             rtol=0, atol=0)


def test_zero_trainer_resumes_from_a_plain_trainer_checkpoint(runs):
    """The Trainer's optimizer.pt (torch.optim.AdamW's state, saved by rank 0) loads into the
    sharded optimizer on every rank, and training goes on as the Trainer's own would."""
    oracle = _ok(runs, "oracle")
    resumed = _ok(runs, "from_oracle")
    assert "optimizer.pt" in resumed[0]["checkpoint_files"], resumed[0]["checkpoint_files"]
    torch.testing.assert_close(resumed[0]["loss"], oracle[0]["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(resumed[0]["grad_norm"], oracle[0]["grad_norm"], rtol=1e-5, atol=0)
    for rank in range(WORLD_SIZE):
        _assert_same_weights(resumed[rank]["weights"], oracle[rank]["weights"],
                             f"rank {rank}: resumed from the Trainer's checkpoint vs the Trainer",
                             rtol=1e-4, atol=1e-5)


def test_plain_trainer_with_zero_optimizer_points_at_zero_trainer(runs):
    for rank, res in enumerate(runs):
        error = res["plain"].get("error")
        assert error is not None, f"rank {rank}: the plain Trainer trained under DDP unnoticed"
        last_line = error.strip().splitlines()[-1]
        assert last_line.startswith("ValueError"), error
        assert "DistributedDataParallel" in error and \
            "zeroshard.integrations.transformers.ZeroTrainer" in error, error


# ---- single-process checks (no ranks needed) ----------------------------------------------------

def _single_process_args(tmp_path):
    return transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                          disable_tqdm=True)


def test_zero_trainer_refuses_a_torch_optimizer(tmp_path):
    model = _tiny_gpt2()
    with pytest.raises(TypeError, match="zeroshard optimizer"):
        ZeroTrainer(model=model, args=_single_process_args(tmp_path),
                    optimizers=(torch.optim.AdamW(model.parameters()), None))


def test_zero_trainer_refuses_hyperparameters_outside_training_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"learning_rate"):
        ZeroTrainer(model=_tiny_gpt2(), args=_single_process_args(tmp_path),
                    zero_kwargs={"lr": 1e-3})
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3"):
        ZeroTrainer(model=_tiny_gpt2(), args=_single_process_args(tmp_path), zero_stage=4)


def test_importing_zeroshard_does_not_import_transformers():
    root = os.path.dirname(os.path.dirname(os.path.abspath(zeroshard.__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    code = ("import sys, zeroshard, zeroshard.integrations; "
            "assert 'transformers' not in sys.modules, 'import zeroshard imported transformers'")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_zero_trainer_without_torchrun_matches_trainer(tmp_path):
    """`python train.py` (one process, no process group) trains like the Trainer too."""
    args = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
                per_device_train_batch_size=PER_DEVICE_BATCH,
                gradient_accumulation_steps=GRAD_ACCUM, max_steps=3, learning_rate=1e-2,
                max_grad_norm=MAX_GRAD_NORM, logging_steps=1, save_strategy="no")
    logged = []
    for trainer_class in (transformers.Trainer, ZeroTrainer):
        trainer = trainer_class(model=_tiny_gpt2(), args=transformers.TrainingArguments(**args),
                                train_dataset=_Sequences(SAMPLES))
        trainer.train()
        logged.append(_logged(trainer))
    assert logged[1]["steps"] == logged[0]["steps"] == [1, 2, 3]
    torch.testing.assert_close(logged[1]["loss"], logged[0]["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(logged[1]["grad_norm"], logged[0]["grad_norm"], rtol=1e-5, atol=0)
