"""A tiny regression job on the shared Trainer, with the randomness of a diffusion trainer.

Randomness comes from three places, each exercising one part of exact resume: data augmentation drawn
inside `__getitem__` (item seeding), dropout and input noise drawn in the loss (checkpointed RNG state),
and validation drawing random numbers (isolated RNG). Tests run `main` in-process and under torchrun:

    torchrun --standalone --nproc_per_node 2 tests/train_toy_job.py --output_dir out --report_to none
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from torch.utils.data import Dataset

from common.cli import ArgumentParser, parse_args, run
from common.io import atomic_write_json
from common.train import Trainer, TrainingMethod, add_training_args

IN_DIM = 4


class ToyDataset(Dataset):
    """Fixed inputs x: [N, 4] and targets y = sin(x) @ w: [N, 1]; items get random jitter (augmentation)."""

    def __init__(self, num_samples: int, aug_std: float) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(num_samples, IN_DIM, generator=g)
        self.y = torch.sin(self.x) @ torch.randn(IN_DIM, 1, generator=g)
        self.aug_std = aug_std

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i] + self.aug_std * torch.randn(IN_DIM), "y": self.y[i]}


class ToyMethod(TrainingMethod):
    """An MLP with dropout, trained on noised inputs (like a denoiser seeing fresh noise every step)."""

    name = "toy"
    weights_name = "toy_weights"

    def __init__(self, noise_std: float, dropout: float) -> None:
        self.noise_std = noise_std
        self.dropout = dropout

    def setup(self, accelerator: Accelerator) -> None:
        self.raw_net = torch.nn.Sequential(
            torch.nn.Linear(IN_DIM, 32), torch.nn.Tanh(), torch.nn.Dropout(self.dropout), torch.nn.Linear(32, 1)
        ).to(accelerator.device)
        self.net = self.raw_net

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"net": self.net}

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.raw_net.parameters()

    def loss(self, batch: dict[str, torch.Tensor], accelerator: Accelerator) -> torch.Tensor:
        x = batch["x"] + self.noise_std * torch.randn_like(batch["x"])
        return F.mse_loss(self.net(x), batch["y"])

    def eval_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """Noise- and dropout-free loss, to check that training lowers it."""
        self.raw_net.eval()
        with torch.no_grad():
            loss = F.mse_loss(self.raw_net(batch["x"]), batch["y"]).item()
        self.raw_net.train()
        return loss

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return dict(self.raw_net.state_dict())

    def validate(self, step: int) -> list[Image.Image]:
        pixels = (torch.rand(8, 8) * 255).to(torch.uint8).numpy()  # draws on the global RNG on purpose
        return [Image.fromarray(np.asarray(pixels), mode="L")]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_training_args(
        parser, output_dir="toy-output", train_batch_size=3, learning_rate=1e-2, lr_warmup_steps=0,
        dataloader_num_workers=0, checkpointing_steps=0, validation_steps=0,
    )
    parser.add_argument("--num_samples", type=int, default=10, help="dataset size (default: %(default)s)")
    parser.add_argument("--aug_std", type=float, default=0.05, help="jitter added per item (default: %(default)s)")
    parser.add_argument("--noise_std", type=float, default=0.1, help="input noise in the loss (default: %(default)s)")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout probability (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> Trainer:
    args = parse_args(build_parser(), argv)
    trainer = Trainer(args, ToyMethod(args.noise_std, args.dropout), ToyDataset(args.num_samples, args.aug_std))
    trainer.train()
    if trainer.accelerator.is_main_process:
        atomic_write_json(Path(args.output_dir) / "loss_history.json", trainer.history)
    return trainer


if __name__ == "__main__":
    run(main)
