"""Denoisers: `denoiser(x_t, t, step) -> guided model output`, built once per run.

CFG, SDXL's added conditions, FLUX's guidance embedding / ids, IF's learned variance, ControlNet
residuals and attention-processor kwargs all live here, so the loop never branches on a model family.
Methods compose denoisers (e.g. wrap one to act on a batch of views) instead of re-writing UNet calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from common.pipelines.conditioning import Conditioning


def guided(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided_out: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, Sec. 3.4), as diffusers' `rescale_noise_cfg`."""
    dims = list(range(1, cond.ndim))
    factor = cond.std(dim=dims, keepdim=True) / guided_out.std(dim=dims, keepdim=True)
    return rescale * (guided_out * factor) + (1 - rescale) * guided_out


@dataclass
class ControlSpec:
    """ControlNet conditioning. image: [B, 3, H, W] in [0, 1] (already prepared, one per sample).

    `scale` may be a float or a function of the step (SyncTweedies' 0.7 -> 0.9 schedule).
    """

    controlnet: torch.nn.Module
    image: torch.Tensor
    scale: float | Callable[[int, int], float] = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    guess_mode: bool = False

    def scale_at(self, step: int, num_steps: int) -> float:
        keep = 1.0 - float(step / num_steps < self.guidance_start or (step + 1) / num_steps > self.guidance_end)
        scale = self.scale(step, num_steps) if callable(self.scale) else self.scale
        return scale * keep


def _half(value: Any) -> Any:
    """The conditional half of a CFG-batched added condition (a tensor or a list of tensors)."""
    if isinstance(value, (list, tuple)):
        return [v.chunk(2)[1] for v in value]
    return value.chunk(2)[1]


