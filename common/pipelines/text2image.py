"""Plain text-to-image on top of the shared loop, for SD, SDXL, FLUX and DeepFloyd IF stages I and II.

For the same pipeline, seed, scheduler and steps the result equals diffusers' own pipeline call
(tests/test_pipelines.py). Methods reuse the pieces: `prepare(...)` gives the initial state, the
denoiser and the timesteps; they add hooks or wrap the denoiser and call `common.pipelines.loop.sample`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

from common.models.loading import pipeline_family
from common.pipelines.denoisers import ControlSpec, FluxDenoiser, UNetDenoiser
from common.pipelines.latents import decode_latents
from common.pipelines.loop import Hook, sample
from common.pipelines.conditioning import Conditioning, build_conditioning, split_image_embeds


@dataclass
class SamplingSetup:
    """Everything the loop needs for one run. x_T: [B, C, h, w] (FLUX: packed [B, N, 4C])."""

    family: str
    x_T: torch.Tensor
    denoiser: Any
    timesteps: torch.Tensor
    extra_step_kwargs: dict[str, Any]
    prompts: Conditioning
    height: int
    width: int
    info: dict[str, Any] = field(default_factory=dict)


def default_size(pipe) -> tuple[int, int]:
    family = pipeline_family(pipe)
    if family == "flux":
        size = pipe.default_sample_size * pipe.vae_scale_factor
    elif family.startswith("if"):
        size = pipe.unet.config.sample_size
    else:
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return size, size


def default_guidance_scale(pipe) -> float:
    """The guidance scale diffusers' pipeline class uses by default (its __call__ signature)."""
    import inspect

    param = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    return float(param.default) if param is not None and param.default is not inspect.Parameter.empty else 7.5


def _flux_timesteps(pipe, num_steps: int, seq_len: int, device) -> torch.Tensor:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    cfg = pipe.scheduler.config
    sigmas = None if cfg.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
    mu = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    return retrieve_timesteps(pipe.scheduler, num_steps, device, sigmas=sigmas, mu=mu)[0]


def prepare(pipe, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
            num_inference_steps: int = 50, guidance_scale: float | None = None, height: int | None = None,
            width: int | None = None, generator: torch.Generator | None = None, eta: float = 0.0,
            num_images_per_prompt: int = 1, guidance_rescale: float = 0.0, true_cfg_scale: float = 1.0,
            control: ControlSpec | None = None, cross_attention_kwargs: dict[str, Any] | None = None,
            max_sequence_length: int | None = None, latents: torch.Tensor | None = None,
            image: torch.Tensor | None = None, noise_level: int = 250,
            ip_adapter_image_embeds: list[torch.Tensor] | None = None,
            attention: dict[str, Any] | None = None) -> SamplingSetup:
    """Encode prompts, draw x_T exactly as diffusers does, build the denoiser and the timesteps.

    IF stage II (`if-sr`) also takes the stage-I `image` [B, 3, h, w] in [-1, 1], upscaled bilinearly and
    noised to `noise_level` as diffusers does. `guidance_scale=None` takes the pipeline's own default
    (SD 7.5, SDXL 5.0, FLUX 3.5 distilled guidance, IF 7.0). `ip_adapter_image_embeds`: diffusers' layout
    (one entry per loaded IP-Adapter, [negative; positive] rows when CFG is on); `attention`: per-call
    attention state for the processors (`Conditioning.attention`, e.g. {"plan": AttentionPlan}).
    """
    family = pipeline_family(pipe)
    if guidance_scale is None:
        guidance_scale = default_guidance_scale(pipe)
    dh, dw = default_size(pipe)
    run = _Run(pipe, family, [prompt] if isinstance(prompt, str) else list(prompt), negative_prompt,
               num_inference_steps, guidance_scale, height or dh, width or dw, generator, eta, num_images_per_prompt,
               guidance_rescale, true_cfg_scale, control, cross_attention_kwargs, max_sequence_length, latents,
               image, noise_level, ip_adapter_image_embeds, attention)
    return SAMPLING_SETUPS.get(family, _prepare_unet)(run)


@dataclass
class _Run:
    """The arguments of one `prepare` call, handed to the family's setup function."""

    pipe: Any
    family: str
    prompts: list[str]
    negative_prompt: str | list[str] | None
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    generator: torch.Generator | None
    eta: float
    num_images_per_prompt: int
    guidance_rescale: float
    true_cfg_scale: float
    control: ControlSpec | None
    cross_attention_kwargs: dict[str, Any] | None
    max_sequence_length: int | None
    latents: torch.Tensor | None
    image: torch.Tensor | None
    noise_level: int
    ip_adapter_image_embeds: list[torch.Tensor] | None
    attention: dict[str, Any] | None

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    def conditioning(self, do_cfg: bool) -> Conditioning:
        images = negatives = None
        if self.ip_adapter_image_embeds is not None:
            images, negatives = split_image_embeds(self.ip_adapter_image_embeds, self.batch, do_cfg)
        return build_conditioning(self.pipe, self.prompts, self.negative_prompt, do_cfg=do_cfg,
                                  device=self.pipe._execution_device, num_images_per_prompt=self.num_images_per_prompt,
                                  max_sequence_length=self.max_sequence_length, height=self.height, width=self.width,
                                  image_embeds=images, negative_image_embeds=negatives, attention=self.attention)


