"""Ambiguous images: DeepFloyd IF stage I then stage II, each a synchronized run over the views.

Pixel space is required (views are pixel permutations / negation, which a VAE latent would not commute
with). Stage II conditions each view on its own upscaled stage-I view, no noise added, class label
--stage2_noise_level (the original); --stage2_condition canonical conditions every view on the view of one
noise-augmented upscaled stage-I canonical instead.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from common.errors import UsageError
from common.io import atomic_save_image
from common.models.adapters import apply_adapters
from common.models.loading import load_pipeline, pipeline_family
from common.pipelines.loop import Hook, StepState
from common.pipelines.text2image import prepare, to_pil
from synctweedies.anagram import StackProjection, ViewProjection
from synctweedies.cases import get_case
from synctweedies.outputs import make_save_dir, morph_frames, save_gif, save_images, sheet
from synctweedies.registry import register_app
from synctweedies.runtime import finish_run, start_run
from synctweedies.sampler import ALWAYS_SYNC, ORIGINAL_STEP_SEED, SyncOptions, sync_sample
from synctweedies.views import get_views


def load_stages(args: argparse.Namespace, device, dtype):
    """(stage I, stage II or None). --model deepfloyd uses the stage paths; tiny-if pairs with tiny-if-sr."""
    if args.model in ("deepfloyd", "if"):
        s1, s2 = args.stage_1_path, args.stage_2_path
    elif args.model == "tiny-if":
        s1, s2 = "tiny-if", "tiny-if-sr"
    else:
        s1, s2 = args.model, args.stage_2_path
    one = load_pipeline(s1, torch_dtype=dtype, device=device)
    apply_adapters(one, args.adapters)
    if pipeline_family(one) != "if":
        raise UsageError(f"ambiguous images need a DeepFloyd IF stage-I model (pixel space), got {s1}")
    two = None if args.skip_stage_2 else load_pipeline(s2, torch_dtype=dtype, device=device)
    if two is not None and pipeline_family(two) != "if-sr":
        raise UsageError(f"--stage_2_path must be a DeepFloyd IF super-resolution model, got {s2}")
    # as the original: one DDIM / DDPM scheduler made from stage I's config, shared by both stages
    one.scheduler = (DDIMScheduler if args.sampling_method == "ddim" else DDPMScheduler).from_config(
        one.scheduler.config)
    if two is not None:
        two.scheduler = one.scheduler
    return one, two


def apply_as_original(args: argparse.Namespace) -> None:
    """--as_original: every listed difference switched to the original's behaviour."""
    if args.as_original:
        args.x0_thresholding, args.inverse_warm_start = "off", "noise"
        args.inverse_lr_schedule, args.stack_noise_scale = "constant", "one"


def make_projection(args: argparse.Namespace, views, size: int, generator: torch.Generator | None = None):
    if args.optimize_inverse_mapping:
        return StackProjection(views, size, args.num_of_zs, args.iterations, args.lr,
                               warm_start=args.inverse_warm_start, lr_schedule=args.inverse_lr_schedule,
                               noise_scale=args.stack_noise_scale, generator=generator)
    return ViewProjection(views, size)


class PreviewHook(Hook):
    """Every `every` steps, keep the canonical image of g(x0|t) for logging (--log_step)."""

    def __init__(self, projection, every: int):
        self.projection, self.every, self.previews = projection, every, []

    def on_x0(self, state: StepState) -> None:
        if self.every > 0 and state.i % self.every == 0:
            self.previews.append((state.i, _canonical_image(self.projection, self.projection.inverse(state.x0))))


def initial_noise(pipe, projection, args: argparse.Namespace, generator) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(z_T or None, X_T) drawn as the original: canonical cases and --initialize_xt_from_zt draw only z_T
    (X_T = f(z_T)); the others draw the N views (one view repeated with --initialize_same_xt); n-to-1 then draws
    its three Adam warm starts (--inverse_warm_start noise)."""
    channels = pipe.unet.config.in_channels // (2 if pipeline_family(pipe) == "if-sr" else 1)
    size, device, dtype = pipe.unet.config.sample_size, pipe._execution_device, pipe.unet.dtype
    z_T = None
    if get_case(args.case_num).canonical or args.initialize_xt_from_zt:
        z_T = projection.canonical_noise(channels, generator=generator, device=device, dtype=dtype)
        x_T = projection.forward(z_T)
    else:
        n = projection.num_instances
        x_T = pipe.prepare_intermediate_images(1 if args.initialize_same_xt else n, channels, size, size, dtype,
                                               device, generator)
        x_T = x_T.expand(n, -1, -1, -1).clone() if args.initialize_same_xt else x_T
    if isinstance(projection, StackProjection):
        projection.draw_warm_starts(channels, device, dtype)
    return z_T, x_T


def run_stage(pipe, projection, prompts, args, generator, *, image=None, condition=None, step_generator=None):
    """One synchronized IF stage. Returns (SyncResult, previews). Stage II: `image` [N, 3, s, s] the stage-I
    views, `condition` [N, 3, S, S] what each view's UNet input is concatenated with."""
    family = pipeline_family(pipe)
    size = pipe.unet.config.sample_size
    z_T, x_T = initial_noise(pipe, projection, args, generator)
    # x_T is given, and stage II's condition is made by stage2_condition: prepare must draw nothing from `generator`
    setup = prepare(pipe, prompts, None, num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale, height=size, width=size, latents=x_T,
                    generator=torch.Generator(x_T.device).manual_seed(0), image=image,
                    noise_level=args.stage2_noise_level)
    if family == "if-sr":
        setup.denoiser.concat_inputs = condition.to(setup.x_T.dtype)
    setup.denoiser.learned_variance = False  # the original's CFG guides IF's variance channels too
    options = SyncOptions(args.case_num, ALWAYS_SYNC, args.initialize_xt_from_zt, args.sampling_method, args.eta,
                          step_generator=step_generator, threshold_x0=args.x0_thresholding == "scheduler")
    preview = PreviewHook(projection, args.log_step)
    result = sync_sample(setup.denoiser, pipe.scheduler, projection, options=options, timesteps=setup.timesteps,
                         x_T=x_T, z_T=z_T, generator=generator, hooks=[preview], progress=not args.no_progress)
    return result, preview.previews


