"""PEP 517 backend of zeroshard: scikit-build-core, plus the NCCL headers as a build requirement
when the build will compile the CUDA variant.

`pip install .` with a CUDA compiler builds the CUDA variant (CMakeLists.txt, ZEROSHARD_CUDA=AUTO),
which compiles against nccl.h. A user's machine with nvcc rarely has NCCL's headers, but the
`nvidia-nccl-cuXX` wheel ships them: asking for it here puts it into pip's isolated build
environment, where cmake/cuda.cmake finds it. The compiler is looked up as CMake's
check_language(CUDA) does (CUDACXX, then nvcc on PATH, then $CUDA_PATH/bin); its major version
picks the wheel. Everything else is scikit-build-core's own hook.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional

from scikit_build_core.build import *  # noqa: F401,F403  (the PEP 517 hooks we do not change)
from scikit_build_core.build import get_requires_for_build_editable as _skbuild_requires_editable
from scikit_build_core.build import get_requires_for_build_wheel as _skbuild_requires_wheel


def _cuda_mode(config_settings: Optional[Dict[str, object]]) -> str:
    """ZEROSHARD_CUDA as CMake will see it: a -C define wins over the environment."""
    value = (config_settings or {}).get("cmake.define.ZEROSHARD_CUDA")
    if value is None:
        value = os.environ.get("ZEROSHARD_CUDA", "AUTO")
    return str(value).strip().upper() or "AUTO"


def find_nvcc() -> Optional[str]:
    """The CUDA compiler CMake's check_language(CUDA) would pick, or None."""
    cudacxx = os.environ.get("CUDACXX", "").strip()
    if cudacxx:
        return shutil.which(cudacxx.split()[0])
    found = shutil.which("nvcc")
    if found:
        return found
    cuda_path = os.environ.get("CUDA_PATH")
    if cuda_path:
        return shutil.which(os.path.join(cuda_path, "bin", "nvcc"))
    return None


def cuda_major(nvcc: str) -> Optional[str]:
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.", text)
    return match.group(1) if match else None


def nccl_requirements(config_settings: Optional[Dict[str, object]] = None) -> List[str]:
    """['nvidia-nccl-cuXX'] when this build compiles the CUDA variant, else []."""
    if _cuda_mode(config_settings) in ("OFF", "0", "FALSE", "NO"):
        return []
    nvcc = find_nvcc()
    major = cuda_major(nvcc) if nvcc else None
    return [f"nvidia-nccl-cu{major}"] if major else []


def get_requires_for_build_wheel(config_settings=None):
    return list(_skbuild_requires_wheel(config_settings)) + nccl_requirements(config_settings)


def get_requires_for_build_editable(config_settings=None):
    return list(_skbuild_requires_editable(config_settings)) + nccl_requirements(config_settings)
