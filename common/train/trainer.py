"""The one training loop every method uses: accelerate for devices, precision, accumulation and processes.

Exact resume (same losses as an uninterrupted run) rests on four things:
- accelerate's `save_state`/`load_state` restore model, optimizer, scheduler, grad scaler and every
  process's python/numpy/torch/CUDA random state, saved at the end of an optimizer step;
- the data order is a pure function of (seed, epoch) (accelerate's seedable sampler), and a resumed run
  skips the batches its epoch already consumed (`skip_first_batches`);
- nothing else draws from the global generators between steps: the DataLoader has its own generator,
  dataset items draw from a state seeded by (seed, epoch, index) (`ItemSeededDataset`), and validation
  runs in an isolated random state;
- the global generators are reseeded after `setup()`, so the training stream does not depend on how much
  randomness model construction used.
The lr schedule is rebuilt from the flags, so resume with the same `--max_train_steps` (and other flags).
Items that depend on the training step get it from the sampler (`common.train.steps`), which stays right
with loader workers running ahead and after a resume.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.data_loader import skip_first_batches
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from common.errors import UsageError
from common.io import short_reason
from common.train.checkpoints import (
    OutputDirLock,
    check_output_dir,
    check_resumable,
    checkpoint_step,
    prune_checkpoints,
    remove_incomplete,
    resolve_resume,
    save_checkpoint,
)
from common.train.method import TrainingMethod
from common.train.optim import make_lr_scheduler, make_optimizer, scaled_learning_rate
from common.train.rng import ItemSeededDataset, isolated_rng
from common.train.steps import tag_steps


def _distributed_without_accelerator() -> bool:
    """True under torchrun on a machine without GPUs: accelerate then needs `cpu=True` to use gloo."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def _keep_trainable_weights(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
    """Checkpoint only what trains: a frozen multi-GB UNet need not be written every N steps."""
    for i, model in enumerate(models):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        trainable |= {n.removeprefix("module.") for n in trainable}
        weights[i] = {k: v for k, v in weights[i].items() if k in trainable}


