"""zeroshard under PyTorch Lightning: ZeroStrategy with zeroshard.ZeroAdamW trains like the stock
`strategy="ddp"` with torch.optim.AdamW (the oracle), written as the user's own script.

Checked against the oracle, same model init, data, sampler and seed, on 2 gloo ranks (stage 3
also on 3): every micro-batch's loss and the final weights (rtol 1e-5) at stage 2, stage 3 and
stage 2 with offload="cpu", with gradient_clip_val small enough that every step clips (through
the optimizer's clip_grad_norm_, counted) and accumulate_grad_batches=2 with no reduce-scatter
on the non-final micro-batches (opt.comm_stats()); evaluation inside and after fit, also from a
checkpoint file. precision="16-true" (fp16 parameters, zeroshard's loss scaler) against the
same training written without Lightning. Checkpoints: ModelCheckpoint's file holds whole
weights and only a marker for the optimizer, every rank's shard sits in `<file>.zeroshard/`
(removed with its file); fit(ckpt_path=...) from ModelCheckpoint's epoch-0 file or from
trainer.save_checkpoint after a 1-epoch fit ends at the uninterrupted run's weights, bitwise
(stages 2 and 3), and a strategy="ddp" checkpoint resumes too. Errors: a torch.optim optimizer
under ZeroStrategy, clipping by value, DDP wrapper arguments.

Lightning joins the harness's ranks as it joins torchrun's (the torchelastic variables), so it
launches nothing. Importing Lightning costs each rank seconds of CPU, so one distributed session
per world size trains every run once (module fixtures) and the tests check its parts. A part
that raises is recorded with its traceback and the session goes on; its tests fail with it.
"""
import contextlib
import os
import shutil
import subprocess
import sys
import traceback
import warnings

import pytest

pl = pytest.importorskip("pytorch_lightning")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import zeroshard  # noqa: E402
from dist_harness import run_distributed  # noqa: E402
from framework_runs import assert_same_weights as _assert_same_weights  # noqa: E402
from framework_runs import ok_results as _ok  # noqa: E402
from zeroshard.checkpoint.format import read_metadata  # noqa: E402
from zeroshard.integrations.lightning import SHARDS_SUFFIX, ZeroStrategy  # noqa: E402

WORLD_SIZE = 2
EPOCHS = 2
STEPS_PER_EPOCH = 3
GRAD_ACCUM = 2
BATCH = 4  # per rank and micro-batch
IN, HIDDEN, OUT = 5, 13, 3  # awkward sizes: parameters straddle shard boundaries
LR = 1e-2
CLIP = 0.05  # below every step's gradient norm here: clipping is active throughout
MICRO_BATCHES = EPOCHS * STEPS_PER_EPOCH * GRAD_ACCUM  # per rank, the whole run


HYBRID = {"shard_size": "node", "node_size": 1}
ZERO_PP = {"node_size": 1, "secondary_shard": "node", "quantize_weights": "int8",
           "quantize_grads": "int8"}

# ---- the user's script --------------------------------------------------------------------------

class Net(pl.LightningModule):
    """A few Linear layers, the blocks in an nn.ModuleList (stage 3's units). stage=None: the
    stock torch.optim.AdamW."""

    def __init__(self, stage=None, offload=None, seed=0, options=None):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = torch.nn.Linear(IN, HIDDEN)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh()) for _ in range(2))
        self.head = torch.nn.Linear(HIDDEN, OUT)
        self.stage, self.offload, self.options = stage, offload, options or {}
        self.losses, self.batches, self.clip_calls = [], [], 0

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.losses.append(loss.item())
        self.batches.append((x, y))  # what Lightning fed this rank, for a replay without it
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        hyper = dict(lr=LR, betas=(0.9, 0.99), weight_decay=0.1)
        if self.stage is None:
            opt = torch.optim.AdamW(self.parameters(), **hyper)
        else:
            opt = zeroshard.ZeroAdamW(self if self.stage == 3 else self.parameters(),
                                      stage=self.stage, offload=self.offload, timeout_s=60,
                                      **hyper, **self.options)
            clip = opt.clip_grad_norm_

            def counted_clip(*args, **kwargs):  # is gradient_clip_val routed here?
                self.clip_calls += 1
                return clip(*args, **kwargs)
            opt.clip_grad_norm_ = counted_clip
        # A schedule whose state must come back on resume.
        return {"optimizer": opt,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}


