"""What a denoiser conditions on, as one typed object, built by one registered builder per model family.

Text embeddings come from the pipelines' own `encode_prompt` (tokenisation, clip-skip and padding match
diffusers exactly); SDXL adds its size conditions (time ids); image-prompt embeddings (IP-Adapter) and the
per-call attention state (an AttentionPlan, entity token indices, a K/V bank) ride along. The denoisers
batch it for CFG once (`.cfg()`), pass image embeds to a UNet as `added_cond_kwargs["image_embeds"]` and the
attention state as `cross_attention_kwargs` (UNet) / `joint_attention_kwargs` (FLUX): nothing per call is
stored on a processor. A new family registers a `FamilyBuilder` in `FAMILY_BUILDERS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import torch

from common.models.loading import pipeline_family

TensorList = list[torch.Tensor]


@dataclass
class Conditioning:
    """Everything one denoiser call conditions on. Shapes: embeds [B, L, D]; pooled [B, P];
    text_ids [L, 3] (FLUX); time_ids [B, 6] (SDXL); image_embeds: one entry per loaded IP-Adapter,
    diffusers' `ip_adapter_image_embeds` layout [B, n_images, T, D] or [B, T, D] (positive rows; the
    negative rows in `negative_image_embeds`, zeros when None); attention: per-call attention state for the
    processors, e.g. {"plan": AttentionPlan, "kv_bank": KVBank, "ip_token_index": ...};
    negative_attention: for a separate negative pass (FLUX true CFG; None = same as `attention`).

    `negative*` are None when classifier-free guidance is off (or, for FLUX-dev, when no true CFG is used).
    After `.cfg()` every batched field holds [negative; positive] and the negatives are None.
    """

    family: str
    embeds: torch.Tensor
    negative: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    negative_text_ids: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    negative_time_ids: torch.Tensor | None = None
    image_embeds: TensorList | None = None
    negative_image_embeds: TensorList | None = None
    attention: dict[str, Any] = field(default_factory=dict)
    negative_attention: dict[str, Any] | None = None

    @property
    def has_negative(self) -> bool:
        return self.negative is not None

    def cfg(self) -> "Conditioning":
        """The [negative; positive] batch the originals feed the UNet (positive only when no negative)."""
        if self.negative is None:
            return self
        cat = lambda neg, pos: None if pos is None else torch.cat([pos.new_zeros(pos.shape) if neg is None else neg,
                                                                   pos])
        images = None
        if self.image_embeds is not None:
            negs = self.negative_image_embeds or [None] * len(self.image_embeds)
            images = [cat(n, p) for n, p in zip(negs, self.image_embeds)]
        time_ids = None if self.time_ids is None else cat(
            self.time_ids if self.negative_time_ids is None else self.negative_time_ids, self.time_ids)
        return replace(self, embeds=torch.cat([self.negative, self.embeds]), negative=None,
                       pooled=cat(self.negative_pooled, self.pooled), negative_pooled=None, time_ids=time_ids,
                       negative_time_ids=None, image_embeds=images, negative_image_embeds=None)

    def positive(self) -> "Conditioning":
        """The conditional rows only (guidance off)."""
        return replace(self, negative=None, negative_pooled=None, negative_text_ids=None, negative_time_ids=None,
                       negative_image_embeds=None, negative_attention=None)

    def added_cond_kwargs(self) -> dict[str, Any] | None:
        """UNet `added_cond_kwargs`: SDXL text_embeds + time_ids, and image_embeds when an IP-Adapter is used."""
        added: dict[str, Any] = {}
        if self.time_ids is not None:
            added.update(text_embeds=self.pooled, time_ids=self.time_ids)
        if self.image_embeds is not None:
            added["image_embeds"] = self.image_embeds
        return added or None

    def to(self, device=None, dtype=None) -> "Conditioning":
        def move(t):
            if isinstance(t, list):
                return [move(x) for x in t]
            if not isinstance(t, torch.Tensor):
                return t
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)
                                if f.name not in ("family", "attention", "negative_attention")})


# ------------------------------------------------------------------------------------ family builders

Encoder = Callable[..., Conditioning]


@dataclass
class FamilyBuilder:
    """How one model family conditions: `encode(pipe, prompts, negatives, *, do_cfg, n, device, clip_skip,
    max_sequence_length) -> Conditioning` and, where the family has them, size conditions
    `size(pipe, cond, height, width) -> Conditioning` (SDXL's time ids)."""

    encode: Encoder
    size: Callable[[Any, Conditioning, int, int], Conditioning] | None = None


def _encode_sd(pipe, prompts, negatives, *, do_cfg, n, device, clip_skip, max_sequence_length):
    pos, neg = pipe.encode_prompt(prompts, device, n, do_cfg, negatives, clip_skip=clip_skip)
    return Conditioning("sd", pos, neg if do_cfg else None)


def _encode_sdxl(pipe, prompts, negatives, *, do_cfg, n, device, clip_skip, max_sequence_length):
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompts, device=device, num_images_per_prompt=n, do_classifier_free_guidance=do_cfg,
        negative_prompt=negatives, clip_skip=clip_skip)
    return Conditioning("sdxl", pos, neg if do_cfg else None, pooled, neg_pooled if do_cfg else None)


