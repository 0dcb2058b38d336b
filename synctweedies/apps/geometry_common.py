"""What the mesh and Gaussian apps share: SD + ControlNet loading, the ControlNet spec with the 0.7 -> 0.9
scale schedule, the solid-colour latents SyncMVD composites behind objects, and x0|t previews."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common.errors import UsageError
from common.io import atomic_save_image
from common.pipelines.denoisers import ControlSpec
from common.pipelines.latents import decode_latents, encode_images
from common.pipelines.loop import Hook, StepState
from synctweedies.apps.loading import load_sd
from synctweedies.apps.panorama import scale_schedule
from synctweedies.apps.wide_image import unet_multiple
from synctweedies.outputs import sheet
from synctweedies.runtime import derived_rgb_size

CONTROLNETS = {"depth": "controlnet-depth-sd15", "normal": "lllyasviel/control_v11p_sd15_normalbae"}

# SyncMVD's background colours in [-1, 1]
COLORS = {"black": (-1, -1, -1), "white": (1, 1, 1), "maroon": (0, -1, -1), "red": (1, -1, -1),
          "olive": (0, 0, -1), "yellow": (1, 1, -1), "green": (-1, 0, -1), "lime": (-1, 1, -1), "teal": (-1, 0, 0),
          "aqua": (-1, 1, 1), "navy": (-1, -1, 0), "blue": (-1, -1, 1), "purple": (0, -1, 0), "fuchsia": (1, -1, 1)}

# Linear latent -> RGB map of SD 1.x/2.x latents (the usual fast-preview approximation).
LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                           [-0.184, -0.271, -0.473]])


def load_control_pipeline(args: argparse.Namespace, device, dtype):
    """SD 1.5 + a ControlNet for --cond_type (--model controlnet), or a preset (tiny-sd pairs with tiny-controlnet),
    with DDIM timesteps, the --adapters applied, and --latent_view_size / --rgb_view_size checked against it
    (--rgb_view_size derived when left out)."""
    pipe, controlnet = load_sd(args, device, dtype, original="controlnet", what=f"--app {args.app}",
                               controlnet=args.controlnet_path or CONTROLNETS[args.cond_type])
    derived_rgb_size(args, "rgb_view_size", "latent_view_size", pipe.vae_scale_factor)
    if args.latent_view_size % unet_multiple(pipe.unet):
        raise UsageError(f"--latent_view_size must be a multiple of {unet_multiple(pipe.unet)}")
    return pipe, controlnet


def control_spec(args: argparse.Namespace, controlnet, images: torch.Tensor) -> ControlSpec:
    """images [N, 3, S, S] in [0, 1]; the scale runs from --conditioning_scale to --conditioning_scale_end."""
    return ControlSpec(controlnet, images, scale_schedule(args.conditioning_scale, args.conditioning_scale_end),
                       args.control_guidance_start, args.control_guidance_end, args.guess_mode)


@torch.no_grad()
def color_latents(vae, size: int, names=tuple(COLORS), generator: torch.Generator | None = None) -> dict:
    """name -> latent [C, size/8, size/8] of a solid colour image of `size` px (posterior mode)."""
    imgs = torch.stack([torch.tensor(COLORS[n], dtype=torch.float32).view(3, 1, 1).expand(3, size, size)
                        for n in names]).to(vae.device, vae.dtype)
    lat = encode_images(vae, imgs, generator, sample=False)
    return dict(zip(names, lat))


def fast_rgb(latents: torch.Tensor) -> torch.Tensor:
    """SD latents [B, 4, h, w] -> rough RGB [B, 3, h, w] in [-1, 1] without the VAE."""
    return torch.einsum("bchw,cd->bdhw", latents.float(), LATENT_RGB.to(latents.device)).clamp(-1, 1)


class PreviewHook(Hook):
    """Every `interval` steps save the x0|t views as one sheet (fast linear preview or a VAE decode)."""

    def __init__(self, folder: Path, interval: int, vae=None, fast: bool = True, chunk: int = 8):
        self.folder, self.interval, self.vae, self.fast, self.chunk = folder, interval, vae, fast, chunk

    def on_x0(self, state: StepState) -> None:
        if self.interval <= 0 or state.i % self.interval:
            return
        x0 = state.x0
        if self.fast or self.vae is None:
            img = fast_rgb(x0)
        else:
            with torch.no_grad():
                img = torch.cat([decode_latents(self.vae, x) for x in x0.split(self.chunk)]).float()
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_save_image(sheet(img.clamp(-1, 1).cpu(), pad=2), self.folder / f"step_{state.i:03d}.png")