class TorchAdamWUnderZeroStrategy(Net):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=LR)


class Data(pl.LightningDataModule):
    """Fixed regression data, shuffled per epoch by Lightning's DistributedSampler."""

    def __init__(self, world_size):
        super().__init__()
        n = STEPS_PER_EPOCH * GRAD_ACCUM * BATCH * world_size
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, IN, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(IN, OUT, generator=g))  # learnable

    def _loader(self, shuffle):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y),
                                           batch_size=BATCH, shuffle=shuffle)

    def train_dataloader(self):
        return self._loader(shuffle=True)

    def val_dataloader(self):
        return self._loader(shuffle=False)


class ReductionCounter(pl.Callback):
    """reduce_scatter calls per micro-batch, from the zeroshard optimizer's comm_stats(); the
    optimizer's stage, and whether the parameters are sharded between steps."""

    def __init__(self):
        self.non_final, self.final = [], []
        self._start = 0
        self.stage, self.sharded = None, []

    @staticmethod
    def _calls(trainer):
        return trainer.strategy.zero_optimizer.comm_stats()["reduce_scatter"]["calls"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = self._calls(trainer)
        self.stage = trainer.strategy.zero_optimizer.stage
        self.sharded.append(all(isinstance(p, zeroshard.ShardedParameter)
                                for p in pl_module.parameters()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        delta = self._calls(trainer) - self._start
        (self.final if (batch_idx + 1) % GRAD_ACCUM == 0 else self.non_final).append(delta)


class GradNorms(pl.Callback):
    """The oracle's whole gradient norm before each step (DDP has averaged the gradients)."""

    def __init__(self):
        self.norms, self.wrapped_in_ddp = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.wrapped_in_ddp.append(isinstance(trainer.strategy.model,
                                              torch.nn.parallel.DistributedDataParallel))
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))


# ---- what every rank runs -----------------------------------------------------------------------

def _join_lightning_env(rank, world_size):
    """What Lightning reads to join the harness's already-initialised gloo group, as under
    torchrun: it then launches no processes and initialises no group of its own."""
    os.environ.update(TORCHELASTIC_RUN_ID="zeroshard-test", LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    warnings.filterwarnings("ignore")  # Lightning's advice on num_workers, logging...


def _trainer(strategy, world_size, root, epochs=EPOCHS, callbacks=(), clip_algorithm=None,
             precision="32-true"):
    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=world_size,
                      precision=precision,
                      max_epochs=epochs, gradient_clip_val=CLIP,
                      gradient_clip_algorithm=clip_algorithm,
                      accumulate_grad_batches=GRAD_ACCUM, callbacks=list(callbacks),
                      default_root_dir=root, logger=False, enable_progress_bar=False,
                      # Evaluation inside fit too: at stage 3 a forward is a collective.
                      num_sanity_val_steps=1, limit_val_batches=2, check_val_every_n_epoch=1,
                      enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint)
                                               for c in callbacks))


def _checkpointing(root, folder="ckpts", **kwargs):
    """Every epoch's checkpoint; or, with save_top_k=1, only the newest (monitor="epoch")."""
    return pl.callbacks.ModelCheckpoint(dirpath=os.path.join(root, folder), filename="{epoch}",
                                        every_n_epochs=1, save_on_train_epoch_end=True,
                                        **{"save_top_k": -1, **kwargs})


