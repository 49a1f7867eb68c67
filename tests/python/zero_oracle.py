"""The oracle side of the ZeRO tests: model, data, single-process torch.optim runs, and comparisons.

The oracle is one process running stock `torch.optim` on the full batch. A sharded run puts each
rank on an equal slice of the same batch with a mean loss over its slice, so the rank-averaged
gradient equals the full-batch gradient and the parameters must match the oracle's.

`build_optimizer(impl=...)` makes the optimizer under test: "zeroshard" (the real thing) or
"reference" (a stock torch optimizer whose gradients are all-reduced just before they are read).
The reference stand-in lets the suite prove its oracle, data slicing and tolerances today, before
zeroshard's optimizers exist; it is not a ZeRO implementation.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

GLOBAL_BATCH = 24                     # divisible by world sizes 1..4 and by 2 micro-batches each
TINY_BUCKET_MB = 71 * 4 / 2 ** 20     # 71 fp32 elements: params straddle bucket and shard edges
# 293 elements: still cuts the 707- and 997-element params, with 4x fewer collectives than TINY
# (used where the test is about a feature, not about layout edges, to keep the suite fast).
SMALL_BUCKET_MB = 293 * 4 / 2 ** 20
FP32_RTOL, FP32_ATOL = 1e-5, 1e-6
VOCAB, WIDTH, HIDDEN, CODEBOOK = 13, 7, 101, 997

OPTIMIZERS: Dict[str, Tuple[type, dict]] = {
    "AdamW": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)),
    "Adam": (torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)),
    "SGD": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    # An elementwise optimizer zeroshard has no fused kernel for: goes through ZeroRedundancy.
    "Adagrad": (torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.01, weight_decay=1e-3)),
}


class AwkwardNet(nn.Module):
    """Prime-sized parameters: 91, 707, 101, 707, 7, 997 elements (2610 trainable in all).

    `frozen_layer` adds a 7x7 linear (56 elements) with requires_grad=False in the forward path.
    """

    def __init__(self, frozen_layer: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.frozen = nn.Linear(WIDTH, WIDTH) if frozen_layer else None
        self.fc1 = nn.Linear(WIDTH, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, WIDTH)
        self.codebook = nn.Parameter(torch.randn(CODEBOOK) * 0.1)
        if self.frozen is not None:
            self.frozen.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        if self.frozen is not None:
            h = h + self.frozen(h)
        h = torch.tanh(self.fc1(h))
        # Only 13 of the 997 codebook entries ever get a gradient: the rest see exact zeros.
        return self.fc2(h) + self.codebook[(tokens * 61) % CODEBOOK].unsqueeze(-1)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32,
               frozen_layer: bool = False) -> AwkwardNet:
    torch.manual_seed(seed)
    return AwkwardNet(frozen_layer).to(dtype)


def make_batches(steps: int, global_batch: int = GLOBAL_BATCH, seed: int = 1234):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (global_batch,), generator=gen),
             torch.randn(global_batch, WIDTH, generator=gen)) for _ in range(steps)]


def rank_slice(tensor: torch.Tensor, rank: int, parts: int) -> torch.Tensor:
    if tensor.shape[0] % parts:
        raise ValueError(f"batch of {tensor.shape[0]} does not split into {parts} equal slices")
    size = tensor.shape[0] // parts
    return tensor[rank * size:(rank + 1) * size]


def mse_loss(model: nn.Module, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out = model(tokens).float()
    return ((out - target) ** 2).mean()


def oracle_optimizer(kind: str, params, **overrides) -> torch.optim.Optimizer:
    cls, kwargs = OPTIMIZERS[kind]
    return cls(params, **{**kwargs, **overrides})


def build_optimizer(impl: str, kind: str, params, *, stage: int,
                    bucket_mb: float = SMALL_BUCKET_MB, **overrides):
    """The optimizer under test, with the same hyperparameters as `oracle_optimizer(kind)`."""
    cls, kwargs = OPTIMIZERS[kind]
    kwargs = {**kwargs, **overrides}
    if impl == "reference":
        return reference_optimizer(cls, params, **kwargs)
    if impl != "zeroshard":
        raise ValueError(f"impl must be 'zeroshard' or 'reference', got {impl!r}")
    import zeroshard
    if kind == "Adagrad":
        return zeroshard.ZeroRedundancy(params, optimizer_class=cls, stage=stage,
                                        bucket_mb=bucket_mb, **kwargs)
    return getattr(zeroshard, "Zero" + kind)(params, stage=stage, bucket_mb=bucket_mb, **kwargs)


def reference_optimizer(optimizer_class: type, params, **kwargs):
    """A stock torch optimizer that averages gradients over ranks (all_reduce) before reading them."""

    class AveragingReference(optimizer_class):
        loss_scale = 1.0
        last_step_skipped = False

        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            self._grads_averaged = False

        def _average_grads(self):
            if self._grads_averaged or not dist.is_initialized():
                self._grads_averaged = True
                return
            world_size = dist.get_world_size()
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad.div_(world_size)
            self._grads_averaged = True

        def backward(self, loss):
            loss.backward()

        def no_sync(self):
            return contextlib.nullcontext()  # it only communicates at step time anyway

        def clip_grad_norm_(self, max_norm, norm_type=2.0):
            self._average_grads()
            params = [p for g in self.param_groups for p in g["params"]]
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

        def step(self, closure=None):
            self._average_grads()
            out = super().step(closure)
            self._grads_averaged = False
            return out

    return AveragingReference(params, **kwargs)


def train_rank(model: nn.Module, opt, batches, rank: int, world_size: int, *,
               micro_batches: int = 1, use_no_sync: bool = False, scheduler=None,
               clip: float = None, norm_type: float = 2.0) -> List[torch.Tensor]:
    """This rank's training loop on its slice of each global batch; returns clip norms if clipping.

    With `micro_batches=k` the rank's slice is split into k micro-batches, each loss divided by k so
    the accumulated gradient is the mean over the slice; `use_no_sync` runs all but the last
    backward inside `opt.no_sync()`.
    """
    norms = []
    for tokens, target in batches:
        tokens, target = rank_slice(tokens, rank, world_size), rank_slice(target, rank, world_size)
        opt.zero_grad(set_to_none=True)
        for micro in range(micro_batches):
            loss = mse_loss(model, rank_slice(tokens, micro, micro_batches),
                            rank_slice(target, micro, micro_batches)) / micro_batches
            last = micro == micro_batches - 1
            with (opt.no_sync() if use_no_sync and not last else contextlib.nullcontext()):
                loss.backward()
        if clip is not None:
            norms.append(opt.clip_grad_norm_(clip, norm_type).detach().clone())
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return norms


def train_oracle(model: nn.Module, opt: torch.optim.Optimizer, batches, *, scheduler=None,
                 clip: float = None, norm_type: float = 2.0) -> List[torch.Tensor]:
    """Full-batch training with a stock optimizer; returns the clip norms if clipping."""
    norms = []
    for tokens, target in batches:
        opt.zero_grad(set_to_none=True)
        mse_loss(model, tokens, target).backward()
        if clip is not None:
            params = [p for g in opt.param_groups for p in g["params"]]
            norms.append(torch.nn.utils.clip_grad_norm_(params, clip, norm_type).detach().clone())
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return norms


def param_snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_ranks_identical(snapshots: List[Dict[str, torch.Tensor]], what: str) -> None:
    """After step() every rank must hold bitwise-identical parameters."""
    for rank, snap in enumerate(snapshots[1:], start=1):
        for name, tensor in snap.items():
            if not torch.equal(tensor, snapshots[0][name]):
                diff = (tensor.double() - snapshots[0][name].double()).abs().max().item()
                raise AssertionError(f"{what}: rank {rank} {name} differs from rank 0 (max {diff:.3g})")


def assert_params_close(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
                        what: str, rtol: float = FP32_RTOL, atol: float = FP32_ATOL) -> None:
    assert actual.keys() == expected.keys(), f"{what}: parameter names differ"
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{what}: {n}: {m}")
