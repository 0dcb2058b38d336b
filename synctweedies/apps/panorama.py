"""360-degree panoramas: depth-conditioned perspective views of an equirectangular canvas.

Latent views are synchronised through a large latent pano (or, with --average_rgb, through the decoded RGB
pano); the final views are decoded and averaged into the RGB pano. Artefacts: final.png (the pano),
view_i.png, crop_i.png (random 60-degree perspective crops) and strip.png (renders all around 360 degrees).
"""
from __future__ import annotations

import argparse
import random

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from common.errors import UsageError
from common.io import atomic_save_image
from common.pipelines.denoisers import ControlSpec
from common.pipelines.text2image import prepare, to_pil
from common.render.panorama import sample_perspective
from synctweedies.apps.loading import load_sd
from synctweedies.apps.sdedit import sdedit_start
from synctweedies.apps.view_sampling import ring_plan, sample_with_view_attention
from synctweedies.memory import check_fits, panorama_bytes
from synctweedies.apps.wide_image import decode_in_chunks
from synctweedies.cases import get_case
from synctweedies.decoded import DecodedProjection
from synctweedies.depth import control_disparity
from synctweedies.outputs import make_save_dir, save_images, sheet
from synctweedies.panorama import PanoramaProjection, view_angles
from synctweedies.registry import register_app
from synctweedies.runtime import check_fraction, derived_rgb_size, finish_run, start_run
from synctweedies.sampler import SyncOptions


def load_models(args: argparse.Namespace, device, dtype, with_control: bool):
    """SD 1.5 + depth ControlNet (--model controlnet), or a preset (tiny-sd pairs with tiny-controlnet)."""
    return load_sd(args, device, dtype, original="controlnet", what="panoramas",
                   controlnet=args.controlnet_path if with_control else None)


def scale_schedule(start: float, end: float):
    """ControlNet scale interpolated linearly from `start` (first step) to `end` (last step)."""
    return lambda step, num_steps: start + (end - start) * step / max(num_steps - 1, 1)


def validate(args: argparse.Namespace) -> None:
    if not 0 < args.FOV < 180:
        raise UsageError(f"--FOV must be between 0 and 180 degrees (exclusive), got {args.FOV}")
    for name in ("mvd_end", "ref_attention_end", "control_guidance_start", "control_guidance_end", "sdedit_timestep"):
        check_fraction(name, getattr(args, name))
    if args.average_rgb and args.case_num != 2:
        raise UsageError("--average_rgb averages decoded Tweedie estimates: use it with --case_num 2")
    if args.compact_sync and get_case(args.case_num).canonical:
        raise UsageError("--compact_sync needs an instance case (0-3): canonical cases keep the full pano")
    if args.sdedit and not args.sdedit_image:
        raise UsageError("--sdedit needs --sdedit_image (an equirectangular RGB pano)")


def load_rgb(path: str, h: int, w: int) -> torch.Tensor:
    """An image as [1, 3, h, w] in [-1, 1]."""
    try:
        img = PIL.Image.open(path).convert("RGB").resize((w, h), PIL.Image.BICUBIC)
    except OSError as e:
        raise UsageError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


