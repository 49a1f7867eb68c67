"""Sharded, atomic, reshardable checkpoints (zeroshard.checkpoint.save / load), their on-disk
format, and consolidated export to one ordinary file (`python -m zeroshard.export`).

    zeroshard.checkpoint.save(path, model=model, optimizer=opt, extra={"epoch": 3}, rng=True)
    extra = zeroshard.checkpoint.load(path, model=model, optimizer=opt, rng=True)
"""
from .format import CheckpointError
from .sharded_files import load, save, unwrap_optimizer

__all__ = ["save", "load", "CheckpointError", "unwrap_optimizer"]
