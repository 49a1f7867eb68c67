"""zeroshard: ZeRO (the Zero Redundancy Optimizer) for PyTorch, with a compiled C++/CUDA core.

`zeroshard.ops` holds the fused kernels on torch tensors; `python -m zeroshard.env` reports what
this build contains and what it found on the machine.
"""
from . import _core, ops

__version__ = _core.build_info()["version"]
CoreError = _core.CoreError

__all__ = ["ops", "CoreError", "__version__"]
