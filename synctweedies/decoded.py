"""A latent-instance projection that averages in RGB (--average_rgb): decode, project, re-encode.

g(x) = g_rgb(VAE.decode(x)); f(z) = VAE.encode(f_rgb(z)) (a posterior sample). Only Tweedie estimates are
clean images, so this is meant for case 2.
"""
from __future__ import annotations

import torch

from common.pipelines.latents import decode_latents, encode_images
from synctweedies.projection import Projection


class DecodedProjection(Projection):
    """Latent instances [N, 4, s, s] <-> an RGB canonical [1, 3, H, W] through `vae` (chunks of `chunk`)."""

    def __init__(self, rgb: Projection, vae, factor: int, generator: torch.Generator | None = None, chunk: int = 8):
        self.rgb, self.vae, self.factor, self.generator, self.chunk = rgb, vae, factor, generator, chunk
        self.num_instances = rgb.num_instances

    def canonical_shape(self, channels: int) -> tuple[int, ...]:
        return self.rgb.canonical_shape(3)

    def instance_shape(self, channels: int) -> tuple[int, ...]:
        n, _, h, w = self.rgb.instance_shape(3)
        return (n, channels, h // self.factor, w // self.factor)

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        views = self.rgb.forward(z)
        return torch.cat([encode_images(self.vae, v, self.generator) for v in views.split(self.chunk)])

    def _inverse(self, xs: torch.Tensor, var_type: str) -> torch.Tensor:
        rgb = torch.cat([decode_latents(self.vae, x) for x in xs.split(self.chunk)]).to(xs.dtype)
        return self.rgb.inverse(rgb, var_type)

    def sync(self, xs: torch.Tensor, var_type: str = "tweedie") -> torch.Tensor:
        return self.forward(self.inverse(xs, var_type)).to(xs.dtype)