def _prepare_flux(run: _Run) -> SamplingSetup:
    pipe, device = run.pipe, run.pipe._execution_device
    do_cfg = run.true_cfg_scale > 1.0 and run.negative_prompt is not None
    cond = run.conditioning(do_cfg)
    x_T, ids = pipe.prepare_latents(run.batch, pipe.transformer.config.in_channels // 4, run.height, run.width,
                                    cond.embeds.dtype, device, run.generator, run.latents)
    timesteps = _flux_timesteps(pipe, run.num_inference_steps, x_T.shape[1], device)
    denoiser = FluxDenoiser(pipe.transformer, cond, ids, run.guidance_scale, true_cfg_scale=run.true_cfg_scale,
                            joint_attention_kwargs=run.cross_attention_kwargs)
    return SamplingSetup(run.family, x_T, denoiser, timesteps, {}, cond, run.height, run.width, {"latent_ids": ids})


def _prepare_unet(run: _Run) -> SamplingSetup:
    pipe, device = run.pipe, run.pipe._execution_device
    do_cfg = run.guidance_scale > 1.0
    cond = run.conditioning(do_cfg)
    pipe.scheduler.set_timesteps(run.num_inference_steps, device=device)
    timesteps = pipe.scheduler.timesteps
    x_T, concat, class_labels = _INITIAL_STATE.get(run.family, _latent_state)(run, cond.embeds.dtype, do_cfg)
    denoiser = UNetDenoiser(pipe.unet, pipe.scheduler, cond, run.guidance_scale,
                            guidance_rescale=run.guidance_rescale, cross_attention_kwargs=run.cross_attention_kwargs,
                            control=run.control, num_steps=len(timesteps), concat_inputs=concat,
                            class_labels=class_labels)
    extra = pipe.prepare_extra_step_kwargs(run.generator, run.eta)
    return SamplingSetup(run.family, x_T, denoiser, timesteps, extra, cond, run.height, run.width)


def _latent_state(run: _Run, dtype, do_cfg):
    pipe = run.pipe
    x_T = pipe.prepare_latents(run.batch, pipe.unet.config.in_channels, run.height, run.width, dtype,
                               pipe._execution_device, run.generator, run.latents)
    return x_T, None, None


def _if_state(run: _Run, dtype, do_cfg):
    pipe = run.pipe
    channels = pipe.unet.config.in_channels // (2 if run.family == "if-sr" else 1)
    x_T = run.latents if run.latents is not None else pipe.prepare_intermediate_images(
        run.batch, channels, run.height, run.width, dtype, pipe._execution_device, run.generator)
    if run.family != "if-sr":
        return x_T, None, None
    concat, class_labels = _if_sr_condition(pipe, run.image, run.num_images_per_prompt, run.height, run.width,
                                            run.noise_level, run.generator, do_cfg)
    return x_T, concat, class_labels


#: family -> how its run is set up (default: a UNet on latents); family -> its initial state x_T
SAMPLING_SETUPS = {"flux": _prepare_flux}
_INITIAL_STATE = {"if": _if_state, "if-sr": _if_state}


def _if_sr_condition(pipe, image, num_images_per_prompt, height, width, noise_level, generator, do_cfg):
    """Stage-II conditioning: the upscaled, noise-augmented stage-I image and its noise level (class label)."""
    from diffusers.utils.torch_utils import randn_tensor

    if image is None:
        raise ValueError("IF stage II needs the stage-I image (image=...)")
    image = pipe.preprocess_image(image, num_images_per_prompt, pipe._execution_device)
    upscaled = torch.nn.functional.interpolate(image, (height, width), mode="bilinear", align_corners=True)
    levels = torch.tensor([noise_level] * upscaled.shape[0], device=upscaled.device)
    noise = randn_tensor(upscaled.shape, generator=generator, device=upscaled.device, dtype=upscaled.dtype)
    upscaled = pipe.image_noising_scheduler.add_noise(upscaled, noise, timesteps=levels)
    return upscaled, torch.cat([levels, levels]) if do_cfg else levels


def decode(pipe, setup: SamplingSetup, x0: torch.Tensor) -> torch.Tensor:
    """Final state -> images [B, 3, H, W] in [-1, 1]."""
    if setup.family.startswith("if"):
        return x0
    if setup.family == "flux":
        x0 = pipe._unpack_latents(x0, setup.height, setup.width, pipe.vae_scale_factor)
    return decode_latents(pipe.vae, x0, upcast=setup.family == "sdxl")  # as diffusers' pipelines do


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images (rounded as diffusers' image processor does)."""
    arr = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return [PIL.Image.fromarray((a * 255).round().astype("uint8")) for a in arr]


@torch.no_grad()
def generate(pipe, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
             hooks: tuple[Hook, ...] = (), progress: bool = True, output_type: str = "pt", **kwargs: Any):
    """Text-to-image through the shared loop. output_type: "pt" ([-1,1] tensor), "np" ([0,1] NHWC), "pil"."""
    setup = prepare(pipe, prompt, negative_prompt, **kwargs)
    x0 = sample(setup.denoiser, pipe.scheduler, setup.x_T, setup.timesteps, hooks=hooks,
                extra_step_kwargs=setup.extra_step_kwargs, progress=progress)
    images = decode(pipe, setup, x0)
    if output_type == "pil":
        return to_pil(images)
    if output_type == "np":
        return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return images


def use_ddim(pipe, keep: tuple[type, ...] = ()) -> None:
    """Swap the pipeline's scheduler for DDIM with the same config (e.g. the PNDM that SD checkpoints ship),
    unless it is DDIM already or one of `keep`. Custom Diffusion samples with DDIM (eta 1); SyncTweedies'
    synchronised steps assume DDIM's evenly spaced timesteps (PLMS repeats one)."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, (DDIMScheduler, *keep)):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