class Trainer:
    """Train `method` on `train_dataset` with the flags of `add_training_args`; see `TrainingMethod` for hooks.

    Everything up to `accelerator.prepare` happens here, so `trainer.accelerator` is usable before `train()`.
    `history` holds (step, loss) per optimizer step of this run, the loss averaged over micro-batches and
    processes.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        method: TrainingMethod,
        train_dataset: Dataset,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        _check_counts(args)
        check_data = getattr(train_dataset, "check", None)
        if callable(check_data):
            check_data()  # a bad training image is reported now, not after the model loaded
        self.args = args
        self.method = method
        self.output_dir = Path(args.output_dir)
        self._lock: OutputDirLock | None = None
        self._progress: tqdm | None = None
        self.global_step = 0
        self.history: list[tuple[int, float]] = []
        self.data_seed = args.seed if args.seed is not None else torch.initial_seed()
        self.accelerator = acc = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / args.logging_dir)
            ),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=self.data_seed),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=method.find_unused_parameters)],
            cpu=_distributed_without_accelerator(),
        )
        self._claim_output_dir()
        if args.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        if args.seed is not None:
            set_seed(args.seed)  # the same on every process, so model initialisation matches
        method.setup(acc)
        modules = method.modules()
        if not modules:
            raise ValueError(f"{type(method).__name__}.modules() returned no modules to train")
        if args.gradient_checkpointing:
            self._enable_gradient_checkpointing(modules.values())

        wants_step = getattr(train_dataset, "wants_step", False)  # items get StepIndex(index, step)
        if not isinstance(train_dataset, IterableDataset):
            train_dataset = ItemSeededDataset(train_dataset, self.data_seed)
        self.train_dataset = train_dataset
        self.train_dataloader = acc.prepare(self._make_dataloader(train_dataset, collate_fn))
        if len(self.train_dataloader) == 0:
            raise UsageError("the training dataset is empty; check the data folder or file list")
        self.steps_per_epoch = math.ceil(len(self.train_dataloader) / args.gradient_accumulation_steps)
        if wants_step:
            tag_steps(self.train_dataloader, accumulation=args.gradient_accumulation_steps,
                      steps_per_epoch=self.steps_per_epoch)
        self.max_train_steps = args.max_train_steps or args.num_train_epochs * self.steps_per_epoch
        self.num_train_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)

        lr_factor = (
            scaled_learning_rate(1.0, args.gradient_accumulation_steps, args.train_batch_size, acc.num_processes)
            if args.scale_lr
            else 1.0
        )
        build_optimizer = getattr(method, "make_optimizer", None) or make_optimizer  # a method may bring its own
        optimizer = build_optimizer(method.trainable_parameters(), args, lr_factor)
        scheduler = make_lr_scheduler(optimizer, args, self.max_train_steps, acc.num_processes)
        *self.models, self.optimizer, self.lr_scheduler = acc.prepare(*modules.values(), optimizer, scheduler)
        acc.register_save_state_pre_hook(_keep_trainable_weights)
        for name, module in zip(modules, self.models):
            setattr(method, name, module)
        if args.seed is not None:
            set_seed(args.seed, device_specific=True)  # independent noise per process from here on

    def _make_dataloader(self, dataset: Dataset, collate_fn: Callable | None) -> DataLoader:
        # Its own generator keeps iterator creation from drawing on the global one (which the loss uses).
        return DataLoader(
            dataset,
            batch_size=self.args.train_batch_size,
            shuffle=not isinstance(dataset, IterableDataset),
            collate_fn=collate_fn,
            num_workers=self.args.dataloader_num_workers,
            generator=torch.Generator().manual_seed(self.data_seed),
        )

    def _enable_gradient_checkpointing(self, modules: Iterable[torch.nn.Module]) -> None:
        enabled = False
        for module in modules:
            for hook in ("enable_gradient_checkpointing", "gradient_checkpointing_enable"):
                if hasattr(module, hook):
                    getattr(module, hook)()
                    enabled = True
                    break
        if not enabled:
            self.accelerator.print("--gradient_checkpointing: no trained module supports it; the method enables it")

    def _claim_output_dir(self) -> None:
        """Refuse an output folder holding an earlier run (unless resuming or overwriting) or used by a run
        right now; then lock it. The main process decides and tells the others, so all stop together."""
        args, acc = self.args, self.accelerator
        problem = None
        if acc.is_main_process:
            try:
                check_output_dir(self.output_dir, resume=args.resume_from_checkpoint,
                                 overwrite=getattr(args, "overwrite_output_dir", False))
                self._lock = OutputDirLock(self.output_dir).acquire()
                weakref.finalize(self, self._lock.release)
                remove_incomplete(self.output_dir)
            except UsageError as e:
                problem = str(e)
        problem = broadcast_object_list([problem])[0]
        if problem is not None:
            raise UsageError(problem)
        acc.wait_for_everyone()

    def train(self) -> None:
        """Run (or resume) training to `max_train_steps`, then save the final weights into `--output_dir`."""
        try:
            self._train()
        finally:
            if self._progress is not None:
                self._progress.close()  # so an error message starts on its own line, not after the bar
            if self._lock is not None:
                self._lock.release()

    def _train(self) -> None:
        args, acc = self.args, self.accelerator
        config = {k: v for k, v in vars(args).items() if isinstance(v, (bool, int, float, str))}
        acc.init_trackers(self.method.name, config=config)
        self._resume()
        first_epoch, steps_done = divmod(self.global_step, self.steps_per_epoch)
        progress = self._progress = tqdm(
            total=self.max_train_steps, initial=self.global_step, desc="Steps", disable=not acc.is_local_main_process
        )
        losses: list[torch.Tensor] = []
        step_logs: list[dict[str, torch.Tensor]] = []
        for epoch in range(first_epoch, self.num_train_epochs):
            if self.global_step >= self.max_train_steps:
                break
            skip = steps_done * args.gradient_accumulation_steps if epoch == first_epoch else 0
            for batch in self._epoch_batches(epoch, skip):
                if not losses:
                    self.method.on_step_start(self.global_step)
                loss, logs = self._micro_step(batch)
                losses.append(loss)
                step_logs.append(logs)
                if acc.sync_gradients:
                    self._end_step(torch.stack(losses).mean().item(), progress, _mean_logs(step_logs))
                    losses, step_logs = [], []
                    if self.global_step >= self.max_train_steps:
                        break
        progress.close()
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.method.save_final(self.output_dir)
        acc.end_training()

    def _resume(self) -> None:
        path = resolve_resume(self.output_dir, self.args.resume_from_checkpoint)
        if path is None:
            if self.args.resume_from_checkpoint == "latest":
                self.accelerator.print(f"no checkpoint in {self.output_dir}; starting a new training run")
            return
        acc = self.accelerator
        check_resumable(path, [acc.unwrap_model(m) for m in self.models], 1, self.max_train_steps,
                        acc.process_index)
        acc.print(f"resuming from {path}")
        try:
            acc.load_state(str(path), strict=False)  # checkpoints hold the trainable weights only
        except (pickle.UnpicklingError, RuntimeError, KeyError, ValueError, OSError, EOFError) as e:
            raise UsageError(f"cannot resume from {path}: {short_reason(e)}; resume from another checkpoint "
                             "or start over") from None
        self.global_step = checkpoint_step(path)

    def _epoch_batches(self, epoch: int, skip: int) -> Iterable[Any]:
        if isinstance(self.train_dataset, ItemSeededDataset):
            self.train_dataset.set_epoch(epoch)
        self.train_dataloader.set_epoch(epoch)
        return skip_first_batches(self.train_dataloader, skip) if skip else self.train_dataloader

    def _micro_step(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        acc = self.accelerator
        with acc.accumulate(*self.models):
            loss, logs = _split_loss(self.method.loss(batch, acc))
            acc.backward(loss)
            self.method.after_backward()
            if acc.sync_gradients and self.args.max_grad_norm > 0:
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                acc.clip_grad_norm_(params, self.args.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=self.args.set_grads_to_none)
        return acc.reduce(loss.detach().float(), "mean"), _reduce_logs(acc, logs)

    def _end_step(self, loss: float, progress: tqdm, logs: dict[str, float] | None = None) -> None:
        args, step = self.args, self.global_step + 1
        self.global_step = step
        lr = self.lr_scheduler.get_last_lr()[0]
        self.history.append((step, loss))
        progress.update(1)
        logged = {"loss": loss, "lr": lr, **(logs or {})}
        progress.set_postfix({k: f"{v:.3g}" if k == "lr" else f"{v:.4g}" for k, v in logged.items()})
        self.accelerator.log(logged, step=step)
        if args.checkpointing_steps and step % args.checkpointing_steps == 0:
            save_checkpoint(self.accelerator, self.output_dir, step, self.method.save_final)
            if self.accelerator.is_main_process and args.checkpoints_total_limit is not None:
                prune_checkpoints(self.output_dir, args.checkpoints_total_limit)
        if args.validation_steps and step % args.validation_steps == 0 and self.accelerator.is_main_process:
            self._validate(step)

    def _validate(self, step: int) -> None:
        from common.io import atomic_save_image

        with isolated_rng(), torch.no_grad():
            images = self.method.validate(step)
        for i, image in enumerate(images):
            atomic_save_image(image, self.output_dir / "validation" / f"step-{step:06d}_{i}.png")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard" and images:
                stacked = np.stack([np.asarray(image.convert("RGB")) for image in images])
                tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")


def _check_counts(args: argparse.Namespace) -> None:
    """Counts that must be >= 1 (the flags check them too; this covers callers that build args in code):
    --max_train_steps 0 would otherwise train whole epochs, a negative one save untrained weights."""
    for name in ("train_batch_size", "max_train_steps", "num_train_epochs", "gradient_accumulation_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")


def _split_loss(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """`loss()` returns a scalar tensor or (scalar, {name: float | scalar tensor}) of parts to log."""
    if isinstance(out, tuple):
        loss, logs = out
        return loss, dict(logs)
    return out, {}


def _reduce_logs(acc: Accelerator, logs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Logged parts averaged over processes (every process must log the same names)."""
    if not logs:
        return {}
    names = sorted(logs)
    values = torch.stack([torch.as_tensor(logs[k], dtype=torch.float32).detach().reshape(()) for k in names])
    values = acc.reduce(values.to(acc.device), "mean")
    return dict(zip(names, values))


def _mean_logs(step_logs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Each name's mean over the micro-batches of one optimizer step that logged it."""
    names = sorted({k for logs in step_logs for k in logs})
    return {k: torch.stack([logs[k] for logs in step_logs if k in logs]).mean().item() for k in names}
