"""Mesh texturing (SyncMVD layout): a latent UV texture synchronised over 10 depth-conditioned views.

The sampler runs on the latent views (case 1 and DDPM by default, as the original); the final views are
decoded and baked into an RGB texture. Artefacts: textured.obj/.mtl/.png, view_i.png (the final texture
rendered), views.png, control_i.png, optionally turntable.gif and intermediate/ previews.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from common.errors import UsageError
from common.io import atomic_save_image
from common.pipelines.loop import Hook, StepState
from common.pipelines.text2image import prepare
from common.render.cameras import Cameras, mesh_camera_poses
from common.render.mesh import Mesh, autouv, load_mesh, normalize_mesh, save_obj
from common.render.raster import rasterize
from common.render.texture import render_texture
from synctweedies.apps.geometry_common import (COLORS, PreviewHook, color_latents, control_spec, fast_rgb,
                                               load_control_pipeline)
from common.attention.plan import AttentionPlan
from synctweedies.apps.sdedit import sdedit_start
from synctweedies.apps.view_sampling import sample_with_view_attention
from synctweedies.apps.wide_image import decode_in_chunks
from synctweedies.mesh import MeshProjection, control_images, view_graph, view_prompts
from synctweedies.outputs import make_save_dir, save_gif, save_images, sheet
from synctweedies.registry import register_app
from synctweedies.runtime import check_fraction, finish_run, start_run
from synctweedies.sampler import SyncOptions

DEFAULT_AZIMS = list(range(-180, 180, 45))


def validate(args: argparse.Namespace) -> None:
    for name in ("mvd_end", "ref_attention_end", "shuffle_bg_change", "shuffle_bg_end", "control_guidance_start",
                 "control_guidance_end", "sdedit_timestep"):
        check_fraction(name, getattr(args, name))
    if args.mesh_scale <= 0:
        raise UsageError(f"--mesh_scale must be positive, got {args.mesh_scale}")


def camera_poses(args: argparse.Namespace) -> list[tuple[float, float]]:
    """The original's azimuths (appended --camera_azims add to the defaults) plus the two top cameras."""
    extra = [a for group in (args.camera_azims or []) for a in group]
    return mesh_camera_poses(DEFAULT_AZIMS + extra, args.top_cameras)


def cameras_for(poses, size: int, distance: float, height: int | None = None) -> Cameras:
    """Orthographic cameras (SyncMVD) seeing [-1, 1] across the width, looking at the origin."""
    from common.render.cameras import orbit_positions

    eye = orbit_positions([p[0] for p in poses], [p[1] for p in poses], distance).float()
    return Cameras.from_look_at(eye, width=size, height=height or size, orthographic=True, ortho_scale=1.0)


def prepare_mesh(args: argparse.Namespace) -> Mesh:
    path = Path(args.mesh)
    if args.mesh_config_relative and getattr(args, "config", None):
        path = Path(args.config).parent / path
    mesh = load_mesh(path)
    if args.mesh_autouv:
        mesh = autouv(mesh)
    elif not mesh.has_uv:
        raise UsageError(f"{path} has no UV coordinates: pass --mesh_autouv to compute an atlas")
    return normalize_mesh(mesh, args.mesh_scale)


