"""What a method gives the Trainer: the one seam between a method's ideas and the shared training loop."""
from __future__ import annotations

import abc
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from PIL.Image import Image


class TrainingMethod(abc.ABC):
    """Subclass this; the Trainer calls the hooks in this order.

    1. `setup(accelerator)` once, after the Accelerator exists and the seed is set: build randomly initialised
       parameters here (so `--seed` governs them) and move frozen models to `accelerator.device` in the
       compute dtype (`compute_dtype(accelerator)`).
    2. `modules()` and `trainable_parameters()`, once, to build the optimizer and call `accelerator.prepare`.
       The keys of `modules()` are attribute names of the method: the Trainer assigns each prepared (under
       DDP wrapped) module back to that attribute, so `loss` must call `self.<name>(...)` for gradients to be
       synchronised across processes.
    3. Per optimizer step: `on_step_start(step)` (main-loop state only; loader workers never see it), then
       per micro-batch: `loss(batch, accelerator)`, backward, then `after_backward()` (e.g. to zero the
       gradients of embeddings that must not train), then clipping and the optimizer step. A dataset whose
       items depend on the step sets `wants_step = True` and receives `StepIndex(index, step)` in
       `__getitem__` (common.train.steps; right with loader workers and after exact resume).
    4. `validate(step)` on the main process every `--validation_steps`, under no_grad with the random state
       saved and restored, so validating never changes the training run. Use unwrapped modules there
       (`accelerator.unwrap_model`): a DDP forward on one process alone can wait forever for the others.
    5. `save_final(directory)` on the main process into every checkpoint and into `--output_dir` at the end.
    """

    #: Run name for the trackers (TensorBoard logs go to output_dir/logging_dir/<name>).
    name: str = "train"
    #: File stem of the default `save_final` output: `<weights_name>.safetensors`.
    weights_name: str = "weights"
    #: Passed to DDP; set True when some trainable parameters get no gradient in a step.
    find_unused_parameters: bool = False

    def setup(self, accelerator: Accelerator) -> None:
        """Build trainable parts and place frozen ones; runs after seeding, before `modules()`."""

    @abc.abstractmethod
    def modules(self) -> dict[str, torch.nn.Module]:
        """The modules holding trainable parameters, by attribute name; they go through `accelerator.prepare`."""

    @abc.abstractmethod
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]]:
        """Parameters, or optimizer param groups (a group's own "lr" is scaled like `--learning_rate`)."""

    @abc.abstractmethod
    def loss(self, batch: Any, accelerator: Accelerator) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Scalar training loss of one micro-batch, or (loss, {name: float or scalar tensor}).

        The named parts are averaged over the step's micro-batches and the processes (every process must
        return the same names) and shown in the progress bar and sent to the trackers beside "loss" and "lr".
        """

    @abc.abstractmethod
    def state_to_save(self) -> dict[str, torch.Tensor]:
        """The trained weights in the method's own checkpoint key layout."""

    def on_step_start(self, step: int) -> None:
        """Called before the first micro-batch of each optimizer step; `step` = optimizer steps done so far."""

    def after_backward(self) -> None:
        """Edit gradients after each backward pass, before clipping and the optimizer step."""

    def validate(self, step: int) -> list[Image]:
        """Images showing progress at `step`; saved under output_dir/validation and logged."""
        return []

    def save_final(self, directory: str | os.PathLike) -> None:
        """Write the trained weights into `directory` (a checkpoint folder or the output folder)."""
        from common.io import save_weights

        save_weights(self.state_to_save(), Path(directory) / f"{self.weights_name}.safetensors")


def compute_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype for frozen weights under `--mixed_precision` (trainable ones stay float32)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def place_frozen(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Move a frozen model to `device`, casting only when the dtype really changes (diffusers warns on every
    cast, and a same-dtype cast would copy nothing anyway)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