def _sdxl_time_ids(pipe, cond: Conditioning, height: int, width: int) -> Conditioning:
    """SDXL micro-conditioning as diffusers' pipeline builds it: original size = target size, no crop."""
    proj_dim = pipe.text_encoder_2.config.projection_dim
    ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.embeds.dtype,
                                 text_encoder_projection_dim=proj_dim).to(cond.embeds.device)
    ids = ids.repeat(cond.embeds.shape[0], 1)
    return replace(cond, time_ids=ids, negative_time_ids=ids if cond.has_negative else None)


def _encode_flux(pipe, prompts, negatives, *, do_cfg, n, device, clip_skip, max_sequence_length):
    """FLUX-dev is guidance-distilled: its negative is only encoded when `do_cfg` (true CFG) is asked for."""
    max_len = max_sequence_length or min(512, pipe.tokenizer_2.model_max_length)
    pos, pooled, ids = pipe.encode_prompt(prompts, prompts, device=device, num_images_per_prompt=n,
                                          max_sequence_length=max_len)
    if not do_cfg:
        return Conditioning("flux", pos, pooled=pooled, text_ids=ids)
    negs = negatives or [""] * len(prompts)
    neg, neg_pooled, neg_ids = pipe.encode_prompt(negs, negs, device=device, num_images_per_prompt=n,
                                                  max_sequence_length=max_len)
    return Conditioning("flux", pos, neg, pooled, neg_pooled, ids, neg_ids)


def _encode_if(pipe, prompts, negatives, *, do_cfg, n, device, clip_skip, max_sequence_length):
    pos, neg = pipe.encode_prompt(prompts, do_classifier_free_guidance=do_cfg, num_images_per_prompt=n,
                                  device=device, negative_prompt=negatives, clean_caption=False)
    return Conditioning(pipeline_family(pipe), pos, neg if do_cfg else None)


FAMILY_BUILDERS: dict[str, FamilyBuilder] = {
    "sd": FamilyBuilder(_encode_sd),
    "sdxl": FamilyBuilder(_encode_sdxl, _sdxl_time_ids),
    "flux": FamilyBuilder(_encode_flux),
    "if": FamilyBuilder(_encode_if),
    "if-sr": FamilyBuilder(_encode_if),
}


def register_family(name: str, builder: FamilyBuilder) -> None:
    FAMILY_BUILDERS[name] = builder


def _as_list(prompts: str | list[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def split_image_embeds(embeds: TensorList, batch: int, do_cfg: bool) -> tuple[TensorList, TensorList | None]:
    """diffusers' `ip_adapter_image_embeds` ([negative; positive] along dim 0 when CFG) -> (positive,
    negative) lists, each entry repeated to `batch` rows as diffusers' pipelines do."""
    pos, neg = [], [] if do_cfg else None
    for e in embeds:
        if do_cfg:
            n, e = e.chunk(2)
            neg.append(torch.cat([n] * batch))
        pos.append(torch.cat([e] * batch))
    return pos, neg


def build_conditioning(pipe, prompts: str | list[str], negative_prompts: str | list[str] | None = None, *,
                       do_cfg: bool = True, num_images_per_prompt: int = 1, device=None,
                       clip_skip: int | None = None, max_sequence_length: int | None = None,
                       family: str | None = None, height: int | None = None, width: int | None = None,
                       image_embeds: TensorList | None = None, negative_image_embeds: TensorList | None = None,
                       attention: dict[str, Any] | None = None) -> Conditioning:
    """Encode `prompts` (and negatives) with `pipe`'s text encoders through the family's builder; with
    `height`/`width` add the family's size conditions; attach image embeds (per adapter, [B, ...] rows
    matching the prompt batch) and the per-call attention state."""
    family = family or pipeline_family(pipe)
    try:
        builder = FAMILY_BUILDERS[family]
    except KeyError:
        raise ValueError(f"unknown family {family}; known: {sorted(FAMILY_BUILDERS)}") from None
    device = device or pipe._execution_device
    prompts = _as_list(prompts)
    negatives = None if negative_prompts is None else _as_list(negative_prompts)
    cond = builder.encode(pipe, prompts, negatives, do_cfg=do_cfg, n=num_images_per_prompt, device=device,
                          clip_skip=clip_skip, max_sequence_length=max_sequence_length)
    if builder.size is not None and height is not None and width is not None:
        cond = builder.size(pipe, cond, height, width)
    if image_embeds is not None:
        cond = replace(cond, image_embeds=list(image_embeds),
                       negative_image_embeds=None if negative_image_embeds is None else list(negative_image_embeds))
    if attention:
        cond = replace(cond, attention=dict(attention))
    return cond
