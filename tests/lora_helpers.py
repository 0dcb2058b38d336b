"""A saved diffusers-format LoRA with random (non-zero) A and B, for the adapter-stacking tests."""
from __future__ import annotations

from pathlib import Path

import torch

from common.models.tiny import build_tiny

ATTN1 = r".*attn1\.(to_q|to_k|to_v|to_out\.0)"


def make_lora(folder: Path, target: str = ATTN1, seed: int = 1, name: str = "tiny-sd") -> Path:
    """A LoRA for the tiny preset `name`, saved where diffusers' load_lora_weights reads it."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    src = build_tiny(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        src.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(src.unet))
    type(src).save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder
