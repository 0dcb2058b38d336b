"""Arbitrary-size images: SD latent windows with stride, synchronized, decoded and averaged in RGB."""
from __future__ import annotations

import argparse

import torch

from common.errors import UsageError
from common.io import atomic_save_image
from common.pipelines.latents import decode_latents
from common.pipelines.text2image import prepare, to_pil
from synctweedies.apps.loading import load_sd
from synctweedies.apps.view_sampling import ring_plan, sample_with_view_attention
from synctweedies.memory import check_fits, wide_image_bytes
from synctweedies.outputs import make_save_dir
from synctweedies.registry import register_app
from synctweedies.runtime import check_fraction, derived_rgb_size, finish_run, start_run
from synctweedies.sampler import ORIGINAL_STEP_SEED, SyncOptions
from synctweedies.wide import WindowProjection

POSITIVE_PREFIX = "Best quality, extremely detailed "


def unet_multiple(unet) -> int:
    """Latent sides must be divisible by this for the UNet's down/up-sampling to line up."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def decode_in_chunks(vae, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    return torch.cat([decode_latents(vae, x) for x in latents.split(chunk)]).float()


def window_summary(proj: WindowProjection, requested: int) -> str:
    """One line: how many windows, their size and stride, whether they overlap (synchronise anything)."""
    overlap = bool((proj.count_map() > 1).any())
    h, w = proj.window
    line = (f"wide_image: {proj.num_instances} window(s) of {h}x{w} latent px, stride {proj.stride}, on a "
            f"{proj.canonical_hw[0]}x{proj.canonical_hw[1]} latent canvas; "
            + ("windows overlap" if overlap else "windows do not overlap: nothing is synchronised"))
    if (h, w) != (requested, requested):
        line += f" (window clamped from {requested} to the canvas)"
    return line


def initial_noise(pipe, proj: WindowProjection, factor: int, generator, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_T [1, C, H, W], x_T [N, C, h, w]) drawn in the original's order: the canvas first, then the windows,
    both always (x_T is replaced by f(z_T) for canonical cases and --initialize_xt_from_zt)."""
    (h, w), (wh, ww), c = proj.canonical_hw, proj.window, pipe.unet.config.in_channels
    device = pipe._execution_device
    z_T = pipe.prepare_latents(1, c, h * factor, w * factor, dtype, device, generator, None)
    x_T = pipe.prepare_latents(proj.num_instances, c, wh * factor, ww * factor, dtype, device, generator, None)
    return z_T, x_T


def final_latent_views(proj: WindowProjection, result) -> torch.Tensor:
    """What the original decodes: f(g(X_0)) for instance cases, f(z_0) for canonical ones, i.e. f(canonical)."""
    return proj.forward(result.canonical)


def average_rgb_views(rgb_proj: WindowProjection, rgb_views: torch.Tensor) -> torch.Tensor:
    """Decoded views [N, 3, 8h, 8w] in [-1, 1] -> the image [1, 3, H, W]: each view clamped to [-1, 1] before the
    count-weighted average, as the original's xs_to_pil_img (clamp to [0, 1] per view, then average)."""
    return rgb_proj.inverse(rgb_views.clamp(-1, 1))


@register_app("wide_image")
def run(args: argparse.Namespace) -> dict:
    for flag in ("panorama_height", "panorama_width"):
        value = getattr(args, flag)
        if value <= 0 or value % 8:
            raise UsageError(f"--{flag} must be a positive multiple of 8, got {value}")
    check_fraction("mvd_end", args.mvd_end)
    check_fraction("ref_attention_end", args.ref_attention_end)
    run_start = start_run(args, args.save_top_dir, args.tag or "wide_image")
    generator = run_start.generator
    pipe, _ = load_sd(args, run_start.device, run_start.dtype, original="sd", what="wide images")
    factor = pipe.vae_scale_factor
    if args.latent_instance_size is None:  # the model's native latent size (SD2-base: 64, as the original)
        args.latent_instance_size = int(pipe.unet.config.sample_size)
    derived_rgb_size(args, "rgb_instance_size", "latent_instance_size", factor)
    need, windows = wide_image_bytes(args.panorama_height, args.panorama_width, args.latent_instance_size,
                                     args.window_stride, factor)
    check_fits(need, run_start.device, f"a {args.panorama_width}x{args.panorama_height} wide image ({windows:,} "
               "windows)", "use a smaller --panorama_width / --panorama_height or a larger --window_stride")
    lat_h, lat_w = args.panorama_height // factor, args.panorama_width // factor
    proj = WindowProjection(lat_h, lat_w, args.latent_instance_size, args.window_stride)
    mult = unet_multiple(pipe.unet)
    if proj.window[0] % mult or proj.window[1] % mult:
        raise UsageError(f"latent windows of {proj.window[0]}x{proj.window[1]} do not fit the UNet (sides must be "
                         f"multiples of {mult}): use a canvas of at least {args.latent_instance_size * factor} px "
                         f"or sides that are multiples of {mult * factor} px")
    n = proj.num_instances
    print(window_summary(proj, args.latent_instance_size))
    out = make_save_dir(args.save_top_dir, args.tag or "wide_image", args.save_dir_now)
    z_T, x_T = initial_noise(pipe, proj, factor, generator, run_start.dtype)
    setup = prepare(pipe, [POSITIVE_PREFIX + args.prompt] * n, [args.negative_prompt] * n,
                    num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                    height=proj.window[0] * factor, width=proj.window[1] * factor, generator=generator, latents=x_T)
    plan = ring_plan(n, args.max_batch_size)
    options = SyncOptions(args.case_num, args.mvd_end, args.initialize_xt_from_zt, args.sampling_method, args.eta,
                          step_generator=torch.Generator(run_start.device).manual_seed(ORIGINAL_STEP_SEED))
    result = sample_with_view_attention(pipe, setup, proj, options, plan, ref_attention_end=args.ref_attention_end,
                                        x_T=setup.x_T, z_T=z_T, generator=generator, progress=not args.no_progress)
    with torch.no_grad():
        rgb_views = decode_in_chunks(pipe.vae, final_latent_views(proj, result)).clamp(-1, 1)
    image = average_rgb_views(proj.scaled(factor), rgb_views)
    path = out / f"final_{args.seed}.png"
    atomic_save_image(to_pil(image.clamp(-1, 1))[0], path)
    finish_run(out, args, f"{path} ({image.shape[-1]}x{image.shape[-2]}, {n} windows)")
    return {"dir": out, "image": image, "num_views": n, "views": rgb_views, "projection": proj,
            "latent_views": result.instances}
