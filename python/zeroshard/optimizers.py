"""The ZeRO optimizers users construct: ZeroAdamW, ZeroAdam, ZeroSGD and ZeroRedundancy.

Each owns only the maths of its shard: which state tensors a FlatGroup's shard needs and how one
step updates them. Everything else (reduction, clipping, loss scaling, gathering, reports,
checkpoints) is ZeroOptimizer's.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type

import torch

from . import ops
from .flat_group import FlatGroup
from .zero_optimizer import ZeroOptimizer


def _check_betas(betas: Tuple[float, float]) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")


def _shard_pieces(fg: FlatGroup, master: Optional[torch.Tensor]):
    """(param, grad, param_copy, shard_start, n) for each non-empty piece of the rank's shard:
    `param` is fp32 (the flat buffer itself, or the master shard for low-precision params), and
    `param_copy` the low-precision model view the kernel writes in the same pass (or None)."""
    for b0, b1, s0 in fg.shard_slices():
        n = b1 - b0
        if n == 0:
            continue
        grad = fg.shard_grads(b0, b1, s0)
        if master is None:
            yield fg.flat_param[b0:b1], grad, None, s0, n
        else:
            yield master[s0:s0 + n], grad, fg.flat_param[b0:b1], s0, n


class _ZeroAdamBase(ZeroOptimizer):
    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, **zero_kwargs) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        _check_betas(betas)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, **zero_kwargs)

    def _init_state(self, fg: FlatGroup) -> Dict[str, Any]:
        state: Dict[str, Any] = {
            "step": 0,
            "exp_avg": torch.zeros(fg.shard_numel, dtype=torch.float32, device=fg.device),
            "exp_avg_sq": torch.zeros(fg.shard_numel, dtype=torch.float32, device=fg.device),
        }
        master = self._master(fg)
        if master is not None:
            state["master"] = master
        return state

    def _step_group(self, fg, state, group, grad_scale) -> None:
        _check_betas(group["betas"])
        state["step"] += 1
        for param, grad, copy, s0, n in _shard_pieces(fg, state.get("master")):
            ops.adam_step(param, grad, state["exp_avg"][s0:s0 + n],
                          state["exp_avg_sq"][s0:s0 + n], lr=group["lr"], betas=group["betas"],
                          eps=group["eps"], weight_decay=group["weight_decay"],
                          step=state["step"], decoupled=self.decoupled, grad_scale=grad_scale,
                          param_copy=copy, check_finite=False)


class ZeroAdamW(_ZeroAdamBase):
    """torch.optim.AdamW, partitioned (stage 0/1/2) over the data-parallel ranks.

    ZeroAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, stage=2,
              process_group=None, bucket_mb=25, overlap=True, reduce_dtype=None,
              loss_scale="dynamic")
    """
    decoupled = True


class ZeroAdam(_ZeroAdamBase):
    """torch.optim.Adam (L2 weight decay added to the gradient), partitioned."""
    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **zero_kwargs) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         **zero_kwargs)


class ZeroSGD(ZeroOptimizer):
    """torch.optim.SGD (momentum, dampening, nesterov, weight decay), partitioned."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, **zero_kwargs) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not momentum >= 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening == 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults, **zero_kwargs)

    def _init_state(self, fg: FlatGroup) -> Dict[str, Any]:
        state: Dict[str, Any] = {"step": 0}
        if any(g["momentum"] != 0 for g in self.param_groups):
            state["momentum_buffer"] = torch.zeros(fg.shard_numel, dtype=torch.float32,
                                                   device=fg.device)
        master = self._master(fg)
        if master is not None:
            state["master"] = master
        return state

    def _step_group(self, fg, state, group, grad_scale) -> None:
        state["step"] += 1
        momentum = group["momentum"]
        if momentum != 0 and "momentum_buffer" not in state:
            raise ValueError("momentum was switched on after construction; construct ZeroSGD "
                             "with momentum > 0 in the param group instead")
        for param, grad, copy, s0, n in _shard_pieces(fg, state.get("master")):
            buf = state["momentum_buffer"][s0:s0 + n] if momentum != 0 else None
            ops.sgd_step(param, grad, buf, lr=group["lr"], momentum=momentum,
                         dampening=group["dampening"], weight_decay=group["weight_decay"],
                         nesterov=group["nesterov"], first_step=state["step"] == 1,
                         grad_scale=grad_scale, param_copy=copy, check_finite=False)


