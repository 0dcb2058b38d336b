"""How much memory a device has, and a one-line refusal when a lower-bound estimate exceeds it.

Samplers use this to refuse an impossible size (a 65536 x 65536 image, a 10^7-pixel-wide canvas) in a line
before spending minutes on it; their estimates are lower bounds, so a run that fits is never refused.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from common.errors import UsageError

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def device_memory_bytes(device: str | torch.device) -> int | None:
    """Total memory of `device`: the GPU's, or for the CPU the machine's (capped by a cgroup limit); None if
    unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for limit in _CGROUP_LIMITS:
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def refuse_if_too_big(need: int, device: str | torch.device, what: str, advice: str) -> None:
    """UsageError (one line) when the lower bound `need` (bytes) exceeds the memory of `device`."""
    have = device_memory_bytes(device)
    if have is not None and need > have:
        gib = 1024 ** 3
        raise UsageError(f"{what} needs at least {need / gib:,.1f} GiB, more than the {have / gib:,.1f} GiB of "
                         f"{torch.device(device).type}; {advice}")