def _weights(module):
    """Whole weights (a stage-3 module holds them whole only inside full_params)."""
    with zeroshard.full_params(module):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def _fit(module, strategy, world_size, root, ckpt_path=None, epochs=EPOCHS, callbacks=()):
    data = Data(world_size)
    trainer = _trainer(strategy, world_size, root, epochs, callbacks)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    out = {"losses": list(module.losses), "weights": _weights(module),
           "global_step": trainer.global_step,
           "lr": trainer.lr_scheduler_configs[0].scheduler.get_last_lr()}
    # Evaluation after fit: at stage 3 the module is still sharded, gathered unit by unit.
    out["val_loss"] = trainer.validate(module, data, verbose=False)[0]["val_loss"]
    return trainer, out


def _validate_epoch0(trainer, module, world_size, root):
    """trainer.validate(ckpt_path=...): Lightning's whole weights, loaded without an optimizer
    (at stage 3 into the sharded module)."""
    path = os.path.join(root, "ckpts", "epoch=0.ckpt")
    return trainer.validate(module, Data(world_size), ckpt_path=path, verbose=False)[0]["val_loss"]


def _oracle_run(world_size, root):
    norms, module = GradNorms(), Net()
    trainer, out = _fit(module, "ddp", world_size, root, callbacks=[norms, _checkpointing(root)])
    out["val_loss_epoch0"] = _validate_epoch0(trainer, module, world_size, root)
    return {**out, "grad_norms": norms.norms, "wrapped_in_ddp": all(norms.wrapped_in_ddp)}


def _zero_run(world_size, root, stage, offload=None, save_after_epoch_0=False, options=None):
    counter = ReductionCounter()
    module = Net(stage=stage, offload=offload, options=options)
    trainer, out = _fit(module, ZeroStrategy(), world_size, root,
                        callbacks=[counter, _checkpointing(root),
                                   _checkpointing(root, "latest", save_top_k=1, monitor="epoch",
                                                  mode="max")])
    out["val_loss_epoch0"] = _validate_epoch0(trainer, module, world_size, root)
    out.update(non_final_reductions=counter.non_final, final_reductions=counter.final,
               stage=counter.stage, sharded_between_steps=counter.sharded,
               clip_calls=module.clip_calls, files=sorted(os.listdir(os.path.join(root, "ckpts"))),
               latest_files=sorted(os.listdir(os.path.join(root, "latest"))))
    if save_after_epoch_0:
        # trainer.save_checkpoint outside fit, after a 1-epoch fit (every rank calls it).
        trainer, _ = _fit(Net(stage=stage), ZeroStrategy(), world_size,
                          os.path.join(root, "one_epoch"), epochs=1)
        trainer.save_checkpoint(os.path.join(root, "one_epoch.ckpt"))
    return out


def _fp16_run(world_size, root):
    """precision="16-true": fp16 parameters, whose gradients zeroshard unscales by its loss
    scale. The oracle is the same training written without Lightning (opt.backward scales the
    loss), replaying the batches Lightning fed this rank."""
    module = Net(stage=2)
    trainer = _trainer(ZeroStrategy(), world_size, root, precision="16-true")
    trainer.fit(module, Data(world_size))
    model = Net(stage=2).half()
    opt = zeroshard.ZeroAdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.1,
                              stage=2, timeout_s=60)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scales = []
    for step in range(EPOCHS * STEPS_PER_EPOCH):
        opt.zero_grad()
        for micro in range(GRAD_ACCUM):
            x, y = module.batches[step * GRAD_ACCUM + micro]
            final = micro == GRAD_ACCUM - 1
            with contextlib.nullcontext() if final else opt.no_sync():
                opt.backward(F.mse_loss(model(x), y) / GRAD_ACCUM)
        scales.append(opt.loss_scale)
        opt.clip_grad_norm_(CLIP)
        opt.step()
        if (step + 1) % STEPS_PER_EPOCH == 0:  # Lightning's default interval: the epoch
            schedule.step()
    return {"lightning": _weights(module), "plain": _weights(model), "loss_scales": scales,
            "dtypes": {p.dtype for p in module.parameters()}}


