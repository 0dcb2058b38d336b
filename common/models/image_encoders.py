"""CLIP image encoders for image prompts (IP-Adapter, MIP-Adapter): load one, turn images into image embeds.

Two features are used, as the released IP-Adapters expect (spec mipadapter §2.3):
* "pooled" -- `image_embeds`, the projected pooled output [N, projection_dim] (IP-Adapter SDXL: ViT-bigG/14);
* "penultimate" -- `hidden_states[-2]`, all tokens of the penultimate layer [N, 1 + patches, hidden]
  (IP-Adapter plus: ViT-H/14).
Preprocessing is transformers' `CLIPImageProcessor` (diffusers' pipelines build the same default one when the
encoder folder ships none). Presets: `clip-vit-h-14`, `clip-vit-bigg-14` (folders of h94/IP-Adapter) and the
random-weight `tiny-clip-vision-h`, `tiny-clip-vision-g` built in common.models.tiny.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import PIL.Image
import torch
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from common.errors import UsageError
from common.models.loading import load_model, resolve_spec
from common.models.presets import PRESETS, is_tiny

FEATURES = ("pooled", "penultimate")
ImageInput = PIL.Image.Image | torch.Tensor | Sequence[PIL.Image.Image]


def default_processor(image_size: int) -> CLIPImageProcessor:
    """What diffusers' `load_ip_adapter` builds: resize the short side, centre crop, CLIP mean/std."""
    return CLIPImageProcessor(size=image_size, crop_size=image_size)


@dataclass
class ImageEncoder:
    """A CLIP vision model with its preprocessing. `encode` gives the features an image projection takes."""

    model: CLIPVisionModelWithProjection
    processor: CLIPImageProcessor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pixel_values(self, images: ImageInput) -> torch.Tensor:
        """PIL image(s) -> [N, 3, S, S] normalised; a tensor is taken as already preprocessed."""
        if isinstance(images, torch.Tensor):
            pixels = images if images.dim() == 4 else images[None]
        else:
            images = [images] if isinstance(images, PIL.Image.Image) else list(images)
            if not images:
                raise UsageError("no reference image given")
            pixels = self.processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        return pixels.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode(self, images: ImageInput, feature: str = "pooled") -> torch.Tensor:
        """pooled: [N, projection_dim]; penultimate: [N, 1 + patches, hidden]."""
        if feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
        return self._features(self.pixel_values(images), feature)

    @torch.no_grad()
    def encode_negative(self, images: ImageInput, feature: str = "pooled") -> torch.Tensor:
        """The unconditional features CFG uses, shaped like `encode`'s: zeros for pooled; for penultimate the
        encoder's features of an all-zero pixel input (as IP-Adapter plus and diffusers do)."""
        pixels = self.pixel_values(images)
        if feature == "pooled":
            return torch.zeros_like(self._features(pixels, feature))
        return self._features(torch.zeros_like(pixels), feature)

    def _features(self, pixels: torch.Tensor, feature: str) -> torch.Tensor:
        if feature == "pooled":
            return self.model(pixels).image_embeds
        return self.model(pixels, output_hidden_states=True).hidden_states[-2]


def _processor_for(source: str, subfolder: str | None, image_size: int) -> CLIPImageProcessor:
    """The folder's own preprocessor_config.json when it has one, else diffusers' default."""
    folder = Path(source, subfolder or "")
    if (folder / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(str(folder))
    return default_processor(image_size)


def load_image_encoder(spec: str | ImageEncoder, *, torch_dtype: torch.dtype | None = None,
                       device: str | torch.device | None = None, subfolder: str | None = None) -> ImageEncoder:
    """An ImageEncoder from a preset (`clip-vit-h-14`, `tiny-clip-vision-g`, ...), a hub id (+ subfolder) or a
    folder holding a CLIPVisionModelWithProjection (config.json + weights)."""
    if isinstance(spec, ImageEncoder):
        enc = spec
    else:
        preset = PRESETS.get(spec)
        if preset is not None and preset.family != "image-encoder":
            raise UsageError(f"'{spec}' is a {preset.family} model, not an image encoder; use one of "
                             + ", ".join(n for n, p in PRESETS.items() if p.family == "image-encoder"))
        if preset is not None and preset.subfolder and subfolder is None:
            subfolder = preset.subfolder
        try:
            model = load_model(spec, CLIPVisionModelWithProjection, torch_dtype=torch_dtype, subfolder=subfolder)
        except UsageError as err:
            if preset is None or not preset.subfolder or "local Hugging Face cache" not in str(err):
                raise
            raise UsageError(f"image encoder '{spec}' ({preset.hub_id}/{preset.subfolder}) is not in the local "
                             f"Hugging Face cache; on a machine with internet run `hf download {preset.hub_id} "
                             f"--include '{preset.subfolder}/*'` and copy the cache (HF_HOME), or pass a local "
                             "folder") from None
        source = resolve_spec(spec)
        processor = (default_processor(model.config.image_size) if is_tiny(spec) or not os.path.isdir(source)
                     else _processor_for(source, subfolder, model.config.image_size))
        enc = ImageEncoder(model.eval(), processor)
    if torch_dtype is not None or device is not None:
        enc.model.to(device=device, dtype=torch_dtype)
    return enc


def save_image_encoder(encoder: ImageEncoder, folder: str | os.PathLike) -> Path:
    """Write the model and its preprocessing so `load_image_encoder(folder)` reads them back."""
    folder = Path(folder)
    encoder.model.save_pretrained(folder)
    encoder.processor.save_pretrained(folder)
    return folder


def image_encoder_info(encoder: ImageEncoder) -> dict[str, Any]:
    """Feature sizes an image projection checks against: projection_dim (pooled) and hidden_size (penultimate)."""
    cfg = encoder.model.config
    return {"projection_dim": cfg.projection_dim, "hidden_size": cfg.hidden_size, "image_size": cfg.image_size}
