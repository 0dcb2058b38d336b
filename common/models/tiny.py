"""Tiny random-weight models with the real classes and layouts, built in code in about a second.

They make every pipeline, trainer and sampler runnable on a CPU in seconds. Weights come from a fixed
seed (inside a forked RNG, so building one never disturbs the caller's random stream); the offline CLIP
tokenizer is used everywhere, also in the T5 slot of FLUX and IF (the tiny T5 has the CLIP vocab size).
Images are 64x64 by default (latents 8x8; the VAEs downsample by 8 like the real ones); tiny-if makes
16x16 pixels and tiny-if-sr upsamples them to 64x64 (the real IF: 64 -> 256).
"""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    IFPipeline,
    IFSuperResolutionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import PreTrainedModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from common.models.tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer

TINY_SEED = 0
TEXT_DIM = 32


def _clip_text_config(projection_dim: int | None = None) -> CLIPTextConfig:
    kw = dict(projection_dim=projection_dim) if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, hidden_act="quick_gelu", **kw,
    )


def _t5() -> T5EncoderModel:
    cfg = T5Config(vocab_size=CLIP_VOCAB_SIZE, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0)
    return T5EncoderModel(cfg)


def _vae(latent_channels: int = 4, **kw) -> AutoencoderKL:
    """Four blocks -> downsampling by 8, as the real SD/SDXL/FLUX VAEs."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=64, **kw,
    )


def _sd_unet(**kw) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=16, **kw,
    )


def _sd_scheduler() -> DDIMScheduler:
    """SD-1.x's scheduler config (scaled_linear betas, steps_offset=1)."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def tiny_sd() -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_clip_text_config()), tokenizer=clip_tokenizer(), unet=_sd_unet(),
        scheduler=_sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl() -> StableDiffusionXLPipeline:
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM, cross_attention_dim=2 * TEXT_DIM, norm_num_groups=16,
    )
    scheduler = _sd_scheduler()
    scheduler.register_to_config(steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=_vae(force_upcast=False), text_encoder=CLIPTextModel(_clip_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(projection_dim=TEXT_DIM)),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def tiny_flux() -> FluxPipeline:
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True, axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(
        scheduler=scheduler, vae=_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                                      scaling_factor=0.3611),
        text_encoder=CLIPTextModel(_clip_text_config()), tokenizer=clip_tokenizer(),
        text_encoder_2=_t5(), tokenizer_2=clip_tokenizer(), transformer=transformer,
    )
    pipe.default_sample_size = 8  # 64x64 images by default, like the other tiny presets
    return pipe


def _if_unet(in_channels: int, sample_size: int, **kw) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=6, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=TEXT_DIM, encoder_hid_dim=TEXT_DIM, attention_head_dim=8,
        addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=16, **kw,
    )


def _if_scheduler() -> DDPMScheduler:
    """DeepFloyd IF's scheduler config (cosine betas, learned-range variance, dynamic thresholding)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", thresholding=True,
                         dynamic_thresholding_ratio=0.95, sample_max_value=1.0, prediction_type="epsilon",
                         variance_type="learned_range", clip_sample=True, clip_sample_range=1.0)


def tiny_if() -> IFPipeline:
    return IFPipeline(tokenizer=clip_tokenizer(), text_encoder=_t5(), unet=_if_unet(3, 16), scheduler=_if_scheduler(),
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


def tiny_if_sr() -> IFSuperResolutionPipeline:
    noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    unet = _if_unet(6, 64, class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu")
    return IFSuperResolutionPipeline(tokenizer=clip_tokenizer(), text_encoder=_t5(), unet=unet,
                                     scheduler=_if_scheduler(), image_noising_scheduler=noising, safety_checker=None,
                                     feature_extractor=None, watermarker=None, requires_safety_checker=False)


def tiny_controlnet() -> ControlNetModel:
    """A ControlNet shaped for tiny-sd; its hint encoder downsamples by 8 like the real ones."""
    return ControlNetModel.from_unet(_sd_unet(), conditioning_embedding_out_channels=(8, 8, 8, 8))


def _tiny_clip_vision(hidden: int, projection_dim: int) -> CLIPVisionModelWithProjection:
    """A CLIP image encoder with the real class (pooled projection + hidden states), 28x28 input, patch 14."""
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=37, projection_dim=projection_dim, num_hidden_layers=2,
                           num_attention_heads=4, image_size=28, patch_size=14, hidden_act="gelu")
    return CLIPVisionModelWithProjection(cfg)


def tiny_clip_vision_h() -> CLIPVisionModelWithProjection:
    """Stands in for OpenCLIP ViT-H/14 (hidden 1280 > projection 1024): hidden 32, projection 16."""
    return _tiny_clip_vision(32, 16)


def tiny_clip_vision_g() -> CLIPVisionModelWithProjection:
    """Stands in for OpenCLIP ViT-bigG/14 (hidden 1664, projection 1280): hidden 40, projection 24."""
    return _tiny_clip_vision(40, 24)


BUILDERS = {
    "tiny-sd": tiny_sd, "tiny-sdxl": tiny_sdxl, "tiny-flux": tiny_flux, "tiny-if": tiny_if,
    "tiny-if-sr": tiny_if_sr, "tiny-controlnet": tiny_controlnet,
    "tiny-clip-vision-h": tiny_clip_vision_h, "tiny-clip-vision-g": tiny_clip_vision_g,
}


def build_tiny(name: str, seed: int = TINY_SEED):
    """Build the tiny preset `name` with weights drawn from `seed`, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = BUILDERS[name]()
        modules = [m for m in (built.components.values() if hasattr(built, "components") else [built])
                   if isinstance(m, torch.nn.Module)]
        for m in modules:
            m.eval()  # as from_pretrained leaves them: no dropout (the tiny T5 has some)
            if isinstance(m, PreTrainedModel):
                _randomize_layer_norms(m)
    return built


def _randomize_layer_norms(model: torch.nn.Module) -> None:
    """Text encoders' LayerNorms get random affine parameters, as trained ones have: with the init values
    (weight 1, bias 0) every CLIP feature row is zero-mean, a degeneracy real models do not have (it makes
    Custom Diffusion's merge system singular, for one)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm) and mod.elementwise_affine:
                mod.weight.copy_(1 + 0.3 * torch.randn_like(mod.weight))
                if mod.bias is not None:
                    mod.bias.copy_(0.3 * torch.randn_like(mod.bias))
