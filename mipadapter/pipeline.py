"""Sampling with a MIP-Adapter on an SDXL pipeline: entity words, per-object image tokens, the per-call state,
and the shared loop (common.pipelines) with an optional step range for the image branch.

`generate(pipe, adapter, encoder, prompt, references, words, ...)` is the reimplementation of the original
`generate(prompt, reference_images, entity_words, scale)` for any number K of (images, word) pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import PIL.Image
import torch
import torch.nn.functional as F

from common.models.image_encoders import ImageEncoder
from common.pipelines.conditioning import build_conditioning
from common.pipelines.loop import sample
from common.pipelines.text2image import decode, prepare, to_pil
from mipadapter.model import MIPAdapter, object_tokens
from mipadapter.processor import STATE_KEY, MIPState

NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
#: The original's IPAdapterXL.generate takes no guidance_scale and IPAdapterPlusXL.generate swallows its 7.5
#: without passing it on, so every original sample ran at StableDiffusionXLPipeline's default.
GUIDANCE_SCALE = 5.0


def entity_lengths(pipe: Any, words: Sequence[str]) -> torch.Tensor:
    """L_k: tokens of each word under tokenizer 1, BOS/EOS excluded (spec §3.4). long [K]."""
    return torch.tensor([len(pipe.tokenizer(w).input_ids) - 2 for w in words], dtype=torch.long)


@torch.no_grad()
def encode_entities(pipe: Any, words: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each word encoded alone exactly like a prompt (both SDXL encoders, penultimate states, concatenated), and
    the "" encoding for the unconditional half: ([K, 77, D], [K, 77, D])."""
    embeds = build_conditioning(pipe, [*words, ""], do_cfg=False).embeds
    return embeds[:-1], embeds[-1:].expand(len(words), -1, -1)