# torch optimizers whose update of an element depends only on that element's own history.
ELEMENTWISE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "RMSprop",
                          "Rprop", "NAdam", "RAdam", "ASGD")


class ZeroRedundancy(ZeroOptimizer):
    """Any elementwise torch optimizer, run on this rank's flat fp32 shard.

    ZeroRedundancy(params, optimizer_class=torch.optim.Adagrad, *, stage=2, **optimizer_kwargs)
    Each FlatGroup's shard becomes one flat fp32 parameter of an inner `optimizer_class`
    instance (a persistent fp32 master shard, also for fp32 models: 4 bytes x shard). Optimizers
    that need a tensor's shape (LBFGS, SparseAdam, Adafactor, Muon...) are rejected;
    `assume_elementwise=True` accepts an optimizer not on the known list at your own risk.
    """

    def __init__(self, params, optimizer_class: Type[torch.optim.Optimizer] = torch.optim.AdamW,
                 *, stage: int = 2, process_group=None, bucket_mb: float = 25,
                 overlap: bool = True, reduce_dtype=None, loss_scale: Any = "dynamic",
                 assume_elementwise: bool = False, timeout_s: float = 300.0,
                 **optimizer_kwargs) -> None:
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        if issubclass(optimizer_class, ZeroOptimizer):
            raise TypeError(f"{optimizer_class.__name__} is already a zeroshard optimizer; use it directly")
        if optimizer_class.__name__ not in ELEMENTWISE_OPTIMIZERS and not assume_elementwise:
            raise ValueError(
                f"{optimizer_class.__name__} is not known to be elementwise: sharding it would change "
                f"its maths if it looks at whole tensors (LBFGS, SparseAdam, Adafactor and Muon do). "
                f"Known elementwise: {', '.join(ELEMENTWISE_OPTIMIZERS)}. Pass "
                "assume_elementwise=True if you are sure.")
        self.optimizer_class = optimizer_class
        self.optimizer_kwargs = dict(optimizer_kwargs)
        # Validate the kwargs now, on a throwaway parameter, so bad ones fail at construction.
        probe = optimizer_class([torch.zeros(1, requires_grad=True)], **optimizer_kwargs)
        defaults = dict(probe.defaults)
        self.inner: Optional[torch.optim.Optimizer] = None
        super().__init__(params, defaults, stage=stage, process_group=process_group,
                         bucket_mb=bucket_mb, overlap=overlap, reduce_dtype=reduce_dtype,
                         loss_scale=loss_scale, timeout_s=timeout_s)
        groups = []
        for fg, state in zip(self.flat_groups, self.shard_state):
            hyper = {k: v for k, v in self.param_groups[fg.group_index].items() if k != "params"}
            groups.append(dict(hyper, params=[state["master"]]))
        self.inner = optimizer_class(groups, **optimizer_kwargs)

    def _after_add_groups(self, added) -> None:
        for fg in added:
            state = self.shard_state[self.flat_groups.index(fg)]
            hyper = {k: v for k, v in self.param_groups[fg.group_index].items() if k != "params"}
            self.inner.add_param_group(dict(hyper, params=[state["master"]]))

    def _init_state(self, fg: FlatGroup) -> Dict[str, Any]:
        return {"master": torch.nn.Parameter(fg.shard_as_fp32(), requires_grad=True)}

    def _step_group(self, fg, state, group, grad_scale) -> None:
        index = self.flat_groups.index(fg)
        inner_group = self.inner.param_groups[index]
        for k, v in group.items():
            if k != "params":
                inner_group[k] = v  # lr schedulers change the outer groups
        master = state["master"]
        grad = fg.reduced_grads  # the shard (stage 0: the whole buffer), in shard space
        master.grad = grad.mul(1.0 / grad_scale) if grad_scale != 1.0 else grad.clone()
        self.inner.step()
        master.grad = None
        fg.write_shard(master.detach())

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["inner"] = self.inner.state_dict()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if "inner" not in state_dict:
            raise ValueError("state_dict has no 'inner' section: not saved by ZeroRedundancy")
        super().load_state_dict(state_dict)
        self.inner.load_state_dict(state_dict["inner"])
