"""TopologyOptions: the optimizer's keywords for many machines, in one place, with the checks
that need nothing but the options and the stage (those that need the world's size or the
process group are comm_groups.py's).

- node_size: ranks a node (None: torchrun's LOCAL_WORLD_SIZE; topology.py)
- shard_size: hybrid sharding over groups of k ranks or "node" (comm_groups.py)
- secondary_shard="node": hpZ (sharding/secondary_shards.py)
- quantize_weights="int8": qwZ (sharding/quantized_gather.py)
- quantize_grads="int8" / "int4": qgZ (sharding/quantized_reduce.py)
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union


@dataclasses.dataclass(frozen=True)
class TopologyOptions:
    node_size: Optional[int] = None
    shard_size: Union[None, int, str] = None
    secondary_shard: Optional[str] = None
    quantize_weights: Optional[str] = None
    quantize_grads: Optional[str] = None

    @property
    def grad_bits(self) -> int:
        return int(self.quantize_grads[3:]) if self.quantize_grads else 32

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, stage: int, reshard_after_forward: bool) -> None:
        """Refuses each value or combination that cannot work, saying what to use."""
        node_size, shard_size = self.node_size, self.shard_size
        if node_size is not None and not (isinstance(node_size, int) and node_size >= 1):
            raise ValueError(f"node_size must be None (torchrun's LOCAL_WORLD_SIZE) or a whole "
                             f"number of ranks >= 1, got {node_size!r}")
        if shard_size is not None and shard_size != "node" and not (
                isinstance(shard_size, int) and not isinstance(shard_size, bool)
                and shard_size >= 1):
            raise ValueError(f"shard_size must be None (every rank: plain ZeRO), 'node' or a "
                             f"whole number of ranks >= 1, got {shard_size!r}")
        if self.quantize_weights not in (None, "int8"):
            raise ValueError(f"quantize_weights must be None or 'int8', got "
                             f"{self.quantize_weights!r}")
        if self.quantize_weights is not None and stage != 3:
            raise ValueError("quantize_weights= quantizes stage 3's forward all-gather of the "
                             f"parameters; stage {stage} gathers the updated shards once per "
                             "step, exactly: use stage=3, or leave quantize_weights out")
        if self.quantize_weights is not None and not reshard_after_forward:
            raise ValueError("quantize_weights= needs reshard_after_forward=True: a unit kept "
                             "from forward to backward would take its gradients at quantized "
                             "weights")
        if self.quantize_grads not in (None, "int8", "int4"):
            raise ValueError(f"quantize_grads must be None, 'int8' or 'int4', got "
                             f"{self.quantize_grads!r}")
        if self.quantize_grads is not None and stage == 0:
            raise ValueError("quantize_grads= quantizes the gradient reduce-scatter of stages "
                             "1-3; stage 0 all-reduces: use stage=1, 2 or 3")
        if self.secondary_shard not in (None, "node"):
            raise ValueError(f"secondary_shard must be None or 'node', got "
                             f"{self.secondary_shard!r}")
        if self.secondary_shard is not None and stage != 3:
            raise ValueError("secondary_shard= keeps a node-local copy of stage 3's gathered "
                             f"parameters for backward; stage {stage} does not gather them: "
                             "use stage=3, or leave secondary_shard out")
        if self.secondary_shard is not None and not reshard_after_forward:
            raise ValueError("secondary_shard= serves backward's gathers; with "
                             "reshard_after_forward=False units stay gathered for backward "
                             "anyway")
