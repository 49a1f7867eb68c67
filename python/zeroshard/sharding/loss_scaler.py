"""LossScaler: dynamic (or static) loss scaling for fp16 training.

Owns the scale and its schedule: start at `initial_scale`, double after `growth_interval` clean
steps, halve after `hysteresis` overflows in a row (a clean step resets the count), never
below `min_scale`. Knows nothing of tensors or ranks: the optimizer decides what overflowed.
"""
from __future__ import annotations


class LossScaler:
    def __init__(self, *, dynamic: bool = True, initial_scale: float = 2.0 ** 16,
                 growth_interval: int = 2000, hysteresis: int = 2, min_scale: float = 1.0,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5) -> None:
        if not initial_scale > 0:
            raise ValueError(f"initial_scale must be > 0, got {initial_scale}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        if hysteresis < 1:
            raise ValueError(f"hysteresis must be >= 1, got {hysteresis}")
        if not 0 < min_scale <= initial_scale:
            raise ValueError(f"min_scale must be in (0, initial_scale], got {min_scale}")
        self.dynamic = dynamic
        self.scale = float(initial_scale)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.min_scale = float(min_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.clean_steps = 0
        self.hysteresis_left = hysteresis

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self.clean_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.min_scale, self.scale * self.backoff_factor)
                self.hysteresis_left = self.hysteresis
            return
        self.clean_steps += 1
        self.hysteresis_left = self.hysteresis
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps,
                "hysteresis_left": self.hysteresis_left, "dynamic": self.dynamic}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.dynamic = bool(state["dynamic"])


def scaler_for(loss_scale, has_fp16: bool, scaler_kwargs) -> "LossScaler | None":
    """The optimizer's scaler: none without float16 parameters or with loss_scale=None;
    dynamic for 'dynamic', static for a number."""
    if not has_fp16 or loss_scale is None:
        return None
    if loss_scale == "dynamic":
        return LossScaler(dynamic=True, **scaler_kwargs)
    if isinstance(loss_scale, (int, float)) and loss_scale > 0:
        return LossScaler(dynamic=False, initial_scale=float(loss_scale))
    raise ValueError(f"loss_scale must be 'dynamic', a positive number or None, "
                     f"got {loss_scale!r}")