def stage2_condition(pipe, stage1_views: torch.Tensor, canonical_image: torch.Tensor, views, size: int,
                     noise_level: int, generator, mode: str = "own_view") -> torch.Tensor:
    """What stage II's views are conditioned on: [N, 3, size, size].

    own_view (the original): upscale(stage-I view i), bilinear, no noise. canonical: the views of
    add_noise(upscale(stage-I canonical), noise_level). stage1_views [N, 3, s, s], canonical [1, 3, s, s].
    """
    if mode == "own_view":
        return F.interpolate(stage1_views, (size, size), mode="bilinear", align_corners=True)
    up = F.interpolate(canonical_image, (size, size), mode="bilinear", align_corners=True)
    noise = randn_tensor(up.shape, generator=generator, device=up.device, dtype=up.dtype)
    levels = torch.tensor([noise_level], device=up.device)
    up = pipe.image_noising_scheduler.add_noise(up, noise, timesteps=levels)
    return ViewProjection(views, size).forward(up)


@register_app("ambiguous_image")
def run(args: argparse.Namespace) -> dict:
    views = get_views(args.views_names, args.rotate_angle)
    if len(args.prompts) != len(views):
        raise UsageError(f"{len(args.prompts)} prompts for {len(views)} views: give one --prompts entry per "
                         "--views_names entry")
    if args.optimize_inverse_mapping and args.num_of_zs < 1:
        raise UsageError("--num_of_zs must be at least 1")
    apply_as_original(args)
    run_start = start_run(args, args.save_top_dir, args.tag)
    generator = run_start.generator
    one, two = load_stages(args, run_start.device, run_start.dtype)
    out = make_save_dir(args.save_top_dir, args.tag, args.save_dir_now)
    for p in (one, two):
        if p is not None:
            p.set_progress_bar_config(disable=True)
    prompts = [f"{args.style} {p}".strip() for p in args.prompts]
    s1 = one.unet.config.sample_size
    proj1 = make_projection(args, views, s1, generator)
    # step noise: the original's global RNG (seeded 2024 by its main.py), one stream through both stages
    step_generator = torch.Generator(run_start.device).manual_seed(ORIGINAL_STEP_SEED)
    res1, previews = run_stage(one, proj1, prompts, args, generator, step_generator=step_generator)
    canonical, stage1 = readout(proj1, views, s1, res1)
    shown = stage1.clamp(-1, 1)
    save_images(shown, out, "stage1_view_{}.png")
    for i, img in previews:
        save_images(img.clamp(-1, 1), out, f"stage1_step{i:03d}_canonical{{}}.png")
    final_views, final_canonical = shown, canonical
    if two is not None:
        s2 = two.unet.config.sample_size
        proj2 = make_projection(args, views, s2, generator)
        cond = stage2_condition(two, stage1, canonical, views, s2, args.stage2_noise_level, generator,
                                args.stage2_condition)
        res2, _ = run_stage(two, proj2, prompts, args, generator, image=shown, condition=cond,
                            step_generator=step_generator)
        final_canonical, final_views = readout(proj2, views, s2, res2)
        final_views = final_views.clamp(-1, 1)
    paths = save_images(final_views, out, "view_{}.png")
    atomic_save_image(to_pil(final_canonical.clamp(-1, 1))[0], out / "final.png")
    atomic_save_image(sheet(final_views), out / "sheet.png")
    save_gif(morph_frames(final_canonical[0].clamp(-1, 1).float().cpu(), views), out / "morph.gif")
    finish_run(out, args, f"{out} ({len(paths)} views, final.png, sheet.png, morph.gif)")
    return {"dir": out, "views": final_views, "canonical": final_canonical}


def readout(projection, views, size: int, result) -> tuple[torch.Tensor, torch.Tensor]:
    """(canonical [1, 3, s, s], views f(g(X_0)) [N, 3, s, s]). n-to-1 reads out as the original does: the plain
    mean of the inverse views of X_0 (no optimisation), shown through every view."""
    if isinstance(projection, StackProjection):
        plain = ViewProjection(views, size)
        z = plain.inverse(result.instances)
        return z, plain.forward(z)
    return result.canonical, projection.forward(result.canonical)


def _canonical_image(projection, z: torch.Tensor) -> torch.Tensor:
    """The one image behind the views: z itself, or the mean of an n-to-1 stack. [1, 3, s, s]."""
    return z.mean(0, keepdim=True) if isinstance(projection, StackProjection) else z