def _checkpoint_contents(path):
    """Lightning's file as torch.load reads it, and the shards' metadata."""
    checkpoint = torch.load(path, weights_only=False, map_location="cpu")
    meta = read_metadata(path + SHARDS_SUFFIX) if os.path.isdir(path + SHARDS_SUFFIX) else None
    return {"optimizer_states": checkpoint["optimizer_states"],
            "state_dict": checkpoint["state_dict"],
            "lr_schedulers": checkpoint["lr_schedulers"],
            "shards": None if meta is None else {
                "world_size": meta["world_size"], "stage": meta["stage"],
                "rank_files": sorted(os.listdir(meta["_dir"]))}}


def _resumed_run(world_size, root, checkpoint, stage, options=None):
    # other weights: the checkpoint must bring them back
    module = Net(stage=stage, seed=99, options=options)
    _, out = _fit(module, ZeroStrategy(), world_size, root, ckpt_path=checkpoint)
    return out


def _without_shards_run(world_size, root, checkpoint, stage):
    """Lightning's file copied without its `.zeroshard` directory, then resumed."""
    lone = os.path.join(root, os.path.basename(checkpoint))
    if torch.distributed.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.copy(checkpoint, lone)
    torch.distributed.barrier()
    return _resumed_run(world_size, root, lone, stage)


def _refused_run(world_size, root, module, clip_algorithm=None):
    trainer = _trainer(ZeroStrategy(), world_size, root, clip_algorithm=clip_algorithm)
    trainer.fit(module, Data(world_size))
    return {"trained": True}


def _part(results, name, fn, *args, **kwargs):
    try:
        results[name] = {"ok": fn(*args, **kwargs)}
    except Exception:  # noqa: BLE001 - recorded for the test of this part; the session goes on
        results[name] = {"error": traceback.format_exc()}


def _two_rank_runs(rank, world_size, tmp):
    _join_lightning_env(rank, world_size)
    results = {}

    def at(name):
        return os.path.join(tmp, name)

    def epoch0(name):
        return os.path.join(tmp, name, "ckpts", "epoch=0.ckpt")

    _part(results, "oracle", _oracle_run, world_size, at("oracle"))
    _part(results, "zero2", _zero_run, world_size, at("zero2"), 2, save_after_epoch_0=True)
    _part(results, "zero3", _zero_run, world_size, at("zero3"), 3, save_after_epoch_0=True)
    _part(results, "offload2", _zero_run, world_size, at("offload2"), 2, "cpu")
    # Many machines' options, 2 ranks as 2 nodes of 1: hybrid sharding (exact) and ZeRO++
    _part(results, "hybrid3", _zero_run, world_size, at("hybrid3"), 3, options=HYBRID)
    _part(results, "hybrid3/resumed", _resumed_run, world_size, at("resumed_hybrid3"),
          epoch0("hybrid3"), 3, HYBRID)
    _part(results, "zeropp3", _zero_run, world_size, at("zeropp3"), 3, options=ZERO_PP)
    for stage in (2, 3):
        name = f"zero{stage}"
        _part(results, f"{name}/checkpoint", _checkpoint_contents, epoch0(name))
        _part(results, f"{name}/resumed", _resumed_run, world_size, at(f"resumed{stage}"),
              epoch0(name), stage)
        _part(results, f"{name}/resumed_from_save", _resumed_run, world_size,
              at(f"resumed_save{stage}"), os.path.join(at(name), "one_epoch.ckpt"), stage)
    _part(results, "fp16", _fp16_run, world_size, at("fp16"))
    _part(results, "from_ddp", _resumed_run, world_size, at("from_ddp"), epoch0("oracle"), 2)
    _part(results, "without_shards", _without_shards_run, world_size, at("without_shards"),
          epoch0("zero2"), 2)
    _part(results, "torch_optimizer", _refused_run, world_size, at("torch_optimizer"),
          TorchAdamWUnderZeroStrategy(stage=2))
    _part(results, "value_clipping", _refused_run, world_size, at("value_clipping"),
          Net(stage=2), clip_algorithm="value")
    return results


