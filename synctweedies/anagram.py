"""Projections of ambiguous images: views of one canonical image (1-to-1, 1-to-n) or of the mean of a
stack of images (n-to-1, inverted by optimisation)."""
from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from synctweedies.projection import Projection
from synctweedies.views import View


class ViewProjection(Projection):
    """f_i = view_i, g = mean_i inverse_view_i(x_i) (uniform weights). z: [1, C, s, s]."""

    def __init__(self, views: list[View], size: int):
        self.views, self.size, self.num_instances = views, size, len(views)

    def canonical_shape(self, channels: int) -> tuple[int, ...]:
        return (1, channels, self.size, self.size)

    def instance_shape(self, channels: int) -> tuple[int, ...]:
        return (self.num_instances, channels, self.size, self.size)

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.stack([v.view(z[0]) for v in self.views])

    def _inverse(self, xs: torch.Tensor, var_type: str) -> torch.Tensor:
        return torch.stack([v.inverse_view(x) for v, x in zip(self.views, xs)]).mean(0, keepdim=True)


class StackProjection(Projection):
    """n-to-1: z is a stack [K, C, s, s]; f_i(z) = view_i(mean_k z_k). g minimises L1(f(z), x) with Adam.

    One warm start is kept per (var_type, channels) so x_t, eps and x0|t each continue their own optimisation.
    Where we differ from the original by default, and the option that gives the original's behaviour:
    `warm_start` "zero" (first fit starts at 0; original "noise": a N(0, I) stack), `lr_schedule` "cosine"
    (annealed within each call; original "constant"), `noise_scale` "sqrt_k" (z_T members have variance K so
    the mean f sees is N(0, I); original "one": unit members, mean of variance 1/K).
    """

    def __init__(self, views: list[View], size: int, num_of_zs: int = 10, iterations: int = 10, lr: float = 0.1,
                 *, warm_start: str = "zero", lr_schedule: str = "cosine", noise_scale: str = "sqrt_k",
                 generator: torch.Generator | None = None):
        if warm_start not in ("zero", "noise") or lr_schedule not in ("cosine", "constant") or \
                noise_scale not in ("sqrt_k", "one"):
            raise ValueError(f"bad StackProjection options {warm_start!r}, {lr_schedule!r}, {noise_scale!r}")
        self.views, self.size, self.num_of_zs = views, size, num_of_zs
        self.iterations, self.lr = iterations, lr
        self.warm_start, self.lr_schedule, self.noise_scale = warm_start, lr_schedule, noise_scale
        self.generator = generator
        self.num_instances = len(views)
        self.warm: dict[tuple[str, int], torch.Tensor] = {}

    def canonical_shape(self, channels: int) -> tuple[int, ...]:
        return (self.num_of_zs, channels, self.size, self.size)

    def instance_shape(self, channels: int) -> tuple[int, ...]:
        return (self.num_instances, channels, self.size, self.size)

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        mean = z.mean(0)
        return torch.stack([v.view(mean) for v in self.views])

    def _inverse(self, xs: torch.Tensor, var_type: str) -> torch.Tensor:
        key = (var_type, xs.shape[1])
        start = self.warm.get(key)
        if start is None or start.shape[1:] != xs.shape[1:]:
            shape = self.canonical_shape(xs.shape[1])
            start = torch.zeros(shape, dtype=torch.float32) if self.warm_start == "zero" else \
                randn_tensor(shape, generator=self.generator, dtype=torch.float32)
        z = start.detach().to(xs.device, torch.float32).clone().requires_grad_(True)
        target = xs.detach().float()
        opt = torch.optim.Adam([z], lr=self.lr)
        # cosine-annealed within each call: with a constant lr Adam on L1 keeps hovering ~lr/10 off the target
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(self.iterations, 1)) \
            if self.lr_schedule == "cosine" else None
        with torch.enable_grad():
            for _ in range(self.iterations):
                opt.zero_grad()
                loss = (self._forward(z) - target).abs().mean()
                loss.backward()
                opt.step()
                if decay is not None:
                    decay.step()
        self.warm[key] = z.detach()
        return z.detach().to(xs.dtype)

    def draw_warm_starts(self, channels: int, device="cpu", dtype: torch.dtype = torch.float32) -> None:
        """warm_start "noise": draw the N(0, I) starts now, in the original's order (x_t, eps with IF's 2C
        channels, x0|t) right after the initial noise; eps on C channels starts from the first C of its 2C."""
        if self.warm_start != "noise":
            return
        for var_type, c in (("latent", channels), ("eps", 2 * channels), ("tweedie", channels)):
            self.warm[(var_type, c)] = randn_tensor(self.canonical_shape(c), generator=self.generator,
                                                    device=torch.device(device), dtype=dtype).float()
        self.warm[("eps", channels)] = self.warm[("eps", 2 * channels)][:, :channels]

    def canonical_noise(self, channels: int, generator: torch.Generator | None = None, device="cpu",
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A stack whose mean is N(0, I): each member has variance K ("sqrt_k"); "one": unit members (original)."""
        z = randn_tensor(self.canonical_shape(channels), generator=generator, device=torch.device(device), dtype=dtype)
        return z * self.num_of_zs ** 0.5 if self.noise_scale == "sqrt_k" else z