@register_app("panorama")
def run(args: argparse.Namespace) -> dict:
    validate(args)
    run_start = start_run(args, args.save_top_dir, args.tag or "panorama")
    device, dtype, generator = run_start.device, run_start.dtype, run_start.generator
    latent_hw, rgb_hw = (args.canonical_latent_h, args.canonical_latent_w), (args.canonical_rgb_h, args.canonical_rgb_w)
    check_fits(panorama_bytes(latent_hw, rgb_hw, 4, dtype, args.compact_sync), device,  # SD: 4 latent channels
               f"a {latent_hw[1]}x{latent_hw[0]} latent / {rgb_hw[1]}x{rgb_hw[0]} RGB pano",
               "use smaller --canonical_latent_h/w and --canonical_rgb_h/w")
    angles = view_angles(tuple(args.theta_range), args.theta_interval, tuple(args.phi_range), args.phi_interval)
    depth = control_disparity(args.depth_data_path) if args.depth_data_path else None
    pipe, controlnet = load_models(args, device, dtype, depth is not None)
    factor = pipe.vae_scale_factor
    derived_rgb_size(args, "instance_rgb_size", "instance_latent_size", factor)
    latent_proj = PanoramaProjection(args.canonical_latent_h, args.canonical_latent_w, args.instance_latent_size,
                                     angles, args.FOV, compact_sync=args.compact_sync)
    rgb_proj = PanoramaProjection(args.canonical_rgb_h, args.canonical_rgb_w, args.instance_rgb_size, angles, args.FOV)
    n = len(angles)
    out = make_save_dir(args.save_top_dir, args.tag or "panorama", args.save_dir_now)

    control = None
    if depth is not None:
        disp = F.interpolate(depth, (args.canonical_rgb_h, args.canonical_rgb_w), mode="bilinear", align_corners=False)
        cond = rgb_proj.forward(disp).repeat(1, 3, 1, 1).to(device, dtype)  # [N, 3, s, s] in [0, 1]
        control = ControlSpec(controlnet, cond, scale_schedule(args.conditioning_scale, args.conditioning_scale_end),
                              args.control_guidance_start, args.control_guidance_end)
        save_images(cond * 2 - 1, out, "depth_view_{}.png")
    setup = prepare(pipe, [args.prompt] * n, [args.negative_prompt] * n, num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale, height=args.instance_rgb_size, width=args.instance_rgb_size,
                    generator=generator, control=control)
    projection = latent_proj
    if args.average_rgb:
        projection = DecodedProjection(rgb_proj, pipe.vae, factor, generator, chunk=args.max_batch_size)
    timesteps, x_T, z_T = setup.timesteps, setup.x_T, None
    if args.sdedit:
        views = rgb_proj.forward(load_rgb(args.sdedit_image, args.canonical_rgb_h, args.canonical_rgb_w))
        timesteps, x_T, z_T = sdedit_start(pipe, views, latent_proj, setup, generator,
                                           sdedit_timestep=args.sdedit_timestep, max_batch_size=args.max_batch_size,
                                           initialize_xt_from_zt=args.initialize_xt_from_zt, case_num=args.case_num)
        if projection is not latent_proj:
            z_T = None
    plan = ring_plan(n, args.max_batch_size)
    options = SyncOptions(args.case_num, args.mvd_end, args.initialize_xt_from_zt, args.sampling_method, args.eta)
    if args.average_rgb and args.initialize_xt_from_zt and not args.sdedit:
        # the decoded projection's canonical is an RGB pano: draw the shared noise on the latent pano instead
        noise = latent_proj.canonical_noise(x_T.shape[1], generator, x_T.device, x_T.dtype)
        x_T = latent_proj.forward(noise, bg=x_T)
    if args.sdedit or args.average_rgb:
        options.initialize_xt_from_zt = False  # the start state is made above; do not redraw it from z_T
    result = sample_with_view_attention(pipe, setup, projection, options, plan,
                                        ref_attention_end=args.ref_attention_end, timesteps=timesteps, x_T=x_T,
                                        z_T=z_T, generator=generator, progress=not args.no_progress)
    with torch.no_grad():
        views = decode_in_chunks(pipe.vae, result.instances, args.max_batch_size)
    pano = rgb_proj.inverse(views)
    save_artefacts(out, pano, rgb_proj.forward(pano), args)
    finish_run(out, args, f"{out / 'final.png'} ({pano.shape[-1]}x{pano.shape[-2]}, {n} views)")
    return {"dir": out, "pano": pano, "views": views}


def save_artefacts(out, pano: torch.Tensor, views: torch.Tensor, args) -> None:
    """final.png, view_i.png, crop_i.png (random 60-degree crops) and strip.png (8 renders around 360)."""
    pano = pano.clamp(-1, 1)
    atomic_save_image(to_pil(pano)[0], out / "final.png")
    save_images(views.clamp(-1, 1), out, "view_{}.png")
    size = args.instance_rgb_size
    rng = random.Random(args.seed)
    crops = [sample_perspective(pano[0], rng.uniform(0, 360), rng.uniform(-15, 15), 60, size)
             for _ in range(args.num_random_crops)]
    if crops:
        save_images(torch.stack(crops), out, "crop_{}.png")
    strip = torch.stack([sample_perspective(pano[0], theta, 0, 90, size) for theta in range(0, 360, 45)])
    atomic_save_image(sheet(strip, pad=0), out / "strip.png")