class UNetDenoiser:
    """SD / SDXL / IF (and IF stage II) UNet with CFG, added conditions and optional ControlNet.

    `prompts` is the run's Conditioning: its SDXL time ids and IP-Adapter image embeds become
    `added_cond_kwargs` (unless given explicitly), its `attention` dict the `cross_attention_kwargs`
    (explicit `cross_attention_kwargs` win key by key).
    """

    def __init__(self, unet, scheduler, prompts: Conditioning, guidance_scale: float = 7.5, *,
                 guidance_rescale: float = 0.0, added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                 cross_attention_kwargs: dict[str, Any] | None = None, control: ControlSpec | None = None,
                 concat_inputs: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                 num_steps: int | None = None, learned_variance: bool | None = None):
        self.unet, self.scheduler = unet, scheduler
        self.do_cfg = prompts.has_negative and guidance_scale > 1.0
        embeds = prompts.cfg() if self.do_cfg else prompts.positive()
        self.encoder_hidden_states = embeds.embeds
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        added = dict(added_cond_kwargs) if added_cond_kwargs is not None else (embeds.added_cond_kwargs() or {})
        if embeds.image_embeds is not None:
            added.setdefault("image_embeds", embeds.image_embeds)
        self.added_cond_kwargs = added or None
        self.cross_attention_kwargs = {**embeds.attention, **(cross_attention_kwargs or {})} or None
        self.control, self.num_steps = control, num_steps
        self.concat_inputs, self.class_labels = concat_inputs, class_labels
        if learned_variance is None:
            learned_variance = unet.config.out_channels == 2 * (unet.config.in_channels - (
                0 if concat_inputs is None else concat_inputs.shape[1]))
        self.learned_variance = learned_variance

    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if self.do_cfg else x

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        model_in = self.scheduler.scale_model_input(self._batch(x_t), t)
        if self.concat_inputs is not None:
            model_in = torch.cat([model_in, self._batch(self.concat_inputs)], dim=1)
        residuals = {}
        if self.control is not None:
            residuals = self._control_residuals(model_in, t, step)
        attention = None if self.cross_attention_kwargs is None else dict(self.cross_attention_kwargs)
        out = self.unet(model_in, t, encoder_hidden_states=self.encoder_hidden_states,
                        class_labels=self.class_labels, cross_attention_kwargs=attention,
                        added_cond_kwargs=self.added_cond_kwargs, return_dict=False, **residuals)[0]
        if not self.do_cfg:
            return out
        uncond, cond = out.chunk(2)
        if self.learned_variance:  # IF: guide the eps half, keep the conditional variance
            c = x_t.shape[1]
            eps = guided(uncond[:, :c], cond[:, :c], self.guidance_scale)
            return torch.cat([eps, cond[:, c:]], dim=1)
        result = guided(uncond, cond, self.guidance_scale)
        if self.guidance_rescale > 0:
            result = rescale_guidance(result, cond, self.guidance_rescale)
        return result

    def _control_residuals(self, model_in: torch.Tensor, t: torch.Tensor, step: int) -> dict[str, Any]:
        c = self.control
        num_steps = self.num_steps or len(self.scheduler.timesteps)
        scale = c.scale_at(step, num_steps)
        added = self.added_cond_kwargs
        if c.guess_mode and self.do_cfg:  # ControlNet sees the conditional half only
            ctrl_in, hidden = model_in.chunk(2)[1], self.encoder_hidden_states.chunk(2)[1]
            image = c.image
            added = None if added is None else {k: _half(v) for k, v in added.items()}
        else:
            ctrl_in, hidden = model_in, self.encoder_hidden_states
            image = self._batch(c.image)
        down, mid = c.controlnet(ctrl_in, t, encoder_hidden_states=hidden, controlnet_cond=image,
                                 conditioning_scale=scale, guess_mode=c.guess_mode, added_cond_kwargs=added,
                                 return_dict=False)
        if c.guess_mode and self.do_cfg:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class FluxDenoiser:
    """FLUX transformer on packed latents [B, N, C*4]; guidance-distilled, optional true CFG.

    The Conditioning's `attention` dict (its `negative_attention` for the negative pass) becomes the
    `joint_attention_kwargs` (explicit `joint_attention_kwargs` win key by key); IP-Adapter image embeds go
    in as `ip_adapter_image_embeds`, as diffusers' FluxPipeline passes them. A plan without `text_len`
    gets the prompt's token count (single-stream blocks need it).
    """

    def __init__(self, transformer, prompts: Conditioning, latent_ids: torch.Tensor, guidance_scale: float = 3.5,
                 *, true_cfg_scale: float = 1.0, joint_attention_kwargs: dict[str, Any] | None = None):
        self.transformer, self.prompts, self.latent_ids = transformer, prompts, latent_ids
        self.guidance_scale, self.true_cfg_scale = guidance_scale, true_cfg_scale
        self.joint_attention_kwargs = joint_attention_kwargs or {}

    def _kwargs(self, negative: bool) -> dict[str, Any]:
        p = self.prompts
        state = p.negative_attention if negative and p.negative_attention is not None else p.attention
        kwargs = {**state, **self.joint_attention_kwargs}
        images = p.negative_image_embeds if negative else p.image_embeds
        if negative and images is None and p.image_embeds is not None:
            images = [torch.zeros_like(e) for e in p.image_embeds]
        if images is not None:
            kwargs.setdefault("ip_adapter_image_embeds", images)
        plan = kwargs.get("plan")
        if plan is not None and getattr(plan, "text_len", 0) is None:
            plan.text_len = (p.negative if negative else p.embeds).shape[1]
        return kwargs

    def _run(self, x: torch.Tensor, t: torch.Tensor, embeds, pooled, ids, negative: bool = False) -> torch.Tensor:
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], self.guidance_scale, device=x.device, dtype=torch.float32).expand(x.shape[0])
        timestep = t.expand(x.shape[0]).to(x.dtype)
        return self.transformer(hidden_states=x, timestep=timestep / 1000, guidance=guidance,
                                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=ids,
                                img_ids=self.latent_ids, joint_attention_kwargs=self._kwargs(negative),
                                return_dict=False)[0]

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        p = self.prompts
        out = self._run(x_t, t, p.embeds, p.pooled, p.text_ids)
        if self.true_cfg_scale > 1.0 and p.has_negative:
            neg = self._run(x_t, t, p.negative, p.negative_pooled, p.negative_text_ids, negative=True)
            out = guided(neg, out, self.true_cfg_scale)
        return out
