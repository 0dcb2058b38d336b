"""Run-time pieces every app shares: device and dtype, seeding, and the reference-attention schedule."""
from __future__ import annotations

import argparse
import random

import numpy as np
import torch

from common.attention.reference import ViewContext
from common.cli import torch_dtype_from_name
from common.errors import UsageError
from common.pipelines.loop import Hook, StepState


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


class ReferenceAttentionSchedule(Hook):
    """Reference-view attention on while t >= (1 - ref_attention_end) T (the first 20 % by default)."""

    def __init__(self, context: ViewContext, ref_attention_end: float, num_train_timesteps: int):
        self.context, self.end, self.T = context, ref_attention_end, num_train_timesteps

    def on_input(self, state: StepState) -> None:
        self.context.reference_enabled = float(state.t) >= (1 - self.end) * self.T
