"""`python -m zeroshard.export CHECKPOINT OUT.pt|OUT.safetensors [--optimizer-out OPT.pt]`:
the path users know for checkpoint/export.py (consolidated export of a sharded checkpoint).
"""
import sys

from .checkpoint.export import export, main, write_safetensors, write_torch_file

__all__ = ["export", "main", "write_safetensors", "write_torch_file"]

if __name__ == "__main__":
    sys.exit(main())