def _three_rank_runs(rank, world_size, tmp):
    _join_lightning_env(rank, world_size)
    results = {}
    _part(results, "oracle", _oracle_run, world_size, os.path.join(tmp, "oracle"))
    _part(results, "zero3", _zero_run, world_size, os.path.join(tmp, "zero3"), 3)
    return results


# ---- the checks ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every rank's results of every part, at 2 ranks."""
    return run_distributed(_two_rank_runs, WORLD_SIZE, str(tmp_path_factory.mktemp("pl2")),
                           timeout_s=300)


@pytest.fixture(scope="module")
def runs3(tmp_path_factory):
    return run_distributed(_three_rank_runs, 3, str(tmp_path_factory.mktemp("pl3")),
                           timeout_s=200)


def _assert_matches_oracle(zero, oracle, what):
    for rank, (z, o) in enumerate(zip(zero, oracle)):
        assert len(z["losses"]) == len(o["losses"]) == MICRO_BATCHES, what
        torch.testing.assert_close(z["losses"], o["losses"], rtol=1e-5, atol=0,
                                   msg=lambda m: f"{what}, rank {rank} losses: {m}")
        _assert_same_weights(z["weights"], o["weights"], f"{what}, rank {rank}",
                             rtol=1e-5, atol=1e-6)
        assert z["global_step"] == o["global_step"] == EPOCHS * STEPS_PER_EPOCH
        torch.testing.assert_close(z["val_loss"], o["val_loss"], rtol=1e-5, atol=0)
        torch.testing.assert_close(z["val_loss_epoch0"], o["val_loss_epoch0"], rtol=1e-5, atol=0)
    _assert_same_weights(zero[1]["weights"], zero[0]["weights"], f"{what}: rank 1 vs rank 0",
                         rtol=0, atol=0)


def test_oracle_is_lightning_ddp_with_torch_adamw(runs):
    oracle = _ok(runs, "oracle")
    assert all(o["wrapped_in_ddp"] for o in oracle)
    norms = oracle[0]["grad_norms"]
    assert len(norms) == EPOCHS * STEPS_PER_EPOCH
    # Every step clips, so the comparisons below check clipping, not only the norm.
    assert min(norms) > CLIP, norms
    half = MICRO_BATCHES // EPOCHS  # it learns: epoch 1's mean loss below epoch 0's
    losses = oracle[0]["losses"]
    assert sum(losses[half:]) < sum(losses[:half]), losses


def _assert_stage(zero, stage):
    for z in zero:
        assert z["stage"] == stage
        # Stage 3: every parameter a ShardedParameter at every batch start (between steps).
        assert z["sharded_between_steps"] == [stage == 3] * MICRO_BATCHES


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3), ("offload2", 2),
                                         ("hybrid3", 3)])
def test_zero_strategy_matches_ddp_with_torch_adamw(runs, name, stage):
    _assert_stage(_ok(runs, name), stage)
    _assert_matches_oracle(_ok(runs, name), _ok(runs, "oracle"), name)


def test_zero_strategy_stage3_at_three_ranks_matches_ddp(runs3):
    _assert_stage(_ok(runs3, "zero3"), 3)
    _assert_matches_oracle(_ok(runs3, "zero3"), _ok(runs3, "oracle"), "stage 3 at 3 ranks")


def test_offload_trains_what_stage2_trains(runs):
    """offload="cpu": bitwise the same as stage 2 without it (the same CPU kernels)."""
    zero2, offload = _ok(runs, "zero2"), _ok(runs, "offload2")
    for rank in range(WORLD_SIZE):
        assert offload[rank]["losses"] == zero2[rank]["losses"]
        _assert_same_weights(offload[rank]["weights"], zero2[rank]["weights"],
                             f"rank {rank}: offloaded vs stage 2", rtol=0, atol=0)


