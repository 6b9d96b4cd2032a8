"""Facts about the machine a run is on (no fisherlab knowledge): the memory that is free now."""

from __future__ import annotations

__all__ = ["available_memory"]


def available_memory(device=None) -> int | None:
    """Free memory in bytes: ``MemAvailable`` of ``/proc/meminfo`` on the CPU, the free memory of a
    CUDA device (``torch.cuda.mem_get_info``) for one; ``None`` where unknown."""
    if device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda":
        try:
            import torch

            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # pragma: no cover - no driver
            return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        pass
    return None
