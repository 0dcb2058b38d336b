"""The toy world's models, with the real transformers/diffusers classes: toy-clip, toy-sd and toy-sdxl.

toy-clip is a `CLIPModel` (a ViT on 32x32 scenes, patch 4; a text tower over the real CLIP tokenizer's ids).
toy-sd is a `StableDiffusionPipeline`: a VAE that halves the resolution (32x32x3 <-> 16x16x4), toy-clip's text
tower as its text encoder, and a small cross-attention UNet; SD-1.x's noise schedule. Sizes are picked so that
both train on one CPU thread in about an hour and the weights stay well under 20 MB (stored in fp16).
toy-sdxl is a `StableDiffusionXLPipeline` converted from toy-sd (`sdxl_unet_from_sd`) and fine-tuned: the same
UNet blocks in SDXL's layout (two text encoders' states concatenated, pooled text + time ids added to the
timestep embedding).
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel

from common.models.tokenizer import CLIP_VOCAB_SIZE
from common.toyworld.scenes import IMAGE_SIZE

TEXT_DIM = 32  # the token table (49408 x TEXT_DIM) dominates the size: keep it narrow
LATENT_SIZE = IMAGE_SIZE // 2
PROJECTION_DIM = 64  # toy-clip's joint space: the pooled text embedding of toy-sdxl's text_encoder_2
SDXL_TIME_DIM = 8  # addition_time_embed_dim: each of SDXL's 6 time ids -> 8 sinusoidal features


def toy_clip_config() -> CLIPConfig:
    """CLIP with a 4-layer ViT (32 px, patch 4 -> 64 tokens) and a 3-layer text tower, 64-d joint space."""
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM,
                num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=77, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu")
    vision = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=4,
                  image_size=IMAGE_SIZE, patch_size=4, num_channels=3, hidden_act="quick_gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64, logit_scale_init_value=2.6592)


def build_toy_clip() -> CLIPModel:
    """A randomly initialised toy-clip (seed the global generator first for reproducibility)."""
    return CLIPModel(toy_clip_config())


def build_toy_vae() -> AutoencoderKL:
    """Two blocks -> one downsampling: 32x32x3 images <-> 16x16x4 latents."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE,
    )


def _unet_blocks() -> dict:
    return dict(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16, norm_num_groups=16,
    )


def build_toy_unet() -> UNet2DConditionModel:
    """16x16x4 latents; convolutions only at 16x16, cross-attention to the 32-d text states at 8x8 and 4x4."""
    return UNet2DConditionModel(cross_attention_dim=TEXT_DIM, **_unet_blocks())


def build_toy_sdxl_unet() -> UNet2DConditionModel:
    """toy-sd's blocks in SDXL's layout: context = both encoders' states [B, 77, 32 + 32]; the timestep embedding
    gets add_embedding(pooled text [B, 64] ++ 6 sinusoidal time ids [B, 6 * 8])."""
    return UNet2DConditionModel(
        cross_attention_dim=2 * TEXT_DIM, addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=PROJECTION_DIM + 6 * SDXL_TIME_DIM, **_unet_blocks(),
    )


@torch.no_grad()
def sdxl_unet_from_sd(sd_unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """toy-sd's UNet in SDXL layout, computing exactly what toy-sd computes from text encoder 1's half of the context.

    Every tensor of the same name and shape is copied; cross-attention keys/values become [W_sd, 0] over the
    concatenated context [enc1 (32), enc2 (32)], so encoder 2's half is ignored; add_embedding's last linear is
    zero, so the pooled text / time-id embedding adds 0 to the timestep embedding. Fine-tuning then opens both.
    """
    unet = build_toy_sdxl_unet()
    if sd_unet.dtype != unet.dtype:
        unet = unet.to(sd_unet.dtype)
    source = sd_unet.state_dict()
    state = unet.state_dict()
    widened, new = [], []
    for name, value in state.items():
        if name not in source:
            new.append(name)
            continue
        old = source[name]
        if old.shape == value.shape:
            state[name] = old.clone()
        elif name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) and old.shape[1] == TEXT_DIM:
            state[name] = torch.cat([old, torch.zeros_like(old)], dim=1)  # [inner, 32 + 32]
            widened.append(name)
        else:
            raise ValueError(f"{name}: toy-sd {tuple(old.shape)} does not fit SDXL layout {tuple(value.shape)}")
    if any(not n.startswith("add_embedding.") for n in new) or set(source) - set(state) or not widened:
        raise ValueError(f"not a toy-sd UNet: new {new}, unused {sorted(set(source) - set(state))}")
    state["add_embedding.linear_2.weight"].zero_()
    state["add_embedding.linear_2.bias"].zero_()
    unet.load_state_dict(state)
    return unet


def toy_scheduler() -> DDIMScheduler:
    """SD-1.x's schedule (scaled_linear betas, epsilon prediction), as a DDIM sampler."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