@torch.no_grad()
def encode_references(adapter: MIPAdapter, encoder: ImageEncoder, references: Sequence[Sequence[Any]]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference images per object -> (tokens, negative tokens), each [K, T, D]. An object's images are projected
    one by one and their tokens averaged; the negative tokens project zero pooled features (sdxl) or the features
    of an all-zero pixel image (sdxl_plus), as the original's unconditional image prompt."""
    feature = adapter.variant.feature
    pos = [encoder.encode(list(images), feature) for images in references]
    neg = [encoder.encode_negative(list(images)[:1], feature) for images in references]
    return object_tokens(adapter.image_proj, pos), object_tokens(adapter.image_proj, neg)


def build_state(pipe: Any, adapter: MIPAdapter, encoder: ImageEncoder, references: Sequence[Sequence[Any]],
                words: Sequence[str], *, batch: int, scale: float | None = None, masks: torch.Tensor | None = None,
                latent_hw: tuple[int, int] | None = None, lengths: torch.Tensor | None = None) -> MIPState:
    """The per-call state for `batch` positive rows (same references for every row). masks: [K, h, w] or None;
    lengths: long [batch, K] entity token lengths per row (default: each word's own length, entity_lengths)."""
    if len(references) != len(words):
        raise ValueError(f"{len(references)} reference groups but {len(words)} entity words")
    tokens, negative = encode_references(adapter, encoder, references)
    embeds, empty = encode_entities(pipe, words)
    device = pipe._execution_device
    rows = lambda t: t[None].expand(batch, *t.shape).to(device).contiguous()
    if lengths is None:
        lengths = rows(entity_lengths(pipe, words))
    elif tuple(lengths.shape) != (batch, len(words)):
        raise ValueError(f"lengths has shape {tuple(lengths.shape)}, expected {(batch, len(words))}")
    return MIPState(rows(tokens), rows(embeds), lengths.to(device, torch.long), negative_tokens=rows(negative),
                    negative_entity_embeds=rows(empty), masks=None if masks is None else rows(masks.float()),
                    latent_hw=latent_hw, scale=scale)


@dataclass
class WeightMaps:
    """Running mean of w^k over layers and steps for the conditional rows, at the latent resolution [B, K, h, w]."""

    latent_hw: tuple[int, int]
    total: torch.Tensor | None = None
    count: int = 0
    records: dict = field(default_factory=dict)

    def collect(self, positive_rows: int) -> None:
        h, w = self.latent_hw
        for layer in self.records.values():
            for rec in layer:
                weights = rec["w"][-positive_rows:].float()  # conditional half (negative rows come first)
                n = weights.shape[-1]
                f = int(round((h * w / n) ** 0.5))
                grid = weights.reshape(*weights.shape[:2], -(-h // f), -(-w // f))
                up = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False).cpu()
                self.total = up if self.total is None else self.total + up
                self.count += 1
        self.records.clear()

    def mean(self) -> torch.Tensor | None:
        return None if self.total is None else self.total / self.count


class StepRangeDenoiser:
    """The image branch only inside [start, end) of the schedule (fractions; as diffusers' control_guidance
    start/end), by flipping the per-call state; optionally folds the weight maps after each call."""

    def __init__(self, inner: Any, state: MIPState, start: float, end: float, num_steps: int,
                 maps: WeightMaps | None = None, positive_rows: int = 1):
        self.inner, self.state, self.start, self.end, self.num_steps = inner, state, start, end, num_steps
        self.maps, self.positive_rows = maps, positive_rows

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        self.state.enabled = not (step / self.num_steps < self.start or (step + 1) / self.num_steps > self.end)
        out = self.inner(x_t, t, step)
        if self.maps is not None:
            self.maps.collect(self.positive_rows)
        return out


@torch.no_grad()
def generate(pipe: Any, adapter: MIPAdapter, encoder: ImageEncoder, prompt: str | list[str], references: Sequence[Sequence[Any]],
             words: Sequence[str], *, scale: float, num_samples: int = 1, num_inference_steps: int = 30,
             guidance_scale: float = GUIDANCE_SCALE, seed: int | None = 420, height: int | None = None, width: int | None = None,
             negative_prompt: str | None = NEGATIVE_PROMPT, masks: torch.Tensor | None = None,
             ip_step_range: tuple[float, float] = (0.0, 1.0), weight_maps: bool = False, progress: bool = True,
             generator: torch.Generator | None = None, lengths: torch.Tensor | None = None
             ) -> tuple[list[PIL.Image.Image], torch.Tensor | None]:
    """`num_samples` images per prompt (one prompt or a batch) with K references (object k = images
    references[k], word words[k]); returns the PIL images and, with weight_maps, the mean routing weights
    [images, K, h, w]. lengths: long [prompts, K] entity token lengths per prompt (default: the words' own)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    device = pipe._execution_device
    if generator is None and seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    from common.pipelines.text2image import default_size

    dh, dw = default_size(pipe)
    height, width = height or dh, width or dw
    latent_hw = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    rows = len(prompts) * num_samples
    if lengths is not None:
        lengths = lengths.repeat_interleave(num_samples, dim=0)  # the original repeats each prompt's indexes
    state = build_state(pipe, adapter, encoder, references, words, batch=rows, scale=scale, masks=masks,
                        latent_hw=latent_hw, lengths=lengths)
    negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
    setup = prepare(pipe, prompts, negatives, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, height=height, width=width, generator=generator,
                    num_images_per_prompt=num_samples, attention={STATE_KEY: state})
    maps = WeightMaps(latent_hw) if weight_maps else None
    if maps is not None:
        state.debug = maps.records
    denoiser = StepRangeDenoiser(setup.denoiser, state, *ip_step_range, len(setup.timesteps), maps, rows)
    x0 = sample(denoiser, pipe.scheduler, setup.x_T, setup.timesteps, extra_step_kwargs=setup.extra_step_kwargs,
                progress=progress)
    images = to_pil(decode(pipe, setup, x0))
    return images, None if maps is None else maps.mean()
