"""Prompt encoding for SD, SDXL, FLUX and DeepFloyd IF through the pipelines' own `encode_prompt`.

We call diffusers' encoders (so tokenisation, clip-skip, LoRA scale and padding match it exactly) and
hold the result in one dataclass that every denoiser understands.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from common.models.loading import pipeline_family


@dataclass
class PromptEmbeds:
    """Encoded prompts of one family. Shapes: embeds [B, L, D]; pooled [B, P]; text_ids [L, 3] (FLUX).

    `negative*` are None when classifier-free guidance is off (or, for FLUX-dev, when no true CFG is used).
    """

    family: str
    embeds: torch.Tensor
    negative: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    negative_text_ids: torch.Tensor | None = None

    @property
    def has_negative(self) -> bool:
        return self.negative is not None

    def cfg(self) -> "PromptEmbeds":
        """The [negative; positive] batch the originals feed the UNet (positive only when no negative)."""
        if self.negative is None:
            return self
        pooled = None if self.pooled is None else torch.cat([self.negative_pooled, self.pooled])
        return replace(self, embeds=torch.cat([self.negative, self.embeds]), negative=None, pooled=pooled,
                       negative_pooled=None)

    def to(self, device=None, dtype=None) -> "PromptEmbeds":
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return PromptEmbeds(self.family, *(move(getattr(self, f)) for f in
                                           ("embeds", "negative", "pooled", "negative_pooled", "text_ids",
                                            "negative_text_ids")))


def _as_list(prompts: str | list[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def encode_prompt(pipe, prompts: str | list[str], negative_prompts: str | list[str] | None = None, *,
                  do_cfg: bool = True, num_images_per_prompt: int = 1, device=None, clip_skip: int | None = None,
                  max_sequence_length: int | None = None, family: str | None = None) -> PromptEmbeds:
    """Encode `prompts` (and negatives) with `pipe`'s text encoders.

    FLUX-dev is guidance-distilled: its negative is only encoded when `do_cfg` (true CFG) is asked for.
    """
    family = family or pipeline_family(pipe)
    device = device or pipe._execution_device
    prompts = _as_list(prompts)
    if negative_prompts is not None:
        negative_prompts = _as_list(negative_prompts)
    n = num_images_per_prompt
    if family == "sd":
        pos, neg = pipe.encode_prompt(prompts, device, n, do_cfg, negative_prompts, clip_skip=clip_skip)
        return PromptEmbeds(family, pos, neg if do_cfg else None)
    if family == "sdxl":
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=n, do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompts, clip_skip=clip_skip)
        return PromptEmbeds(family, pos, neg if do_cfg else None, pooled, neg_pooled if do_cfg else None)
    if family == "flux":
        max_len = max_sequence_length or min(512, pipe.tokenizer_2.model_max_length)
        pos, pooled, ids = pipe.encode_prompt(prompts, prompts, device=device, num_images_per_prompt=n,
                                              max_sequence_length=max_len)
        if not do_cfg:
            return PromptEmbeds(family, pos, pooled=pooled, text_ids=ids)
        negs = negative_prompts or [""] * len(prompts)
        neg, neg_pooled, neg_ids = pipe.encode_prompt(negs, negs, device=device, num_images_per_prompt=n,
                                                      max_sequence_length=max_len)
        return PromptEmbeds(family, pos, neg, pooled, neg_pooled, ids, neg_ids)
    if family in ("if", "if-sr"):
        pos, neg = pipe.encode_prompt(prompts, do_classifier_free_guidance=do_cfg, num_images_per_prompt=n,
                                      device=device, negative_prompt=negative_prompts, clean_caption=False)
        return PromptEmbeds(family, pos, neg if do_cfg else None)
    raise ValueError(f"unknown family {family}")


def tokenize(pipe, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids [B, 77] for each of the pipeline's CLIP tokenizers (SD: one, SDXL: two), padded to max length."""
    ids = []
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None and getattr(pipe, "text_encoder" + name[len("tokenizer"):], None) is not None:
            ids.append(tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids)
    return ids


def encode_tokens(text_encoders: list[torch.nn.Module], input_ids: list[torch.Tensor], family: str
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Differentiable prompt encoding for training: (embeds [B, 77, D], pooled [B, P] or None).

    Same features as diffusers' encode_prompt: SD takes the last hidden state; SDXL concatenates the
    penultimate hidden states of both CLIPs and pools with the second one's projection. Pass the encoders
    the Trainer prepared (DDP-wrapped) so their gradients are synchronised.
    """
    if family == "sd":
        return text_encoders[0](input_ids[0].to(_device(text_encoders[0])))[0], None
    if family == "sdxl":
        hidden, pooled = [], None
        for enc, ids in zip(text_encoders, input_ids):
            out = enc(ids.to(_device(enc)), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled
    raise ValueError(f"training-time prompt encoding is implemented for sd and sdxl, not {family}")


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
