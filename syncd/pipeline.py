"""SynCD FLUX sampling with references (§3): the references sit clean beside the target on one canvas,
re-clamped before every transformer call; guidance from up to three passes (full shared attention with the
prompt, neg_mode block-diagonal with the negative prompt, full with the negative prompt)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.attention.schedule import plan_installed
from common.errors import UsageError
from common.pipelines.conditioning import build_conditioning
from common.pipelines.latents import decode_latents
from common.pipelines.loop import Hook, StepState, sample
from common.train.conditioning import flux_guidance
from common.train.flow import resolution_shift
from syncd.canvas import make_canvas, neg_mode_plan, pack_canvas, slot_mask, split_canvas, unpack_canvas
from syncd.guidance import normalized_guidance, true_cfg

NEGATIVE_PROMPT = "3d render, cartoon, low resolution, illustration, blurry, unrealistic"


def preprocess_reference(img: Image.Image, size: int = 512) -> torch.Tensor:
    """Centre square crop on the shortest side, resize to size^2, [-1, 1]: [3, size, size]."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.convert("RGB").crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return x


def encode_syncd(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """images [B, 3, H, W] in [-1, 1] -> latents * scaling_factor (the FLUX shift_factor is NOT subtracted:
    the released checkpoint was trained that way)."""
    dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.sample(generator) * vae.config.scaling_factor


class ClampReferences(Hook):
    """x <- (1 - m) z_ref + m x before every prediction (references stay their clean latents)."""

    def __init__(self, z_ref: torch.Tensor, m: torch.Tensor):
        self.z_ref, self.m = z_ref, m

    def on_input(self, state: StepState) -> None:
        state.x_t = (1 - self.m) * self.z_ref + self.m * state.x_t


class SynCDDenoiser:
    """e_c (prompt, full sharing); from step 1 with true_cfg_scale > 1: e_u (negative prompt, neg_mode) and,
    with image_guidance_scale > 0, e_i (negative prompt, full sharing); then §3.3's guidance."""

    def __init__(self, transformer, cond, img_ids: torch.Tensor, latent_hw: tuple[int, int], n: int, *,  # per image
                 guidance_scale: float = 3.5, true_cfg_scale: float = 1.0, image_guidance_scale: float = 1.0,
                 backend: str = "sdpa"):
        self.tr, self.cond, self.img_ids = transformer, cond, img_ids
        self.guidance_scale, self.true_cfg_scale, self.image_guidance_scale = (guidance_scale, true_cfg_scale,
                                                                                image_guidance_scale)
        self.neg_plan = neg_mode_plan(latent_hw, n, cond.embeds.shape[1], device=img_ids.device, backend=backend)
        self.calls = 0

    def _run(self, x, t, negative: bool, plan=None):
        c = self.cond
        embeds, pooled, ids = (c.negative, c.negative_pooled, c.negative_text_ids) if negative else (
            c.embeds, c.pooled, c.text_ids)
        self.calls += 1
        return self.tr(hidden_states=x, timestep=(t / 1000).expand(x.shape[0]).to(x.dtype),
                       guidance=flux_guidance(self.tr, self.guidance_scale, x.shape[0], device=x.device),
                       pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=ids, img_ids=self.img_ids,
                       joint_attention_kwargs={"plan": plan} if plan is not None else None, return_dict=False)[0]

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        e_c = self._run(x_t, t, False)
        if self.true_cfg_scale <= 1.0 or step < 1:
            return e_c
        e_u = self._run(x_t, t, True, self.neg_plan)
        if self.image_guidance_scale == 0:
            return true_cfg(e_u, e_c, self.true_cfg_scale)
        e_i = self._run(x_t, t, True)
        return normalized_guidance(e_u, e_i, e_c, self.true_cfg_scale, self.image_guidance_scale)


def flux_scheduler(pipe, num_inference_steps: int, image_seq_len: int, device=None):
    """The pipe's FlowMatch Euler with sigmas linspace(1, 1/N, N) and the resolution shift of the canvas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    kw = {}
    if sched.config.get("use_dynamic_shifting", False):
        c = sched.config
        kw["mu"] = math.log(resolution_shift(image_seq_len, c.get("base_image_seq_len", 256),
                                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                             c.get("max_shift", 1.15)))
    sched.set_timesteps(sigmas=sigmas, device=device, **kw)
    return sched


@torch.no_grad()
def generate(pipe, prompt: str, refs: torch.Tensor, *, num_inference_steps: int = 30, guidance_scale: float = 3.5,
             true_cfg_scale: float = 1.0, image_guidance_scale: float = 1.0, negative_prompt: str = NEGATIVE_PROMPT,
             generator: torch.Generator | None = None, num_images: int = 1, backend: str = "sdpa",
             progress: bool = True) -> list[Image.Image]:
    """refs [k, 3, S, S] in [-1, 1] (k >= 1) -> `num_images` target images (S x S) for `prompt`."""
    tr, vae = pipe.transformer, pipe.vae
    device = tr.device
    if refs.ndim != 4 or refs.shape[0] < 1:
        raise UsageError("SynCD sampling needs at least one reference image")
    n = refs.shape[0] + 1
    z_ref = encode_syncd(vae, refs, generator)  # [k, C, h, w]
    c, h, w = z_ref.shape[1:]
    canvas = make_canvas(torch.cat([torch.zeros_like(z_ref[:1]), z_ref])[None])  # [1, C, h, n*w]
    z_tokens, img_ids = pack_canvas(canvas)
    m = slot_mask((h, w), n, 0, device)[None, :, None].to(z_tokens.dtype)
    cond = build_conditioning(pipe, [prompt], [negative_prompt], do_cfg=true_cfg_scale > 1.0, device=device)
    out = []
    with plan_installed(tr):
        for _ in range(num_images):
            sched = flux_scheduler(pipe, num_inference_steps, z_tokens.shape[1], device)
            noise = torch.randn(canvas.shape, generator=generator, device=device, dtype=canvas.dtype)
            x = pack_canvas(noise)[0]
            den = SynCDDenoiser(tr, cond, img_ids, (h, w), n, guidance_scale=guidance_scale,
                                true_cfg_scale=true_cfg_scale, image_guidance_scale=image_guidance_scale,
                                backend=backend)
            x = sample(den, sched, x, hooks=[ClampReferences(z_tokens, m)], progress=progress)
            lat = split_canvas(unpack_canvas(x, (h, n * w)), n)[:, 0]
            img = decode_latents(vae, lat.to(vae.dtype)).float().clamp(-1, 1)
            arr = ((img[0].permute(1, 2, 0) + 1) * 127.5).round().byte().cpu().numpy()
            out.append(Image.fromarray(arr))
    return out


def resize_like(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
