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
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.data_loader import skip_first_batches
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from common.errors import UsageError
from common.train.checkpoints import (
    checkpoint_step,
    prune_checkpoints,
    remove_incomplete,
    resolve_resume,
    save_checkpoint,
)
from common.train.method import TrainingMethod
from common.train.optim import make_lr_scheduler, make_optimizer, scaled_learning_rate
from common.train.rng import ItemSeededDataset, isolated_rng


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
        self.args = args
        self.method = method
        self.output_dir = Path(args.output_dir)
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
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_incomplete(self.output_dir)
        acc.wait_for_everyone()
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

        if not isinstance(train_dataset, IterableDataset):
            train_dataset = ItemSeededDataset(train_dataset, self.data_seed)
        self.train_dataset = train_dataset
        self.train_dataloader = acc.prepare(self._make_dataloader(train_dataset, collate_fn))
        if len(self.train_dataloader) == 0:
            raise UsageError("the training dataset is empty; check the data folder or file list")
        self.steps_per_epoch = math.ceil(len(self.train_dataloader) / args.gradient_accumulation_steps)
        self.max_train_steps = args.max_train_steps or args.num_train_epochs * self.steps_per_epoch
        self.num_train_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)

        lr_factor = (
            scaled_learning_rate(1.0, args.gradient_accumulation_steps, args.train_batch_size, acc.num_processes)
            if args.scale_lr
            else 1.0
        )
        optimizer = make_optimizer(method.trainable_parameters(), args, lr_factor)
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

    def train(self) -> None:
        """Run (or resume) training to `max_train_steps`, then save the final weights into `--output_dir`."""
        args, acc = self.args, self.accelerator
        config = {k: v for k, v in vars(args).items() if isinstance(v, (bool, int, float, str))}
        acc.init_trackers(self.method.name, config=config)
        self._resume()
        first_epoch, steps_done = divmod(self.global_step, self.steps_per_epoch)
        progress = tqdm(
            total=self.max_train_steps, initial=self.global_step, desc="Steps", disable=not acc.is_local_main_process
        )
        losses: list[torch.Tensor] = []
        for epoch in range(first_epoch, self.num_train_epochs):
            if self.global_step >= self.max_train_steps:
                break
            skip = steps_done * args.gradient_accumulation_steps if epoch == first_epoch else 0
            for batch in self._epoch_batches(epoch, skip):
                losses.append(self._micro_step(batch))
                if acc.sync_gradients:
                    self._end_step(torch.stack(losses).mean().item(), progress)
                    losses = []
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
        self.accelerator.print(f"resuming from {path}")
        self.accelerator.load_state(str(path), strict=False)  # checkpoints hold the trainable weights only
        self.global_step = checkpoint_step(path)

    def _epoch_batches(self, epoch: int, skip: int) -> Iterable[Any]:
        if isinstance(self.train_dataset, ItemSeededDataset):
            self.train_dataset.set_epoch(epoch)
        self.train_dataloader.set_epoch(epoch)
        return skip_first_batches(self.train_dataloader, skip) if skip else self.train_dataloader

    def _micro_step(self, batch: Any) -> torch.Tensor:
        acc = self.accelerator
        with acc.accumulate(*self.models):
            loss = self.method.loss(batch, acc)
            acc.backward(loss)
            self.method.after_backward()
            if acc.sync_gradients and self.args.max_grad_norm > 0:
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                acc.clip_grad_norm_(params, self.args.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=self.args.set_grads_to_none)
        return acc.reduce(loss.detach().float(), "mean")

    def _end_step(self, loss: float, progress: tqdm) -> None:
        args, step = self.args, self.global_step + 1
        self.global_step = step
        lr = self.lr_scheduler.get_last_lr()[0]
        self.history.append((step, loss))
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}")
        self.accelerator.log({"loss": loss, "lr": lr}, step=step)
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
