"""ParamWatch: notices parameters the script changed between steps of an offloading optimizer.

With offload every FlatGroup's update reads a host copy (the fp32 master; for fp32 parameters
the kernel's fp32 copy), so its next update would overwrite whatever the script wrote into the
parameters since the last step: a WGAN's `p.data.clamp_()`, a re-normalisation, a
`model.load_state_dict()` mid-training. Without offload fp32 parameters are their own master and
such edits stick, as in torch.optim. So after each step ParamWatch takes a fingerprint of each
group's parameter shard, and before the next update takes it again; where one differs, the
optimizer adopts the changed elements into the host copy (ZeroOptimizer._adopt_changed_params,
an exact comparison). The offloaded step is dominated by the host update, so two device reads
of the parameters per step cost little there. (bf16/fp16 parameters without offload keep their
fp32 master on the device and are not watched: an edit between steps is reverted there.)

The fingerprint is a position-weighted sum of the elements' bit patterns (int64, wrapping), on
the parameters' device, slice by slice: one read of the shard and slice-sized temporaries, no
host copy; on CUDA one host sync per step, with the step's others. Swapped or rescaled values
change it; a change that leaves it equal would have to cancel exactly modulo 2**64.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..sharding.flat_group import FlatGroup

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_WEIGHT_PERIOD = 65521  # a prime: weights 1..65521 repeat, so a shifted pattern still differs


class ParamWatch:
    def __init__(self) -> None:
        self._weights: Dict[torch.device, torch.Tensor] = {}
        self._taken: Optional[torch.Tensor] = None  # one fingerprint per watched group
        self._groups: List[FlatGroup] = []

    def _weight(self, device: torch.device, n: int) -> torch.Tensor:
        w = self._weights.get(device)
        if w is None or w.numel() < n:
            w = torch.arange(n, dtype=torch.int64, device=device) % _WEIGHT_PERIOD + 1
            self._weights[device] = w
        return w[:n]

    def _fingerprint(self, fg: FlatGroup) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.int64, device=fg.device)
        for b0, b1, s0 in fg.shard_slices():
            if b1 > b0:
                bits = fg.param_values(b0, b1, s0).view(_BITS[fg.dtype]).to(torch.int64)
                total += (bits * self._weight(fg.device, b1 - b0)).sum()
        return total

    def _take(self, groups: List[FlatGroup]) -> Optional[torch.Tensor]:
        if not groups:
            return None
        with torch.no_grad():
            return torch.stack([self._fingerprint(fg) for fg in groups])

    def record(self, groups: List[FlatGroup]) -> None:
        """After a step (the parameters now hold what the masters say)."""
        self._groups = list(groups)
        self._taken = self._take(self._groups)

    def changed(self) -> bool:
        """Whether some watched group's parameters differ from what record() saw."""
        if self._taken is None:
            return False
        now = self._take(self._groups)
        return bool((now != self._taken).any())
