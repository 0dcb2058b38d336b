"""SynCD FLUX sampling with references (§3): the references sit clean beside the target on one canvas,
re-clamped before every transformer call; guidance from up to three passes (full shared attention with the
prompt, neg_mode block-diagonal with the negative prompt, full with the negative prompt)."""
from __future__ import annotations

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
from syncd.canvas import make_canvas, neg_mode_plan, pack_canvas, slot_mask, unpack_canvas
from syncd.guidance import normalized_guidance, true_cfg

NEGATIVE_PROMPT = "3d render, cartoon, low resolution, illustration, blurry, unrealistic"


def preprocess_reference(img: Image.Image, size: int = 512, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sample_flux.py's references: `square_crop_shortest_side` (offset ceil((long - short) / 2), its floor
    division of a negative number), PIL's default (bicubic) resize to size^2, 2 x cast to `dtype` (the model's),
    then / 255 - 1 in it: [3, size, size]."""
    w, h = img.size
    s = min(w, h)
    left, top = -((s - w) // 2), -((s - h) // 2)
    img = img.convert("RGB").crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()
    return (2.0 * x).to(dtype) / 255.0 - 1.0


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
        # the original casts t to the latents' dtype before dividing by 1000 (differs from (t / 1000) in bf16)
        return self.tr(hidden_states=x, timestep=t.expand(x.shape[0]).to(x.dtype) / 1000,
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


def calculate_shift(scheduler_config, image_seq_len: int) -> float:
    """mu of the original pipeline's calculate_shift (its operation order) with the scheduler's constants."""
    c = scheduler_config
    m = (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) / (c.get("max_image_seq_len", 4096)
                                                                - c.get("base_image_seq_len", 256))
    b = c.get("base_shift", 0.5) - m * c.get("base_image_seq_len", 256)
    return image_seq_len * m + b


def flux_scheduler(pipe, num_inference_steps: int, image_seq_len: int, device=None):
    """The pipe's FlowMatch Euler with sigmas linspace(1, 1/N, N) and the resolution shift of the canvas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    kw = {}
    if sched.config.get("use_dynamic_shifting", False):
        kw["mu"] = calculate_shift(sched.config, image_seq_len)
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
    # the pipeline's max_sequence_length = 512 T5 tokens (whatever the tokenizer's model_max_length)
    cond = build_conditioning(pipe, [prompt], [negative_prompt], do_cfg=true_cfg_scale > 1.0, device=device,
                              max_sequence_length=512)
    out = []
    with plan_installed(tr):
        for _ in range(num_images):
            # the original draws the starting noise first (its per-image generator's first draw) and re-encodes
            # the references for every image (a fresh posterior sample; here from the same generator, after it)
            c, h, w = vae.config.latent_channels, refs.shape[-2] // pipe.vae_scale_factor, refs.shape[-1] // pipe.vae_scale_factor
            noise = torch.randn((1, c, h, n * w), generator=generator, device=device, dtype=vae.dtype)
            z_ref = encode_syncd(vae, refs, generator)  # [k, C, h, w]
            canvas = make_canvas(torch.cat([torch.zeros_like(z_ref[:1]), z_ref])[None])  # [1, C, h, n*w]
            z_tokens, img_ids = pack_canvas(canvas)
            m = slot_mask((h, w), n, 0, device)[None, :, None].to(z_tokens.dtype)
            sched = flux_scheduler(pipe, num_inference_steps, z_tokens.shape[1], device)
            x = pack_canvas(noise.to(canvas.dtype))[0]
            den = SynCDDenoiser(tr, cond, img_ids, (h, w), n, guidance_scale=guidance_scale,
                                true_cfg_scale=true_cfg_scale, image_guidance_scale=image_guidance_scale,
                                backend=backend)
            x = sample(den, sched, x, hooks=[ClampReferences(z_tokens, m)], progress=progress)
            img = decode_canvas(vae, unpack_canvas(x, (h, n * w)))[..., : refs.shape[-1]]
            out.append(to_pil(img[0]))
    return out


def decode_canvas(vae, canvas: torch.Tensor) -> torch.Tensor:
    """The whole final canvas [B, C, h, n*w] (references as the last step left them, not re-clamped) decoded
    in one go with VAE tiling on, as the original pipeline (`enable_vae_tiling`; the decoder's mid-block
    attention lets the references touch the target's pixels): images [B, 3, H, n*W] in [-1, 1], float32."""
    tiling = vae.use_tiling
    vae.use_tiling = True
    try:
        return decode_latents(vae, canvas.to(vae.dtype)).float()
    finally:
        vae.use_tiling = tiling


def to_pil(img: torch.Tensor) -> Image.Image:
    """[3, H, W] in ~[-1, 1] -> uint8 as sample_flux.py: clip, (x * 0.5 + 0.5) * 255 truncated (not rounded)."""
    arr = (torch.clip(img.float(), -1.0, 1.0).permute(1, 2, 0).cpu().numpy() * 0.5 + 0.5) * 255
    return Image.fromarray(arr.astype(np.uint8))


def resize_like(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
