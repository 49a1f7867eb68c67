"""zeroshard: ZeRO (the Zero Redundancy Optimizer) for PyTorch, with a compiled C++/CUDA core.

Swap `torch.optim.AdamW(model.parameters(), ...)` for
`zeroshard.ZeroAdamW(model.parameters(), ..., stage=2)` and drop the DDP wrapper: the optimizer
reduces gradients itself and keeps only this rank's shard of the optimizer state.
`zeroshard.ops` holds the fused kernels; `python -m zeroshard.env` reports the build.
"""
from . import _core, ops
from .comm.communicator import CollectiveTimeout
from .gradient_reducer import GradientReducer
from .optimizers import ZeroAdam, ZeroAdamW, ZeroRedundancy, ZeroSGD
from .sharded_params.sharded_init import sharded_init
from .sharded_params.sharded_modules import full_params
from .sharded_params.sharded_tensor import ShardedAccessError, ShardedTensor, ShardedParameter
from .sharded_params import sharded_ops  # noqa: F401  (ShardedTensor's torch calls: registers itself)
from .zero_optimizer import ZeroOptimizer
from . import checkpoint

__version__ = _core.build_info()["version"]
CoreError = _core.CoreError

__all__ = ["ZeroAdamW", "ZeroAdam", "ZeroSGD", "ZeroRedundancy", "ZeroOptimizer",
           "GradientReducer", "sharded_init", "ops", "CoreError", "CollectiveTimeout", "checkpoint",
           "full_params", "ShardedAccessError", "ShardedTensor", "ShardedParameter", "__version__"]
