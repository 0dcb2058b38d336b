"""Refuse a sampling size that cannot fit in memory before spending minutes on it.

The estimate is a lower bound, so it never refuses a run that would fit: decoding holds at least a few
full-resolution activations of the decoder's last block ([B, c, H, W] with c its channel count), plus the
[B, 3, H, W] image. A 65536 x 65536 image from tiny-sd (c = 8) already needs > 400 GiB there.
"""
from __future__ import annotations

import torch

from common.memory import refuse_if_too_big

_ACTIVATIONS_AT_FULL_RES = 3  # a resnet's input, its hidden state and its output


def full_resolution_channels(pipe) -> int:
    """Channels of the network that runs at full pixel resolution: the VAE decoder's last block, or (pixel-space
    models such as DeepFloyd IF) the UNet's first block."""
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        return int(vae.config.block_out_channels[0])
    return int(pipe.unet.config.block_out_channels[0])


def estimate_sampling_bytes(pipe, height: int, width: int, num_images: int, dtype: torch.dtype) -> int:
    """A lower bound on the peak memory of generating `num_images` images of `height` x `width`."""
    bytes_per = torch.tensor([], dtype=dtype).element_size()
    channels = _ACTIVATIONS_AT_FULL_RES * full_resolution_channels(pipe) + 3
    return num_images * height * width * channels * bytes_per


def check_fits(pipe, height: int, width: int, num_images: int, device: str | torch.device,
               dtype: torch.dtype) -> None:
    """UsageError when even the lower-bound estimate exceeds the device's memory."""
    need = estimate_sampling_bytes(pipe, height, width, num_images, dtype)
    refuse_if_too_big(need, device, f"decoding {num_images} image(s) of {width}x{height}",
                      "use a smaller --height/--width (or fewer --num_images)")