class ShuffledBackground(Hook):
    """SyncMVD's backgrounds: each step the off-mesh pixels of x_t become a solid-colour latent noised to t —
    a random colour per view while t >= (1 - change) T, random black/white while t >= (1 - end) T, then white.
    The same noised latents are the projection's `background` (what f shows off the mesh without `bg`)."""

    def __init__(self, projection: MeshProjection, colors: dict, scheduler, change: float, end: float, seed: int,
                 generator: torch.Generator | None):
        self.projection, self.colors, self.change, self.end = projection, colors, change, end
        self.abar = scheduler.alphas_cumprod
        self.T = scheduler.config.num_train_timesteps
        self.rng, self.generator = random.Random(seed), generator

    def names(self, t: float) -> list[str]:
        n = self.projection.num_instances
        if t >= (1 - self.change) * self.T:
            return [self.rng.choice(list(COLORS)) for _ in range(n)]
        if t >= (1 - self.end) * self.T:
            return [self.rng.choice(["black", "white"]) for _ in range(n)]
        return ["white"] * n

    def on_input(self, state: StepState) -> None:
        x = state.x_t
        bg = torch.stack([self.colors[c] for c in self.names(float(state.t))]).to(x)
        noise = torch.randn(bg.shape, generator=self.generator, dtype=torch.float32).to(x)
        abar = self.abar[int(state.t)].to(x)
        bg = abar.sqrt() * bg + (1 - abar).sqrt() * noise
        self.projection.background = bg
        state.x_t = torch.where(self.projection.mask.to(x.device), x, bg)


@register_app("mesh")
def run(args: argparse.Namespace) -> dict:
    validate(args)
    run_start = start_run(args, args.save_top_dir or "output", args.tag)
    device, dtype, generator = run_start.device, run_start.dtype, run_start.generator
    mesh = prepare_mesh(args)
    if args.sdedit and mesh.texture is None:
        raise UsageError(f"--sdedit edits an existing texture, but {args.mesh} has none (no map_Kd image)")
    poses = camera_poses(args)
    n = len(poses)
    pipe, controlnet = load_control_pipeline(args, device, dtype)  # also checks the view sizes
    out = make_save_dir(args.save_top_dir or "output", args.tag, args.save_dir_now)
    mode, voronoi = args.rasterize_mode, not args.disable_voronoi
    backend = args.raster_backend
    mesh = mesh.to(device)
    lat_cams = cameras_for(poses, args.latent_view_size, args.camera_distance).to(device)
    rgb_cams = cameras_for(poses, args.rgb_view_size, args.camera_distance).to(device)
    latent_proj = MeshProjection(mesh, lat_cams, args.latent_tex_size, mode=mode, voronoi=voronoi, backend=backend)
    rgb_proj = MeshProjection(mesh, rgb_cams, args.rgb_tex_size, mode=mode, voronoi=voronoi, backend=backend)
    cond = control_images(mesh, rgb_cams, args.cond_type, backend)
    save_images(cond * 2 - 1, out, "control_{}.png")
    prompt = args.sdedit_prompt if (args.sdedit and args.sdedit_prompt) else args.prompt
    prompts = view_prompts(prompt, poses)
    setup = prepare(pipe, prompts, [args.negative_prompt] * n, num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale, height=args.rgb_view_size, width=args.rgb_view_size,
                    generator=generator, guidance_rescale=args.guidance_rescale,
                    control=control_spec(args, controlnet, cond.to(device, dtype)))
    colors = {k: v.float() for k, v in color_latents(pipe.vae, args.rgb_view_size).items()}
    background = ShuffledBackground(latent_proj, colors, pipe.scheduler, args.shuffle_bg_change, args.shuffle_bg_end,
                                    args.seed, generator)
    hooks = [background]
    if args.log_interval > 0:
        hooks.append(PreviewHook(out / "intermediate", args.log_interval, pipe.vae, args.view_fast_preview,
                                 args.max_batch_size))
    refs = tuple(i for i, p in enumerate(poses) if p == (0.0, 0.0))[:1] + \
        tuple(i for i, p in enumerate(poses) if p == (0.0, 180.0))[:1]
    plan = AttentionPlan(num_images=n, reference=refs, max_batch=args.max_batch_size,
                         graph=tuple(tuple(g) for g in view_graph(poses)))
    options = SyncOptions(args.case_num, args.mvd_end, args.initialize_xt_from_zt, args.sampling_method, args.eta)
    timesteps, x_T, z_T = setup.timesteps, setup.x_T, None
    if args.sdedit:
        timesteps, x_T, z_T = sdedit_start(pipe, texture_views(mesh, rgb_proj, setup.x_T.device), latent_proj, setup,
                                           generator, sdedit_timestep=args.sdedit_timestep,
                                           max_batch_size=args.max_batch_size,
                                           initialize_xt_from_zt=args.initialize_xt_from_zt, case_num=args.case_num)
        options.initialize_xt_from_zt = False  # the start state is made above
    result = sample_with_view_attention(pipe, setup, latent_proj, options, plan,
                                        ref_attention_end=args.ref_attention_end, timesteps=timesteps, x_T=x_T,
                                        z_T=z_T, generator=generator, hooks=hooks, progress=not args.no_progress)
    with torch.no_grad():
        views = decode_in_chunks(pipe.vae, result.instances, args.max_batch_size)  # [N, 3, S, S]
    texture = rgb_proj.inverse(views)[0]  # [3, T, T] in [-1, 1]
    tex01 = (texture / 2 + 0.5).clamp(0, 1).cpu()
    mesh, rgb_cams = mesh.to("cpu"), rgb_cams.to("cpu")
    save_obj(out / "textured.obj", mesh, tex01)
    rendered = render_views(mesh, rgb_cams, tex01, mode, backend)
    save_images(rendered * 2 - 1, out, "view_{}.png")
    atomic_save_image(sheet(rendered * 2 - 1, pad=2), out / "views.png")
    if args.log_interval > 0:
        save_texture_preview(out / "latent_texture.png", result, rgb_proj, views, args.tex_fast_preview)
    if args.save_gif:
        save_turntable(out / "turntable.gif", mesh, tex01, args, backend)
    finish_run(out, args, f"{out / 'textured.obj'} (texture {tex01.shape[-1]}x{tex01.shape[-2]}, {n} views)")
    return {"dir": out, "texture": tex01, "views": rendered, "latent_views": result.instances,
            "latent_texture": result.canonical}


