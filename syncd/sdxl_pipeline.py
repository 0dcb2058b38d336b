"""SynCD SDXL sampling (§3.4, `sample.py`): each step the references, noised to t, run once through the UNet
with the LoRA off and write their self-attention inputs into a bank; the target then runs
three ways - e_u (negative prompt, no references), e_i (negative prompt + references), e_c (prompt +
references) - combined by the normalised guidance with the time-varying image scale
s_img(t) = s0 + s_adapt (1000 - t) / 1000.

Optional IP-Adapter-Plus global image condition (`ip-adapter-plus_sdxl_vit-h.bin`, with the fine-tuned
to_k_ip/to_v_ip of `sdxl_finetuned_20k.ckpt` or of our SDXL training on top): the FIRST reference image,
through `added_cond_kwargs["image_embeds"]`, for e_i and e_c at the handle's scale (`ip_adapter_scale`); e_u gets
the negative (zero-image) embeds, so it stays text- and image-unconditional. As the original pipeline (and
training), the reference-write pass gives each reference its OWN image embeds at IP-Adapter scale 1.0."""
from __future__ import annotations

import contextlib
import inspect

import torch
from PIL import Image

from common.errors import UsageError
from common.models.ip_adapter import IPAdapter, loaded_ip_adapters

from common.attention.plan import AttentionPlan, KVBank
from common.attention.schedule import plan_installed
from common.pipelines.conditioning import build_conditioning
from common.pipelines.latents import decode_latents, encode_images
from common.pipelines.loop import sample
from common.train.conditioning import sdxl_add_time_ids
from common.train.lora import lora_disabled
from syncd.guidance import image_guidance_scale_at, normalized_guidance


class SDXLReferenceDenoiser:
    """denoiser(x_t [1, C, h, w], t, step) with the per-step reference write (LoRA off) and guided read."""

    def __init__(self, pipe, cond, ref_cond, z_ref: torch.Tensor, generator: torch.Generator | None,
                 masks: torch.Tensor | None,
                 size: int, *, guidance_scale: float, image_guidance_scale: float, adaptive_image_guidance_scale: float,
                 ip_embeds: tuple[torch.Tensor, torch.Tensor] | None = None, ref_ip_embeds: torch.Tensor | None = None,
                 ip_adapter: IPAdapter | None = None):
        self.pipe, self.unet, self.sched = pipe, pipe.unet, pipe.scheduler
        self.cond, self.ref_cond = cond, ref_cond
        self.z_ref, self.generator = z_ref, generator  # references are re-noised with fresh noise every step
        self.bank = KVBank(masks=masks, project_on_read=True)  # refs' K/V projected in the read pass, as the original
        self.time_ids = sdxl_add_time_ids((size, size), (0, 0), (size, size), batch=1, device=z_ref.device)
        self.s_txt, self.s0, self.s_adapt = guidance_scale, image_guidance_scale, adaptive_image_guidance_scale
        self.has_lora = any("lora_" in n for n, _ in self.unet.named_parameters())
        self.ip_pos, self.ip_neg = ip_embeds if ip_embeds is not None else (None, None)  # [1, 1, L, W] each
        self.ref_ip = ref_ip_embeds  # [k, 1, L, W]: each reference's own image (the write pass)
        self.ip_adapter = ip_adapter

    def _unet(self, x, t, embeds, pooled, bank_mode: str, image: torch.Tensor | None = None):
        self.bank.mode = bank_mode
        b = x.shape[0]
        dtype = self.unet.dtype
        added = {"text_embeds": pooled.expand(b, -1).to(dtype), "time_ids": self.time_ids.expand(b, -1).to(dtype)}
        if image is not None:
            added["image_embeds"] = [(image if image.shape[0] == b else image.expand(b, *image.shape[1:])).to(dtype)]
        x = self.sched.scale_model_input(x, t)  # identity for DDIM/DDPM; Euler divides by sqrt(sigma^2 + 1)
        return self.unet(x.to(dtype), t, encoder_hidden_states=embeds.expand(b, -1, -1).to(dtype),
                         added_cond_kwargs=added,
                         cross_attention_kwargs={"plan": AttentionPlan(kv_bank=self.bank)}, return_dict=False)[0]

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        r = self.z_ref.shape[0]
        noise = torch.randn(self.z_ref.shape, generator=self.generator, device=self.z_ref.device, dtype=self.z_ref.dtype)
        refs = self.sched.add_noise(self.z_ref, noise, t.reshape(1).expand(r))  # the original draws new noise each step
        self.bank.clear()
        ctx = lora_disabled(self.unet) if self.has_lora else contextlib.nullcontext()
        with ctx, ip_scale(self.ip_adapter, 1.0):
            self._unet(refs, t, self.ref_cond.embeds, self.ref_cond.pooled, "write", self.ref_ip)
        self.bank.read_index = torch.arange(r, device=x_t.device)[None]
        c = self.cond
        e_u = self._unet(x_t, t, c.negative, c.negative_pooled, "off", self.ip_neg)
        e_i = self._unet(x_t, t, c.negative, c.negative_pooled, "read", self.ip_pos)
        e_c = self._unet(x_t, t, c.embeds, c.pooled, "read", self.ip_pos)
        s_img = image_guidance_scale_at(float(t), self.s0, self.s_adapt)
        return normalized_guidance(e_u, e_i, e_c, self.s_txt, s_img).to(x_t.dtype)