@pytest.mark.parametrize("name", ["zero2", "zero3", "offload2"])
def test_gradient_clip_val_goes_to_the_optimizers_clip_grad_norm(runs, name):
    for rank, zero in enumerate(_ok(runs, name)):
        assert zero["clip_calls"] == EPOCHS * STEPS_PER_EPOCH, f"rank {rank}"


@pytest.mark.parametrize("name", ["zero2", "zero3", "offload2"])
def test_accumulation_reduces_only_on_the_final_micro_batch(runs, name):
    for rank, zero in enumerate(_ok(runs, name)):
        steps = EPOCHS * STEPS_PER_EPOCH
        assert zero["non_final_reductions"] == [0] * (steps * (GRAD_ACCUM - 1)), \
            f"rank {rank}: gradient reductions on non-final micro-batches"
        assert len(zero["final_reductions"]) == steps
        assert all(n > 0 for n in zero["final_reductions"]), \
            f"rank {rank}: an optimizer step without a gradient reduction"


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_file_holds_whole_weights_and_a_marker(runs, stage):
    saved = _ok(runs, f"zero{stage}/checkpoint")[0]
    files = _ok(runs, f"zero{stage}")[0]["files"]
    assert "epoch=0.ckpt" in files and "epoch=0.ckpt" + SHARDS_SUFFIX in files, files
    states = saved["optimizer_states"]
    assert len(states) == 1 and "zeroshard_checkpoint" in states[0], states
    assert not any(isinstance(v, torch.Tensor) for v in states[0].values()), states
    assert saved["shards"]["world_size"] == WORLD_SIZE and saved["shards"]["stage"] == stage
    for rank in range(WORLD_SIZE):  # every rank wrote its own shard
        assert f"rank-{rank:05d}-of-{WORLD_SIZE:05d}.bin" in saved["shards"]["rank_files"]
    shapes = {n: tuple(p.shape) for n, p in Net().state_dict().items()}
    assert {n: tuple(t.shape) for n, t in saved["state_dict"].items()} == shapes
    assert len(saved["lr_schedulers"]) == 1


def test_removed_checkpoints_take_their_shards_along(runs):
    """ModelCheckpoint(save_top_k=1) removes epoch 0's file when it saves epoch 1's."""
    for zero in _ok(runs, "zero2"):
        assert zero["latest_files"] == ["epoch=1.ckpt", "epoch=1.ckpt" + SHARDS_SUFFIX]


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("source", ["resumed", "resumed_from_save"])
def test_fit_from_checkpoint_ends_at_the_uninterrupted_weights(runs, stage, source):
    uninterrupted = _ok(runs, f"zero{stage}")
    resumed = _ok(runs, f"zero{stage}/{source}")
    half = MICRO_BATCHES // EPOCHS
    for rank in range(WORLD_SIZE):
        # The resumed run trains epoch 1 only, from epoch 0's weights, moments and schedule.
        assert resumed[rank]["losses"] == uninterrupted[rank]["losses"][half:], f"rank {rank}"
        assert resumed[rank]["global_step"] == uninterrupted[rank]["global_step"]
        assert resumed[rank]["lr"] == uninterrupted[rank]["lr"]
        _assert_same_weights(resumed[rank]["weights"], uninterrupted[rank]["weights"],
                             f"stage {stage} rank {rank}: {source} vs uninterrupted",
                             rtol=0, atol=0)


def test_hybrid_sharding_resumes_from_its_checkpoint(runs):
    """shard_size="node" (2 replicas of 1 rank): the epoch-0 checkpoint (the first shard
    group's files) resumes to the uninterrupted run's weights."""
    uninterrupted, resumed = _ok(runs, "hybrid3"), _ok(runs, "hybrid3/resumed")
    half = MICRO_BATCHES // EPOCHS
    for rank in range(WORLD_SIZE):
        assert resumed[rank]["losses"] == uninterrupted[rank]["losses"][half:], f"rank {rank}"
        _assert_same_weights(resumed[rank]["weights"], uninterrupted[rank]["weights"],
                             f"rank {rank}: hybrid resumed vs uninterrupted", rtol=0, atol=0)


