"""Step-aware data items: each index reaches the dataset with the optimizer step that will consume it.

A dataset whose items change with training progress (MuDI's Seg-Mix switching on at a step) cannot read
the step from the training loop: loader workers run ahead (prefetching) in other processes, and a resumed
run skips batches. The step is instead attached where this process's batches of indices are formed, in the
loader's batch sampler, which runs in the main process and sees every batch in consumption order: the k-th
batch of `epoch` on this process (skipped ones included, padding batches too) trains at optimizer step

    epoch * steps_per_epoch + k // gradient_accumulation_steps

and `__getitem__` receives `StepIndex(index, step)`. `step` counts the optimizer steps completed before the
item is used (0-based): the value the Trainer passes to `TrainingMethod.on_step_start` and holds in
`global_step` while that micro-batch is trained on.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class StepIndex(int):
    """A dataset index (an int, so wrappers that do index arithmetic keep working) carrying `.step`."""

    step: int

    def __new__(cls, index: int, step: int) -> StepIndex:
        obj = super().__new__(cls, index)
        obj.step = int(step)
        return obj

    @property
    def index(self) -> int:
        return int(self)

    def __reduce__(self) -> tuple[Any, ...]:  # loader workers receive indices pickled
        return (StepIndex, (int(self), self.step))

    def __repr__(self) -> str:
        return f"StepIndex(index={int(self)}, step={self.step})"


def split_step_index(index: int) -> tuple[int, int | None]:
    """(index, step) from what `__getitem__` received; step is None for a plain int (no tagging)."""
    return int(index), getattr(index, "step", None)


def _step_tagged_class(cls: type) -> type:
    """A subclass of a loader's batch sampler class (torch's BatchSampler or accelerate's per-process
    BatchSamplerShard) whose batches carry their consumption step."""

    def __iter__(self: Any) -> Iterator[list[StepIndex]]:
        epoch = self._epoch_source.epoch  # read before the seeded sampler starts (it advances when done)
        for k, batch in enumerate(cls.__iter__(self)):
            step = epoch * self._steps_per_epoch + k // self._accumulation
            yield [StepIndex(int(i), step) for i in batch]

    return type(f"StepTagged{cls.__name__}", (cls,), {"__iter__": __iter__, "_step_tagged": True})


def tag_batch_sampler(batch_sampler: Any, *, epoch_source: Any, accumulation: int, steps_per_epoch: int) -> Any:
    """Make `batch_sampler` (in place) yield `StepIndex` batches; `epoch_source.epoch` is the current epoch.

    The class is swapped (to a direct subclass, same layout) rather than wrapped because a DataLoader's batch
    sampler cannot be replaced after construction, and tagging must come after accelerate's sharding (its
    padding of the last batch repeats indices from the epoch's start).
    """
    if not getattr(batch_sampler, "_step_tagged", False):
        batch_sampler.__class__ = _step_tagged_class(type(batch_sampler))
    batch_sampler._epoch_source = epoch_source
    batch_sampler._steps_per_epoch = steps_per_epoch
    batch_sampler._accumulation = accumulation
    return batch_sampler


def tag_steps(dataloader: Any, *, accumulation: int, steps_per_epoch: int) -> None:
    """Tag the batches of an accelerate-prepared map-style dataloader (in place) with their training step."""
    sampler = dataloader.get_sampler()
    if dataloader.batch_sampler is None or sampler is None or not hasattr(sampler, "epoch"):
        raise ValueError("step-aware items (wants_step = True) need a map-style dataset with accelerate's "
                         "seedable sampler")
    tag_batch_sampler(dataloader.batch_sampler, epoch_source=sampler, accumulation=accumulation,
                      steps_per_epoch=steps_per_epoch)
