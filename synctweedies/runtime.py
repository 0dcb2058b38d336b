"""Run-time pieces every app shares: the start (device, dtype, seeding) and finish (args.json, one summary
line) of a run, and flag checks. (The reference-attention schedule lives in common.attention.schedule.)"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.cli import torch_dtype_from_name
from common.errors import UsageError
from common.io import atomic_write_text


def device_of(args: argparse.Namespace) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device(f"cuda:{args.gpu}" if torch.cuda.is_available() else "cpu")


def dtype_of(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    if args.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return torch_dtype_from_name(args.dtype)


def seed_everything(seed: int) -> torch.Generator:
    """main.py seeds everything with 2024 before the app's own seed; sampling noise comes from the generator."""
    random.seed(2024)
    np.random.seed(2024)
    torch.manual_seed(2024)
    return torch.Generator().manual_seed(seed)


def check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"--{name} must be between 0 and 1, got {value}")


@dataclass
class RunStart:
    """What every app's run begins with: where it runs and the seeded generator."""

    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator


def start_run(args: argparse.Namespace, save_top_dir: str, tag: str) -> RunStart:
    """Device, dtype and seeding, the first lines of every app (call after the flags are validated); an existing
    result folder <save_top_dir>/<tag> is refused here, before any model loads."""
    from synctweedies.outputs import check_save_dir

    check_save_dir(save_top_dir, tag, args.save_dir_now)
    device = device_of(args)
    return RunStart(device, dtype_of(args, device), seed_everything(args.seed))


def finish_run(out: Path, args: argparse.Namespace, summary: str) -> None:
    """The last lines of every app: args.json beside the results and one `wrote ...` line."""
    atomic_write_text(out / "args.json", json.dumps(vars(args), indent=2, default=str) + "\n")
    print(f"wrote {summary}")


def derived_rgb_size(args: argparse.Namespace, rgb_flag: str, latent_flag: str, factor: int) -> int:
    """The RGB view size is always latent size x the VAE factor: derive it (None), check it when given."""
    latent, rgb = getattr(args, latent_flag), getattr(args, rgb_flag)
    if rgb is None:
        setattr(args, rgb_flag, latent * factor)
    elif rgb != latent * factor:
        raise UsageError(f"--{rgb_flag} ({rgb}) must be --{latent_flag} ({latent}) x {factor}; leave it out to "
                         "derive it")
    return getattr(args, rgb_flag)
