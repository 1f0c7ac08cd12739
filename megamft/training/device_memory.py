"""The peak device memory a step line reports."""

from __future__ import annotations

import psutil
import torch


def memory_gb() -> float:
    """Peak device memory on GPUs and under the strict emulation (since the last reset); else resident memory."""
    from megamft.emulation import cpu_emulation

    if torch.cuda.is_available() or cpu_emulation.is_strict():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30
