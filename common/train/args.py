"""The training flags of diffusers' example trainers, shared by every method's train script.

Names and defaults follow diffusers' `examples/custom_diffusion/train_custom_diffusion.py` so the original
command lines keep working; a method passes its own paper defaults as keyword overrides.
"""
from __future__ import annotations

import argparse
from typing import Any

from common.cli import nonnegative_int, positive_int

# The schedules of `diffusers.optimization.get_scheduler` that need no extra arguments.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("no", "fp16", "bf16")


def _flags() -> dict[str, dict[str, Any]]:
    """Flag name -> add_argument kwargs, in the order diffusers lists them."""
    return {
        "output_dir": dict(
            type=str, default="custom-diffusion-model",
            help="where checkpoints, logs, validation images and the final weights are written",
        ),
        "seed": dict(type=int, default=42, help="seed for reproducible training (model init, data order, noise)"),
        "overwrite_output_dir": dict(
            action="store_true",
            help="start over in an --output_dir that holds an earlier run, deleting its checkpoints (without it, "
            "such a folder is refused unless you resume)",
        ),
        "train_batch_size": dict(
            type=positive_int, default=4, help="batch size per device for the training dataloader",
        ),
        "num_train_epochs": dict(
            type=positive_int, default=1, help="epochs to train; ignored when --max_train_steps is set",
        ),
        "max_train_steps": dict(
            type=positive_int, default=None, help="total optimizer steps; overrides --num_train_epochs when given",
        ),
        "checkpointing_steps": dict(
            type=nonnegative_int, default=250,
            help="save a resumable checkpoint (output_dir/checkpoint-N) every N optimizer steps; 0 disables",
        ),
        "checkpoints_total_limit": dict(
            type=positive_int, default=None,
            help="keep at most this many checkpoints, deleting the oldest; None keeps all",
        ),
        "resume_from_checkpoint": dict(
            type=str, default=None,
            help='resume from a checkpoint folder, or "latest" for the newest checkpoint in --output_dir '
            "(starts fresh when there is none; refused when the folder holds results but no checkpoint)",
        ),
        "gradient_accumulation_steps": dict(
            type=positive_int, default=1,
            help="micro-batches whose gradients are accumulated before each optimizer step",
        ),
        "gradient_checkpointing": dict(
            action="store_true", help="trade compute for memory by recomputing activations in the backward pass",
        ),
        "learning_rate": dict(type=float, default=1e-5, help="learning rate after the warmup"),
        "scale_lr": dict(
            action="store_true",
            help="multiply the learning rate by gradient accumulation steps x batch size x number of processes",
        ),
        "dataloader_num_workers": dict(
            type=nonnegative_int, default=2, help="data loading subprocesses; 0 loads in the main process",
        ),
        "lr_scheduler": dict(type=str, default="constant", choices=LR_SCHEDULERS, help="learning rate schedule"),
        "lr_warmup_steps": dict(type=int, default=500, help="optimizer steps of linear lr warmup"),
        "lr_num_cycles": dict(type=int, default=1, help="hard restarts of the cosine_with_restarts schedule"),
        "lr_power": dict(type=float, default=1.0, help="power of the polynomial schedule"),
        "use_8bit_adam": dict(action="store_true", help="use bitsandbytes' 8-bit AdamW to save optimizer memory"),
        "adam_beta1": dict(type=float, default=0.9, help="beta1 of AdamW"),
        "adam_beta2": dict(type=float, default=0.999, help="beta2 of AdamW"),
        "adam_weight_decay": dict(type=float, default=1e-2, help="decoupled weight decay of AdamW"),
        "adam_epsilon": dict(type=float, default=1e-08, help="epsilon of AdamW"),
        "max_grad_norm": dict(type=float, default=1.0, help="clip the gradient norm to this value; 0 disables"),
        "logging_dir": dict(
            type=str, default="logs", help="TensorBoard log folder, relative to --output_dir",
        ),
        "allow_tf32": dict(action="store_true", help="allow TF32 matmuls on Ampere+ GPUs (faster, less exact)"),
        "report_to": dict(
            type=str, default="tensorboard",
            help='where to log metrics: "tensorboard", "wandb", "comet_ml", "all", or "none"',
        ),
        "mixed_precision": dict(
            type=str, default=None, choices=MIXED_PRECISIONS,
            help="mixed precision; None uses the accelerate config or `accelerate launch --mixed_precision`",
        ),
        "validation_steps": dict(
            type=nonnegative_int, default=50, help="run the method's validation every N optimizer steps; 0 disables",
        ),
        "set_grads_to_none": dict(
            action="store_true", help="zero gradients by setting them to None, which saves memory",
        ),
    }


def add_training_args(parser: argparse.ArgumentParser, **default_overrides: Any) -> argparse._ArgumentGroup:
    """Add the shared training flags to `parser`; keyword arguments replace defaults, e.g. `learning_rate=1e-4`."""
    flags = _flags()
    unknown = sorted(set(default_overrides) - set(flags))
    if unknown:
        raise TypeError(f"add_training_args got overrides for unknown flags: {', '.join(unknown)}")
    group = parser.add_argument_group("training")
    for name, kwargs in flags.items():
        if name in default_overrides:
            kwargs["default"] = default_overrides[name]
        kwargs["help"] += " (default: %(default)s)"
        group.add_argument(f"--{name}", **kwargs)
    return group
