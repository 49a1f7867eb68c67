"""ExposedGrads: what `p.grad` is for a parameter whose gradient lives in zeroshard's buffers.

Owns the per-parameter GradHandle objects, putting them on `p.grad` after each synchronised
backward and taking them off before the next one, noticing when the script zeroed gradients
itself (`model.zero_grad()`, `p.grad = None`, `p.grad.zero_()`), and answering the torch
operations that idiomatic training code applies to `p.grad`. Knows FlatGroup's gradient ranges
and asks its optimizer (the `owner`) for reductions; knows nothing of optimizer maths.

[Note: gradient handles] The reducer moves each gradient into a flat bucket and frees `p.grad`
(at stages 1/2 no rank ever holds a parameter's whole reduced gradient). Left at None, torch
idioms that read `p.grad` go silently wrong: `torch.nn.utils.clip_grad_norm_` returns 0 and
clips nothing; `torch.amp.GradScaler` asserts. So after a synchronised backward every optimized
parameter's `p.grad` is a GradHandle: a tensor subclass of the parameter's shape and dtype with
no storage of its own (a stride-0 view of one element) whose `__torch_function__` serves:
- `torch.linalg.vector_norm` / `torch._foreach_norm` (what clip_grad_norm_ and get_total_norm
  call): the norm of the parameter's *global* reduced gradient. All parameters' norms are
  computed at the first request with one all-reduce of per-parameter partial sums, then cached
  until a gradient changes, so a per-parameter loop costs one collective, not one per tensor.
- `mul_` / `_foreach_mul_` (the clip itself) and `_amp_foreach_non_finite_check_and_unscale_`
  (GradScaler.unscale_): applied in place to this rank's pieces; the overflow flag is combined
  across ranks so every rank skips (or takes) the same step.
- `zero_`, `detach_`, `requires_grad_` (Module.zero_grad(set_to_none=False)).
- attribute reads (`shape`, `dtype`, `device`, `is_sparse`...).
At stage 0 every rank holds the whole reduced gradient, so any other operation runs on a view of
it (fp32 parameters) — `p.grad` reads like DDP's. At stages 1/2 any other operation raises an
error that names the parameter and the replacement. Because a handle has no storage, autograd
must never accumulate into one: each parameter's tensor hook (which runs before accumulation)
takes the handles off first.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd import Variable
from ..sharded_params.sharded_tensor import raw

_PASSTHROUGH = ("__get__", "__set__", "__delete__", "dim", "size", "numel", "stride",
                "is_contiguous", "element_size", "nelement", "data_ptr", "storage_offset",
                "get_device", "is_floating_point", "is_complex")
_NO_OPS = ("detach_", "requires_grad_")


class GradHandle(torch.Tensor):
    """p.grad of a parameter whose reduced gradient is sharded in zeroshard's buffers."""

    _exposed: "ExposedGrads"
    _key: Tuple[int, int]  # (flat group index, parameter index in it)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = _first_handle(args)
        if owner is None:
            owner = _first_handle(tuple(kwargs.values()))
        return owner._exposed.answer(func, args, kwargs)