@torch.no_grad()
def generate_sdxl(pipe, prompt: str, refs: torch.Tensor, masks: torch.Tensor | None = None, *, ref_prompt: str = "",
                  num_inference_steps: int = 50, guidance_scale: float = 7.5, image_guidance_scale: float = 8.0,
                  adaptive_image_guidance_scale: float = 5.0, negative_prompt: str = "",
                  generator: torch.Generator | None = None, progress: bool = True,
                  ip_adapter: IPAdapter | None = None) -> Image.Image:
    """refs [k, 3, S, S] in [-1, 1], masks bool [k, S, S] or None -> one S x S image.

    `ip_adapter`: a loaded `common.models.ip_adapter.IPAdapter` (its scale is the original's `ip_adapter_scale`);
    the first reference is its global image."""
    unet, device = pipe.unet, pipe.unet.device
    if loaded_ip_adapters(unet) != (ip_adapter is not None):
        raise UsageError(f"{loaded_ip_adapters(unet)} IP-Adapter(s) on the UNet; SynCD SDXL takes its handle, or none")
    size = refs.shape[-1]
    z_ref = encode_images(pipe.vae, refs.to(device), generator)
    cond = build_conditioning(pipe, [prompt], [negative_prompt], do_cfg=True, device=device)
    ref_cond = build_conditioning(pipe, [ref_prompt] * refs.shape[0], do_cfg=False, device=device)
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    shape = (1, z_ref.shape[1], z_ref.shape[2], z_ref.shape[3])
    x = torch.randn(shape, generator=generator, device=device, dtype=z_ref.dtype) * pipe.scheduler.init_noise_sigma
    den = SDXLReferenceDenoiser(pipe, cond, ref_cond, z_ref, generator,
                                None if masks is None else masks.to(device), size, guidance_scale=guidance_scale,
                                image_guidance_scale=image_guidance_scale,
                                adaptive_image_guidance_scale=adaptive_image_guidance_scale,
                                ip_embeds=None if ip_adapter is None else ip_adapter.encode(reference_pil(refs[0])),
                                ref_ip_embeds=None if ip_adapter is None else reference_embeds(ip_adapter, refs),
                                ip_adapter=ip_adapter)
    with plan_installed(unet, where="attn1"):
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(pipe.scheduler.step).parameters else {}
        x = sample(den, pipe.scheduler, x, progress=progress, extra_step_kwargs=step_kwargs)
    return reference_pil(decode_latents(pipe.vae, x).float().clamp(-1, 1)[0])


def reference_embeds(ip_adapter: IPAdapter, refs: torch.Tensor) -> torch.Tensor:
    """refs [k, 3, S, S] in [-1, 1] -> each reference's own image embeds [k, 1, L, W] (plus) / [k, 1, E] (plain)."""
    feats = ip_adapter.image_encoder.encode([reference_pil(r) for r in refs], ip_adapter.feature)
    return feats[:, None]


@contextlib.contextmanager
def ip_scale(ip_adapter: IPAdapter | None, scale: float):
    """The IP-Adapter at `scale` inside the block (the original's change_ipadapter_scale(1.0) around the
    reference pass), its own scale restored after; no-op without an adapter."""
    if ip_adapter is None:
        yield
        return
    before = ip_adapter.scale
    ip_adapter.set_scale(scale)
    try:
        yield
    finally:
        ip_adapter.set_scale(before)


def reference_pil(img: torch.Tensor) -> Image.Image:
    """[3, S, S] in [-1, 1] -> PIL (what the CLIP image processor of the IP-Adapter takes, at 224 px)."""
    img = img.float().clamp(-1, 1)
    return Image.fromarray(((img.permute(1, 2, 0) + 1) * 127.5).round().byte().cpu().numpy())
