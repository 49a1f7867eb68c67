"""`python -m zeroshard.estimate --help`: the path users know for the memory estimator
(memory/estimate.py, the arithmetic) and its command line (memory/estimate_cli.py).
"""
import sys

from .memory.estimate import (DTYPE_NAMES, MODEL_STATE_KEYS, REPORT_KEYS, STAGES, STATE_TENSORS,
                              bucket_elems, build_layout, estimate_model_states, format_bytes,
                              format_count, formula_text, frozen_numels_of, frozen_units_of,
                              largest_fitting_params, param_numels_of, param_units_of,
                              parse_count, parse_memory, zero_formula_bytes)
from .memory.estimate_cli import main

__all__ = ["DTYPE_NAMES", "MODEL_STATE_KEYS", "REPORT_KEYS", "STAGES", "STATE_TENSORS",
           "bucket_elems", "build_layout", "estimate_model_states", "format_bytes",
           "format_count", "formula_text", "frozen_numels_of", "frozen_units_of",
           "largest_fitting_params", "param_numels_of", "param_units_of", "parse_count",
           "parse_memory", "zero_formula_bytes", "main"]

if __name__ == "__main__":
    sys.exit(main())