def _first_handle(seq) -> Optional[GradHandle]:
    for a in seq:
        if isinstance(a, GradHandle):
            return a
        if isinstance(a, (list, tuple)):
            found = _first_handle(a)
            if found is not None:
                return found
    return None


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class ExposedGrads:
    def __init__(self, owner) -> None:
        # owner: the ZeroOptimizer (flat_groups, stage, comm, _names, _reduced, callbacks).
        self.owner = owner
        self.handles: Dict[Tuple[int, int], GradHandle] = {}
        self.exposed = False      # handles are on p.grad (after a synchronised backward)
        self.round_open = False   # inside a backward that has started delivering gradients
        self._norms: Dict[float, torch.Tensor] = {}  # norm type -> per-handle global norms
        self._index: Dict[Tuple[int, int], int] = {}  # handle key -> position in norm tensors
        self._hook_handles = []

    # ---- registration -------------------------------------------------------------------------

    def add_groups(self, first_index: int, groups) -> None:
        for gi, fg in enumerate(groups, start=first_index):
            for j, p in enumerate(fg.params):
                with raw():  # a sharded parameter's own shape (its placeholder's): autograd's
                    shape = p.shape  # check of p.grad against it reads that one
                handle = torch.Tensor._make_subclass(
                    GradHandle, torch.zeros((), dtype=p.dtype, device=p.device).expand(shape),
                    False)
                handle._exposed, handle._key = self, (gi, j)
                self.handles[(gi, j)] = handle
                self._index[(gi, j)] = len(self._index)
                self._hook_handles.append(p.register_hook(self._before_accumulate))

    def _before_accumulate(self, grad: torch.Tensor) -> None:
        """Tensor hook: runs before autograd accumulates into p.grad, so the first one of a
        backward is the place to take handles off and see what the script did meanwhile."""
        if not self.round_open:
            self.round_open = True
            Variable._execution_engine.queue_callback(self._after_backward)
            self.owner._on_backward_start()
        return None

    def _after_backward(self) -> None:
        self.round_open = False
        self.owner._on_backward_end()

    def _params(self):
        for (gi, j), handle in self.handles.items():
            yield self.owner.flat_groups[gi].params[j], handle

    # ---- putting handles on p.grad and taking them off ------------------------------------------

    # p.grad is read and set under raw() below: the same attribute access, without a stage-3
    # parameter's __torch_function__ per parameter and backward (3-4 ms a step on gpt-17m).

    def expose(self) -> None:
        self._norms.clear()
        with raw():
            for p, handle in self._params():
                if p.grad is None:
                    p.grad = handle
        self.exposed = True

    def withdraw(self, *, remove: bool = True, apply_script_changes: bool = True) -> None:
        """Applies what the script did to the handles, then (remove=True) takes them off
        p.grad. A handle the script replaced by None means 'this gradient is zero' (torch's
        meaning: model.zero_grad()), so its gradient is zeroed; a real tensor put there is
        refused, since zeroshard would silently ignore it."""
        if not self.exposed:
            return
        zeroed, replaced = [], None
        with raw():
            for p, handle in self._params():
                current = p.grad
                if current is handle:
                    if remove:
                        p.grad = None
                elif current is None:
                    zeroed.append(handle._key)
                elif replaced is None:
                    replaced = handle._key
        if remove:
            self.exposed = False
        if replaced is not None and apply_script_changes:  # zero_grad() just clears
            gi, j = replaced
            raise ValueError(
                f"p.grad of {self.owner.flat_groups[gi].names[j]} was replaced by a tensor; "
                "zeroshard takes gradients from its own reduced buffers, so an assigned "
                "gradient would be ignored. Modify gradients in place (p.grad.mul_(), zero_()) "
                "or set p.grad = None.")
        if not zeroed or not apply_script_changes:
            return
        self._norms.clear()
        # Reductions still in flight would add into what is zeroed here: finish them first.
        self.owner._reduced()
        if len(zeroed) == len(self.handles):
            for fg in self.owner.flat_groups:
                fg.zero_grads()
            self.owner._grads_present = False  # as torch.optim: no gradient, no step
        else:
            for gi, j in zeroed:
                for piece in self.owner.flat_groups[gi].param_grad_pieces(j):
                    piece.zero_()

    def forget_withdrawn(self, got: List[List[bool]]) -> None:
        """A handle the script replaced by None (model.zero_grad(), p.grad = None) means, as
        in torch, that the parameter has no gradient: unless a later backward gives it one,
        the step skips it (got[gi][j], the reducer's flags, cleared)."""
        if not self.exposed:
            return
        with raw():
            for (gi, j), handle in self.handles.items():
                if self.owner.flat_groups[gi].params[j].grad is None:
                    got[gi][j] = False

    # ---- torch operations on handles ------------------------------------------------------------

    def answer(self, func, args, kwargs):
        name = getattr(func, "__name__", "")
        if name in _PASSTHROUGH:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if name == "__repr__":
            return self._describe(args[0])
        if name in _NO_OPS:
            return args[0]
        if name == "zero_":
            self._zero(args[0])
            return args[0]
        if name in ("linalg_vector_norm", "norm") and self._is_whole_norm(name, args, kwargs):
            return self._norm_of(args[0], self._norm_type(name, args, kwargs))
        if name == "_foreach_norm":
            ord_ = args[1] if len(args) > 1 else kwargs.get("ord", 2)
            return [self._norm_of(t, float(ord_)) if isinstance(t, GradHandle)
                    else torch.linalg.vector_norm(t, ord_) for t in args[0]]
        if name == "mul_":
            self._scale(args[0], args[1] if len(args) > 1 else kwargs["other"])
            return args[0]
        if name == "_foreach_mul_":
            tensors, factors = args[0], args[1]
            factors = factors if isinstance(factors, (list, tuple)) else [factors] * len(tensors)
            for t, f in zip(tensors, factors):
                if isinstance(t, GradHandle):
                    self._scale(t, f)
                else:
                    t.mul_(f)
            return None
        if name == "_amp_foreach_non_finite_check_and_unscale_":
            return self._unscale(*args, **kwargs)
        if self.owner.stage == 0:
            return self._on_full_views(func, args, kwargs)
        handle = _first_handle(args)  # never `or`: a tensor's truth value is an op too
        if handle is None:
            handle = _first_handle(tuple(kwargs.values()))
        raise RuntimeError(
            f"p.grad of {self._name(handle)} is a zeroshard gradient handle: at stage "
            f"{self.owner.stage} each rank holds only its shard of the reduced gradient, so "
            f"'{name or func}' cannot read it as a whole tensor. What works on p.grad: "
            "torch.nn.utils.clip_grad_norm_ (or opt.clip_grad_norm_, faster), "
            "torch.amp.GradScaler, p.grad.zero_() and p.grad = None. To inspect whole "
            "gradients use stage=0.")

    def _name(self, handle: Optional[GradHandle]) -> str:
        if handle is None:
            return "a parameter"
        gi, j = handle._key
        return self.owner.flat_groups[gi].names[j]

    def _describe(self, handle: GradHandle) -> str:
        with torch._C.DisableTorchFunctionSubclass():
            shape, dtype = tuple(handle.shape), handle.dtype
        return (f"GradHandle(shape={shape}, dtype={dtype}, parameter={self._name(handle)}, "
                f"zeroshard stage {self.owner.stage})")

    @staticmethod
    def _is_whole_norm(name, args, kwargs) -> bool:
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
        return dim is None and not kwargs.get("keepdim", False)

    @staticmethod
    def _norm_type(name, args, kwargs) -> float:
        key = "ord" if name == "linalg_vector_norm" else "p"
        value = kwargs.get(key, args[1] if len(args) > 1 else 2)
        return 2.0 if value in (None, "fro") else float(value)

    def _check_live(self, handle: GradHandle) -> Tuple[int, int]:
        if not self.exposed:
            raise RuntimeError(
                f"p.grad of {self._name(handle)} is a stale zeroshard gradient handle (kept "
                "from before a step() or zero_grad()); read p.grad again after backward")
        return handle._key

    def _zero(self, handle: GradHandle) -> None:
        gi, j = self._check_live(handle)
        self._norms.clear()
        self.owner._reduced()  # a slice still landing (offload) would overwrite the zeros
        self._changed()
        for piece in self.owner.flat_groups[gi].param_grad_pieces(j):
            piece.zero_()

    def _scale(self, handle: GradHandle, factor) -> None:
        gi, j = self._check_live(handle)
        self.owner._reduced()
        self._norms.clear()
        self._changed()
        for piece in self.owner.flat_groups[gi].param_grad_pieces(j):
            piece.mul_(factor.to(piece.device) if isinstance(factor, torch.Tensor) else factor)

    def _changed(self) -> None:
        """The script changed reduced gradients: offload's per-slice norms no longer hold."""
        if getattr(self.owner, "offload", None) is not None:
            self.owner.offload.partials.clear()

    def _norm_of(self, handle: GradHandle, norm_type: float) -> torch.Tensor:
        key = self._check_live(handle)
        norms = self._norms.get(norm_type)
        if norms is None:
            norms = self._all_norms(norm_type)
            self._norms[norm_type] = norms
        with torch._C.DisableTorchFunctionSubclass():
            dtype = handle.dtype
        return norms[self._index[key]].to(dtype)

    def _all_norms(self, norm_type: float) -> torch.Tensor:
        """Every parameter's global gradient norm: per-parameter partial results on this
        rank's pieces, combined across ranks by one all-reduce (stages 1/2)."""
        if not (norm_type > 0):
            raise ValueError(f"zeroshard gradient handles support norm types > 0 and inf, got "
                             f"{norm_type}")
        self.owner._reduced()
        device = self.owner.device
        partials = []
        for gi, j in self._index:
            fg = self.owner.flat_groups[gi]  # its gradients live on the host with offload
            total = torch.zeros((), dtype=torch.float64, device=fg.reduced_grads.device)
            for piece in fg.param_grad_pieces(j):
                n = torch.linalg.vector_norm(piece, norm_type, dtype=torch.float64)
                total = torch.maximum(total, n) if math.isinf(norm_type) else total + n ** norm_type
            partials.append(total.to(device))
        stacked = (torch.stack(partials) if partials
                   else torch.zeros(0, dtype=torch.float64, device=device))
        if self.owner.stage != 0:
            op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
            self.owner.comm.control_all_reduce(stacked, op)
        return stacked if math.isinf(norm_type) else stacked ** (1.0 / norm_type)

    def _unscale(self, grads, found_inf, inv_scale):
        """GradScaler.unscale_: scale by inv_scale, and set found_inf when any rank's pieces
        of these gradients hold inf/NaN (combined across ranks so every rank agrees)."""
        real = [g for g in grads if not isinstance(g, GradHandle)]
        if real:
            torch._amp_foreach_non_finite_check_and_unscale_(real, found_inf, inv_scale)
        handles = [g for g in grads if isinstance(g, GradHandle)]
        if not handles:
            return None
        bad = torch.zeros(1, dtype=torch.float32, device=self.owner.device)
        for handle in handles:
            self._scale(handle, inv_scale)
            gi, j = handle._key
            for piece in self.owner.flat_groups[gi].param_grad_pieces(j):
                bad += (~torch.isfinite(piece)).any().float().to(bad.device)
        if self.owner.stage != 0:
            self.owner.comm.control_all_reduce(bad, dist.ReduceOp.MAX)
        found_inf.copy_(torch.maximum(found_inf, (bad[0] > 0).to(found_inf)))
        return None

    def _on_full_views(self, func, args, kwargs):
        """Stage 0: every rank has the whole reduced gradient; run func on views of it."""
        self.owner._reduced()
        self._norms.clear()

        def swap(a):
            if isinstance(a, GradHandle):
                gi, j = self._check_live(a)
                fg = self.owner.flat_groups[gi]
                with torch._C.DisableTorchFunctionSubclass():
                    shape, dtype = a.shape, a.dtype
                if fg.reduced_grads.dtype != dtype:
                    raise RuntimeError(
                        f"p.grad of {self._name(a)} ({dtype}) is reduced in "
                        f"{fg.reduced_grads.dtype} by zeroshard and cannot be read as a "
                        f"{dtype} tensor; clip_grad_norm_, GradScaler and zero_() work on it")
                start, end = fg.param_ranges[j]
                return fg.reduced_grads[start:end].view(shape)
            if isinstance(a, (list, tuple)):
                return type(a)(swap(x) for x in a)
            return a

        return func(*swap(tuple(args)), **{k: swap(v) for k, v in kwargs.items()})