def test_zero_plus_plus_trains_close_to_ddp(runs):
    """hpZ + qwZ + qgZ(int8): quantized, so not DDP's numbers, but every loss within 2% of
    them, and the ranks agree on the weights."""
    _assert_stage(_ok(runs, "zeropp3"), 3)
    zeropp, oracle = _ok(runs, "zeropp3"), _ok(runs, "oracle")
    for z, o in zip(zeropp, oracle):
        assert z["losses"] != o["losses"]
        torch.testing.assert_close(z["losses"], o["losses"], rtol=2e-2, atol=0)
    _assert_same_weights(zeropp[1]["weights"], zeropp[0]["weights"], "rank 1 vs rank 0",
                         rtol=0, atol=0)


def test_fit_from_a_ddp_checkpoint(runs):
    """strategy="ddp"'s file (torch.optim.AdamW state, whole weights) resumes under
    ZeroStrategy and training goes on as DDP's would."""
    oracle, resumed = _ok(runs, "oracle"), _ok(runs, "from_ddp")
    half = MICRO_BATCHES // EPOCHS
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(resumed[rank]["losses"], oracle[rank]["losses"][half:],
                                   rtol=1e-5, atol=0)
        _assert_same_weights(resumed[rank]["weights"], oracle[rank]["weights"],
                             f"rank {rank}: from DDP's checkpoint vs DDP", rtol=1e-5, atol=1e-6)


def test_fp16_parameters_train_like_the_same_script_without_lightning(runs):
    """precision="16-true": the strategy scales the loss as opt.backward does (unscaled, the
    optimizer would divide the gradients by the loss scale, and the clipping norm with them)."""
    for rank, fp16 in enumerate(_ok(runs, "fp16")):
        assert fp16["dtypes"] == {torch.float16}
        assert min(fp16["loss_scales"]) > 1, fp16["loss_scales"]
        _assert_same_weights(fp16["lightning"], fp16["plain"], f"rank {rank}: 16-true vs plain",
                             rtol=0, atol=0)


def test_torch_optimizer_under_zero_strategy_is_refused(runs):
    for rank, res in enumerate(runs):
        error = res["torch_optimizer"].get("error")
        assert error is not None, f"rank {rank}: trained a torch.optim optimizer unsharded"
        assert error.strip().splitlines()[-1].startswith("TypeError"), error
        assert "zeroshard optimizer" in error and 'strategy="ddp"' in error, error


def test_resuming_without_the_shards_directory_says_so(runs):
    for rank, res in enumerate(runs):
        error = res["without_shards"].get("error")
        assert error is not None, f"rank {rank}: resumed without the optimizer state"
        assert error.strip().splitlines()[-1].startswith("FileNotFoundError"), error
        assert "epoch=0.ckpt" + SHARDS_SUFFIX in error and "missing" in error, error


def test_clipping_by_value_is_refused(runs):
    for rank, res in enumerate(runs):
        error = res["value_clipping"].get("error")
        assert error is not None, f"rank {rank}: clipped by value"
        assert "does not clip gradients by value" in error and "norm" in error, error


# ---- single-process checks (no ranks needed) ----------------------------------------------------

def test_zero_strategy_refuses_ddp_wrapper_arguments():
    with pytest.raises(TypeError, match="DistributedDataParallel wrapper"):
        ZeroStrategy(find_unused_parameters=True)


def test_strategy_name_resolves_to_zero_strategy():
    trainer = pl.Trainer(strategy="zeroshard", accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False)
    assert isinstance(trainer.strategy, ZeroStrategy)


def test_importing_zeroshard_does_not_import_lightning():
    root = os.path.dirname(os.path.dirname(os.path.abspath(zeroshard.__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    code = ("import sys, zeroshard, zeroshard.integrations; "
            "assert not {'pytorch_lightning', 'lightning'} & set(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
