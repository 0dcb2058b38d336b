"""3D Gaussian texturing: new per-Gaussian colours from depth-conditioned renders of the dataset cameras.

The geometry of a pretrained 3DGS scene stays fixed; the sampler runs on the latent renders and the
canonical colours are found by the Adam inverse (GaussianProjection). The final views are decoded and a last
fit (--final_iterations) gives RGB colours. Artefacts: final.ply (3DGS layout, degree-0 colours), render_i.png,
renders.png, control_i.png, optionally intermediate/ previews.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from common.errors import UsageError
from common.io import atomic_save_image
from common.pipelines.text2image import prepare
from common.render.cameras import load_blender, load_colmap
from common.render.gaussians import load_ply, render_gaussians, rgb_to_sh_dc, save_ply
from common.render.raster.maps import normalize_depth
from synctweedies.apps.geometry_common import PreviewHook, color_latents, control_spec, load_control_pipeline
from synctweedies.apps.view_sampling import ring_plan, sample_with_view_attention
from synctweedies.apps.wide_image import decode_in_chunks
from synctweedies.cases import get_case
from synctweedies.gaussian import GaussianProjection, square_cameras
from synctweedies.outputs import make_save_dir, save_images, sheet
from synctweedies.registry import register_app
from synctweedies.runtime import check_fraction, finish_run, start_run
from synctweedies.sampler import SyncOptions


def validate(args: argparse.Namespace) -> None:
    for name in ("mvd_end", "ref_attention_end", "control_guidance_start", "control_guidance_end"):
        check_fraction(name, getattr(args, name))
    for flag in ("enable_opacity", "enable_xyz", "enable_covariance"):
        if getattr(args, flag):
            raise UsageError(f"--{flag} is not supported: this build optimises colours only (geometry stays fixed)")
    if not args.plyfile:
        raise UsageError("--plyfile is required: the pretrained 3DGS point cloud (.ply)")
    if not args.source_path:
        raise UsageError("--source_path is required: the dataset folder with the cameras")
    if get_case(args.case_num).canonical and args.canonical_domain == "rgb":
        raise UsageError(f"--case_num {args.case_num} denoises the canonical colours, which only works with "
                         "--canonical_domain latent (rgb colours are no Gaussian noise); or use an instance case 0-3")


def load_cameras(args: argparse.Namespace):
    """Dataset cameras (blender: transforms_train.json; colmap / dense / sparse: a COLMAP model), first N."""
    path = Path(args.source_path)
    if not path.exists():
        raise UsageError(f"--source_path {path} does not exist")
    if args.dataset_type == "blender":
        cams, _ = load_blender(path, "train")
    else:
        cams, _ = load_colmap(path)
    return cams[:min(args.total_image_to_use, len(cams))]


@register_app("gs")
def run(args: argparse.Namespace) -> dict:
    validate(args)
    run_start = start_run(args, args.save_top_dir, args.tag)
    device, dtype, generator = run_start.device, run_start.dtype, run_start.generator
    gaussians = load_ply(args.plyfile).to(device)
    cams = load_cameras(args).to(device)
    n = len(cams)
    pipe, controlnet = load_control_pipeline(args, device, dtype)  # also checks the view sizes
    out = make_save_dir(args.save_top_dir, args.tag, args.save_dir_now)
    lat_cams, rgb_cams = square_cameras(cams, args.latent_view_size), square_cameras(cams, args.rgb_view_size)
    bg_name = args.background_color
    bg_rgb = (1.0, 1.0, 1.0) if bg_name == "white" else (0.0, 0.0, 0.0)
    bg_latent = color_latents(pipe.vae, args.rgb_view_size, (bg_name,))[bg_name].float().mean((1, 2))  # [C]
    projection = GaussianProjection(
        gaussians, lat_cams, rgb_cams, domain=args.canonical_domain, vae=pipe.vae, background_rgb=bg_rgb,
        background_latent=bg_latent, iterations=args.iterations, lr=args.feature_lr,
        color_assign_method=args.color_assign_method, antialiased=args.antialiased, force_clean_composition=
        args.force_clean_composition, views_per_step=args.views_per_step, generator=generator,
        chunk=args.max_batch_size)
    with torch.no_grad():
        _, alpha, depth = render_gaussians(gaussians, rgb_cams, antialiased=args.antialiased)
    cond = normalize_depth(depth[:, 0], alpha[:, 0] > 0.5).repeat(1, 3, 1, 1).float()  # [N, 3, S, S]
    save_images(cond * 2 - 1, out, "control_{}.png")
    setup = prepare(pipe, [args.prompt] * n, [args.negative_prompt] * n, num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale, height=args.rgb_view_size, width=args.rgb_view_size,
                    generator=generator, guidance_rescale=args.guidance_rescale,
                    control=control_spec(args, controlnet, cond.to(device, dtype)))
    x_T = setup.x_T
    if args.zt_init:  # per-Gaussian latent noise rendered into the views, iid noise where nothing is rendered
        z = torch.randn(len(gaussians), x_T.shape[1], generator=generator).to(device)
        with torch.no_grad():
            col, a, _ = render_gaussians(gaussians, lat_cams, z, antialiased=args.antialiased)
        x_T = (col + (1 - a) * x_T.float()).to(x_T.dtype)
    plan = ring_plan(n, args.max_batch_size)
    options = SyncOptions(args.case_num, args.mvd_end, False, args.sampling_method, args.eta)
    hooks = []
    if args.log_interval > 0:
        hooks.append(PreviewHook(out / "intermediate", args.log_interval, pipe.vae, True, args.max_batch_size))
    result = sample_with_view_attention(pipe, setup, projection, options, plan,
                                        ref_attention_end=args.ref_attention_end, x_T=x_T, generator=generator,
                                        hooks=hooks, progress=not args.no_progress)
    with torch.no_grad():
        views = decode_in_chunks(pipe.vae, result.instances, args.max_batch_size)  # [N, 3, S, S] in [-1, 1]
    targets = (views / 2 + 0.5).clamp(0.001, 0.999)
    init = projection.warm.get("tweedie") if args.canonical_domain == "rgb" else None
    if args.color_assign_method == "zero":
        init = None
    elif args.color_assign_method == "instance":
        init = projection.instance_init(3) if args.canonical_domain == "rgb" else torch.logit(
            gaussians.rgb.clamp(1e-3, 1 - 1e-3))
    logits = projection.fit(targets, rgb_cams, projection.alpha_rgb, bg_rgb, args.final_iterations, init, "sigmoid")
    rgb = torch.sigmoid(logits)
    final = replace(gaussians, sh_dc=rgb_to_sh_dc(rgb), sh_rest=torch.zeros_like(gaussians.sh_rest))
    save_ply(out / "final.ply", final.to("cpu"))
    with torch.no_grad():
        renders = projection.render_rgb(logits).cpu()  # [N, 3, S, S] in [0, 1]
    save_images(renders * 2 - 1, out, "render_{}.png")
    atomic_save_image(sheet(renders * 2 - 1, pad=2), out / "renders.png")
    finish_run(out, args, f"{out / 'final.ply'} ({len(gaussians)} Gaussians, {n} views)")
    return {"dir": out, "colors": rgb.cpu(), "renders": renders, "latent_views": result.instances,
            "canonical": result.canonical}
