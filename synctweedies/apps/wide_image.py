"""Arbitrary-size images: SD latent windows with stride, synchronized, decoded and averaged in RGB."""
from __future__ import annotations

import argparse
import json

import torch
from diffusers import DDPMScheduler

from common.attention.reference import ViewContext
from common.errors import UsageError
from common.io import atomic_save_image, atomic_write_text
from common.models.adapters import apply_adapters
from common.models.loading import load_pipeline, pipeline_family
from common.pipelines.latents import decode_latents
from common.pipelines.text2image import prepare, to_pil, use_ddim
from synctweedies.apps.view_sampling import sample_with_view_attention
from synctweedies.outputs import make_save_dir
from synctweedies.runtime import check_fraction, device_of, dtype_of, seed_everything
from synctweedies.sampler import SyncOptions
from synctweedies.wide import WindowProjection

POSITIVE_PREFIX = "Best quality, extremely detailed "


def unet_multiple(unet) -> int:
    """Latent sides must be divisible by this for the UNet's down/up-sampling to line up."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def decode_in_chunks(vae, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    return torch.cat([decode_latents(vae, x) for x in latents.split(chunk)]).float()


def run(args: argparse.Namespace) -> dict:
    for flag in ("panorama_height", "panorama_width"):
        value = getattr(args, flag)
        if value <= 0 or value % 8:
            raise UsageError(f"--{flag} must be a positive multiple of 8, got {value}")
    if args.window_stride <= 0:
        raise UsageError("--window_stride must be positive")
    check_fraction("mvd_end", args.mvd_end)
    check_fraction("ref_attention_end", args.ref_attention_end)
    device = device_of(args)
    dtype = dtype_of(args, device)
    generator = seed_everything(args.seed)
    spec = args.sd_path if args.model == "sd" else args.model
    pipe = load_pipeline(spec, torch_dtype=dtype, device=device)
    if pipeline_family(pipe) != "sd":
        raise UsageError(f"wide images need a Stable Diffusion (SD 1.x/2.x) model, got {spec}")
    apply_adapters(pipe, args.adapters)
    use_ddim(pipe, keep=(DDPMScheduler,))  # DDIM timesteps for the synchronised steps
    factor = pipe.vae_scale_factor
    if args.rgb_instance_size != args.latent_instance_size * factor:
        raise UsageError(f"--rgb_instance_size ({args.rgb_instance_size}) must be --latent_instance_size "
                         f"({args.latent_instance_size}) x {factor}")
    lat_h, lat_w = args.panorama_height // factor, args.panorama_width // factor
    proj = WindowProjection(lat_h, lat_w, args.latent_instance_size, args.window_stride)
    mult = unet_multiple(pipe.unet)
    if proj.window[0] % mult or proj.window[1] % mult:
        raise UsageError(f"latent windows of {proj.window[0]}x{proj.window[1]} do not fit the UNet (sides must be "
                         f"multiples of {mult}): use a canvas of at least {args.latent_instance_size * factor} px "
                         f"or sides that are multiples of {mult * factor} px")
    n = proj.num_instances
    out = make_save_dir(args.save_top_dir, args.tag or "wide_image", args.save_dir_now)
    setup = prepare(pipe, [POSITIVE_PREFIX + args.prompt] * n, [args.negative_prompt] * n,
                    num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                    height=proj.window[0] * factor, width=proj.window[1] * factor, generator=generator)
    context = ViewContext(num_views=n, neighbours=(-1, 1), circular=True, reference=(n // 2,),
                          max_batch=args.max_batch_size)
    options = SyncOptions(args.case_num, args.mvd_end, args.initialize_xt_from_zt, args.sampling_method, args.eta)
    result = sample_with_view_attention(pipe, setup, proj, options, context, ref_attention_end=args.ref_attention_end,
                                        x_T=setup.x_T, generator=generator, progress=not args.no_progress)
    with torch.no_grad():
        rgb_views = decode_in_chunks(pipe.vae, result.instances)
    image = proj.scaled(factor).inverse(rgb_views)
    path = out / f"final_{args.seed}.png"
    atomic_save_image(to_pil(image.clamp(-1, 1))[0], path)
    atomic_write_text(out / "args.json", json.dumps(vars(args), indent=2, default=str) + "\n")
    print(f"wrote {path} ({image.shape[-1]}x{image.shape[-2]}, {n} windows)")
    return {"dir": out, "image": image, "num_views": n}
