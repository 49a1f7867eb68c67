"""Process memory: the measured side of memory_report(), next to its model-state arithmetic.

On CPU the process's resident set (RSS) and its high-water mark, from /proc/self/status (Linux;
elsewhere getrusage's peak only). On CUDA torch's allocator counters for the optimizer's device:
bytes in tensors (allocated) and bytes the caching allocator holds (reserved), now and at peak.
The CPU peak covers the whole process (torch's runtime, activations, the data loader), so it is
the number a user compares with the machine's memory, not with the model-state breakdown alone.
"""
from __future__ import annotations

import resource
from typing import Dict, Optional

import torch

_STATUS = "/proc/self/status"


def _status_bytes(field: str) -> Optional[int]:
    try:
        with open(_STATUS) as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def measured(device: torch.device) -> Dict[str, object]:
    """{"kind": "rss"|"cuda", "peak_bytes", "current_bytes"} (+ reserved on CUDA)."""
    if device.type == "cuda":
        return {"kind": "cuda",
                "peak_bytes": int(torch.cuda.max_memory_allocated(device)),
                "current_bytes": int(torch.cuda.memory_allocated(device)),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
                "reserved_bytes": int(torch.cuda.memory_reserved(device))}
    peak = _status_bytes("VmHWM")
    if peak is None:  # not Linux: getrusage's peak (kB on Linux, bytes on macOS)
        scale = 1 if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 2 ** 32 else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    current = _status_bytes("VmRSS")
    current = peak if current is None else current
    # The kernel folds RSS into the high-water mark lazily: a fresh VmRSS can exceed VmHWM.
    return {"kind": "rss", "peak_bytes": int(max(peak, current)), "current_bytes": int(current)}


def reset_peak(device: torch.device) -> bool:
    """Starts the peak over from the current value; False where the platform cannot (the CPU
    high-water mark resets through /proc/self/clear_refs, Linux 4.0+)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False
