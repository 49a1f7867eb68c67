"""`python -m zeroshard.env`: what this zeroshard build contains and what it finds here.

Prints the version, build variant, CUDA architectures, NCCL linked and loaded, the CPU SIMD path
and thread count, torch's version, whether it fits this build and whether CI tests it, and the
GPUs seen. Never needs a GPU or a driver.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Dict, List, Tuple

# The floor the package installs with: every torch API the Python layer calls exists since 2.4.
MIN_TORCH = (2, 4)
# The torch minors a test run backs: CI (scripts/test.sh) runs the suite with the pinned 2.13
# only. PyPI serves no CPU build of 2.4 (its Linux wheels are CUDA builds with several GB of
# nvidia-* wheels), so the claim is narrowed to what CI proves rather than tested at 2.4.
TESTED_TORCH = ((2, 13),)


def _version_tuple(text: str) -> Tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def nccl_library_path() -> str:
    """libnccl.so.2 of the nvidia-nccl-cuXX wheel, or '' (then the loader's default search)."""
    spec = importlib.util.find_spec("nvidia.nccl")
    if spec is None or not spec.submodule_search_locations:
        return ""
    for root in spec.submodule_search_locations:
        candidate = os.path.join(root, "lib", "libnccl.so.2")
        if os.path.exists(candidate):
            return candidate
    return ""


def _format_nccl(code: int) -> str:
    if code <= 0:
        return "none"
    major, rest = divmod(code, 10000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def torch_compatibility(variant: str) -> Tuple[bool, str]:
    import torch

    if _version_tuple(torch.__version__) < MIN_TORCH:
        return False, f"torch {torch.__version__} is older than {MIN_TORCH[0]}.{MIN_TORCH[1]}"
    if variant.startswith("cu"):
        if torch.version.cuda is None:
            return True, "CPU torch: only CPU tensors can be used with this CUDA build"
        major = torch.version.cuda.split(".")[0]
        if f"cu{major}" != variant:
            return False, f"torch is built for CUDA {torch.version.cuda}, this wheel for {variant}"
    return True, "ok"


def torch_tested_note(version: str) -> str:
    """Whether CI tests this torch minor, in words for the report."""
    tested = ", ".join(f"{major}.{minor}" for major, minor in TESTED_TORCH)
    if _version_tuple(version)[:2] in TESTED_TORCH:
        return f"tested in CI (CI tests torch {tested})"
    return (f"untested: CI tests torch {tested} only; "
            f">= {MIN_TORCH[0]}.{MIN_TORCH[1]} is expected to work, not proven")


def report() -> List[Tuple[str, str]]:
    import torch

    from . import _core

    info = _core.build_info()
    variant = info["variant"]
    rows: List[Tuple[str, str]] = [
        ("zeroshard", info["version"]),
        ("variant", variant),
        ("compiler", info["compiler"]),
        ("cuda archs", info["cuda_archs"] or "none (CPU build)"),
    ]
    if _core.gpu.built_with_cuda():
        rows.append(("nccl linked", _format_nccl(_core.gpu.nccl_version_linked())))
        try:
            _core.gpu.load_nccl(nccl_library_path())
            loaded = _format_nccl(_core.gpu.nccl_version_loaded())
        except RuntimeError as err:
            loaded = f"not loaded ({err})"
        rows.append(("nccl loaded", loaded))
    else:
        rows.append(("nccl", "none (CPU build)"))
    rows.append(("cpu simd", f"{_core.cpu.simd_level()} (best here: {_core.cpu.detected_simd_level()})"))
    rows.append(("cpu threads", str(_core.cpu.num_threads())))
    ok, why = torch_compatibility(variant)
    rows.append(("torch", f"{torch.__version__} ({'compatible' if ok else 'INCOMPATIBLE'}: {why}; "
                          f"{torch_tested_note(torch.__version__)})"))
    count = _core.gpu.device_count()
    gpus = [f"{i}: {_core.gpu.device_name(i)}" for i in range(count)]
    rows.append(("gpus", "; ".join(gpus) if gpus else "none seen"))
    return rows


def as_dict() -> Dict[str, str]:
    return dict(report())


def main() -> int:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