def save_texture_preview(path: Path, result, rgb_proj: MeshProjection, views: torch.Tensor, fast: bool) -> None:
    """The synchronised latent texture through the linear preview map, or (not fast) the baked decoded views."""
    tex = fast_rgb(result.canonical.float()) if fast else rgb_proj.inverse(views)
    atomic_save_image(sheet(tex.clamp(-1, 1).cpu(), pad=0), path)


def render_views(mesh: Mesh, cameras: Cameras, texture: torch.Tensor, mode: str = "bilinear",
                 backend: str = "auto", background: float = 1.0) -> torch.Tensor:
    """texture [3, T, T] in [0, 1] -> views [N, 3, H, W] in [0, 1] over a solid background."""
    fr = rasterize(cameras.to_clip(mesh.verts.float()), mesh.faces, cameras.height, cameras.width, backend)
    img, alpha = render_texture(fr, mesh.uv_faces, mesh.uvs, texture.float(), "bilinear" if mode != "nearest"
                                else "nearest")
    return img * alpha + background * (1 - alpha)


def save_turntable(path: Path, mesh: Mesh, texture: torch.Tensor, args, backend: str, frames: int = 50) -> None:
    """A 50-frame turn around the mesh at elevation 0 (log_width x log_height)."""
    poses = [(0.0, 360.0 * i / frames) for i in range(frames)]
    cams = cameras_for(poses, args.log_width, args.camera_distance, height=args.log_height)
    imgs = []
    for chunk in range(0, frames, 10):
        imgs.append(render_views(mesh, cams[chunk:chunk + 10], texture, "bilinear", backend))
    from common.pipelines.text2image import to_pil

    save_gif(to_pil(torch.cat(imgs) * 2 - 1), path)


def texture_views(mesh: Mesh, rgb_proj: MeshProjection, device) -> torch.Tensor:
    """The mesh's existing texture rendered into the RGB views over white: [N, 3, S, S] in [-1, 1] (SDEdit)."""
    tex = mesh.texture[:3].float() * 2 - 1
    return rgb_proj.forward(tex[None].to(device), bg=torch.ones(rgb_proj.instance_shape(3), device=device))
