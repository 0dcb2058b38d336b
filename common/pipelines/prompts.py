"""Prompt encoding for SD, SDXL, FLUX and DeepFloyd IF through the pipelines' own `encode_prompt`.

We call diffusers' encoders (so tokenisation, clip-skip, LoRA scale and padding match it exactly) through
the per-family builders of common.pipelines.conditioning; `PromptEmbeds` is its `Conditioning`.
"""
from __future__ import annotations

import torch

from common.pipelines.conditioning import Conditioning, build_conditioning

#: The text part of a Conditioning; the old name stays importable.
PromptEmbeds = Conditioning


def encode_prompt(pipe, prompts: str | list[str], negative_prompts: str | list[str] | None = None, *,
                  do_cfg: bool = True, num_images_per_prompt: int = 1, device=None, clip_skip: int | None = None,
                  max_sequence_length: int | None = None, family: str | None = None) -> Conditioning:
    """Encode `prompts` (and negatives) with `pipe`'s text encoders (the family's registered builder).

    FLUX-dev is guidance-distilled: its negative is only encoded when `do_cfg` (true CFG) is asked for.
    """
    return build_conditioning(pipe, prompts, negative_prompts, do_cfg=do_cfg,
                              num_images_per_prompt=num_images_per_prompt, device=device, clip_skip=clip_skip,
                              max_sequence_length=max_sequence_length, family=family)


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
