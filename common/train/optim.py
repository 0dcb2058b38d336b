"""Optimizer and learning-rate schedule from the training flags, as diffusers' example trainers build them."""
from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

import torch

from common.errors import UsageError


def scaled_learning_rate(
    lr: float, gradient_accumulation_steps: int, train_batch_size: int, num_processes: int
) -> float:
    """`--scale_lr`: keep the per-sample step size when the global batch grows."""
    return lr * gradient_accumulation_steps * train_batch_size * num_processes


def _adamw_class(use_8bit: bool) -> type[torch.optim.Optimizer]:
    if not use_8bit:
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UsageError("--use_8bit_adam needs bitsandbytes: pip install -e .[bnb] (or drop the flag)") from None
    return bnb.optim.AdamW8bit


def make_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], args: argparse.Namespace, lr_factor: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW over `params` (tensors or param groups); every learning rate, a group's own included, times `lr_factor`."""
    groups = list(params)
    if groups and isinstance(groups[0], dict):
        groups = [{**g, "lr": g["lr"] * lr_factor} if "lr" in g else g for g in groups]
    return _adamw_class(args.use_8bit_adam)(
        groups,
        lr=args.learning_rate * lr_factor,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, max_train_steps: int, num_processes: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The `--lr_scheduler` schedule over `max_train_steps` optimizer steps.

    Step counts are multiplied by `num_processes` because accelerate's prepared scheduler steps once per
    process per optimizer step (as in diffusers' trainers).
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
