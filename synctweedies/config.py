"""The original main.py's flags, per app (same names and defaults), plus --model tiny-*, --device, --dtype,
--eta and --config. Mesh and 3DGS flags are parsed so scripts written for the original fail clearly."""
from __future__ import annotations

import argparse

from common.cli import ArgumentParser

APPS = ("ambiguous_image", "wide_image", "panorama", "mesh", "gs")
NEGATIVE = "oversmoothed, blurry, depth of field, out of focus, low quality, bloom, glowing effect."


def _common(p: argparse.ArgumentParser, *, seed: int, save_top_dir: str | None, tag_required: bool,
            sampling: str = "ddim", case: str = "2", top_required: bool = False) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--app", choices=APPS, required=True, help="which application to run")
    g.add_argument("--case_num", type=str, default=case, help="synchronisation case 0-6 (2 = SyncTweedies)")
    g.add_argument("--sampling_method", choices=("ddim", "ddpm"), default=sampling, help="reverse step")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (noise scaled by sigma_eta; the original's "
                   "eta>0 bug is fixed)")
    g.add_argument("--seed", type=int, default=seed, help="random seed")
    g.add_argument("--gpu", type=int, default=0, help="CUDA device index (cuda:<gpu> when CUDA is available)")
    g.add_argument("--device", default=None, help="torch device; overrides --gpu (default: cuda:<gpu> or cpu)")
    g.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="model dtype; auto = fp16 on CUDA (as the original), fp32 on CPU")
    g.add_argument("--save_top_dir", default=save_top_dir, required=top_required,
                   help="top output folder")
    g.add_argument("--tag", default=None, required=tag_required, help="output sub-folder name")
    g.add_argument("--save_dir_now", action="store_true", help="append a timestamp folder (else an existing "
                   "output folder is refused)")
    g.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    g.add_argument("--adapters", nargs="*", default=[], metavar="PATH",
                   help="trained concepts applied to the diffusion model, e.g. a Custom Diffusion output folder "
                        "(put its <new1> token in the prompt)")


def ambiguous_parser() -> ArgumentParser:
    p = ArgumentParser(prog="main.py --app ambiguous_image", description="Ambiguous images (visual anagrams) "
                       "with DeepFloyd IF stage I + II in pixel space.")
    _common(p, seed=1, save_top_dir="./output", tag_required=True)
    g = p.add_argument_group("ambiguous_image")
    g.add_argument("--prompts", nargs="+", default=["a horse", "a snowy mountain village"], help="one prompt per view")
    g.add_argument("--style", default="an oilpainting of", help="prefix of every prompt")
    g.add_argument("--stage_1_path", default="DeepFloyd/IF-I-M-v1.0", help="stage I model (honoured here)")
    g.add_argument("--stage_2_path", default="DeepFloyd/IF-II-M-v1.0", help="stage II model (honoured here)")
    g.add_argument("--model", default="deepfloyd", help="deepfloyd (= the stage paths) or a preset such as "
                   "tiny-if (stage II: tiny-if-sr)")
    g.add_argument("--sd_model_name", default="deepfloyd", help="kept for compatibility")
    g.add_argument("--num_inference_steps", type=int, default=30, help="steps per stage")
    g.add_argument("--guidance_scale", type=float, default=10.0, help="CFG scale")
    g.add_argument("--stage2_noise_level", type=int, default=50, help="noise level of the upscaled stage-I image")
    g.add_argument("--views_names", nargs="+", default=["identity", "rotate_cw"], help="one view per prompt")
    g.add_argument("--rotate_angle", type=float, default=45.0, help="angle of inner_rotate (degrees)")
    g.add_argument("--initialize_xt_from_zt", action="store_true", help="X_T = f(z_T)")
    g.add_argument("--initialize_same_xt", action="store_true", help="every instance starts from the same noise")
    g.add_argument("--scaling_factor", type=float, default=1.0, help="unused (as in the original)")
    g.add_argument("--log_step", type=int, default=10, help="save the canonical x0|t preview every N steps (0: off)")
    g.add_argument("--optimize_inverse_mapping", action="store_true", help="n-to-1: canonical stack, Adam inverse")
    g.add_argument("--iterations", type=int, default=10, help="Adam steps per inverse (n-to-1)")
    g.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (n-to-1)")
    g.add_argument("--num_of_zs", type=int, default=10, help="size of the canonical stack (n-to-1)")
    g.add_argument("--skip_stage_2", action="store_true", help="stop after stage I")
    return p


def wide_parser() -> ArgumentParser:
    p = ArgumentParser(prog="main.py --app wide_image", description="Arbitrary-size images from SD2 latent windows.")
    _common(p, seed=1, save_top_dir="results/panorama360_depth", tag_required=False)
    g = p.add_argument_group("wide_image")
    g.add_argument("--prompt", required=True, help="text prompt")
    g.add_argument("--negative_prompt", default="", help="negative prompt")
    g.add_argument("--num_inference_steps", type=int, default=50, help="denoising steps")
    g.add_argument("--guidance_scale", type=float, default=7.5, help="CFG scale")
    g.add_argument("--model", default="sd", help="sd (= --sd_path) or a preset / hub id / folder, e.g. tiny-sd")
    g.add_argument("--sd_path", default="stabilityai/stable-diffusion-2-base", help="SD model")
    g.add_argument("--ref_attention_end", type=float, default=0.2, help="reference-view attention while "
                   "t >= (1 - x) T")
    g.add_argument("--mvd_end", type=float, default=0.8, help="synchronise while t >= (1 - mvd_end) T")
    g.add_argument("--log_step", type=int, default=10, help="kept for compatibility")
    g.add_argument("--eval_w", type=int, nargs="+", default=list(range(0, 80, 10)), help="unused (original)")
    g.add_argument("--eval_h", type=int, nargs="+", default=[0] * 8, help="unused (original)")
    g.add_argument("--initialize_xt_from_zt", action="store_true", help="X_T = f(z_T)")
    g.add_argument("--window_stride", type=int, default=8, help="window stride in latent pixels")
    g.add_argument("--latent_instance_size", type=int, default=64, help="latent window size")
    g.add_argument("--rgb_instance_size", type=int, default=512, help="RGB window size (= latent size * 8)")
    g.add_argument("--panorama_height", type=int, default=512, help="image height (multiple of 8)")
    g.add_argument("--panorama_width", type=int, default=3072, help="image width (multiple of 8)")
    g.add_argument("--max_batch_size", type=int, default=1000, help="views per attention chunk (split_groups)")
    return p


def panorama_parser() -> ArgumentParser:
    p = ArgumentParser(prog="main.py --app panorama", description="360-degree panoramas from depth-conditioned "
                       "perspective views.")
    _common(p, seed=0, save_top_dir="results/panorama360_depth", tag_required=False)
    g = p.add_argument_group("panorama")
    g.add_argument("--prompt", default="a bedroom with a window", help="text prompt")
    g.add_argument("--negative_prompt", default=NEGATIVE, help="negative prompt")
    g.add_argument("--steps", type=int, default=30, help="denoising steps")
    g.add_argument("--guidance_scale", type=float, default=25.0, help="CFG scale")
    g.add_argument("--cond_type", choices=("depth",), default="depth", help="ControlNet condition")
    g.add_argument("--conditioning_scale", type=float, default=0.7, help="ControlNet scale at the first step")
    g.add_argument("--conditioning_scale_end", type=float, default=0.9, help="ControlNet scale at the last step")
    g.add_argument("--control_guidance_start", type=float, default=0.0, help="ControlNet on from this fraction")
    g.add_argument("--control_guidance_end", type=float, default=0.99, help="ControlNet off after this fraction")
    g.add_argument("--mvd_end", type=float, default=0.8, help="synchronise while t >= (1 - mvd_end) T")
    g.add_argument("--ref_attention_end", type=float, default=0.2, help="reference attention while t >= (1-x) T")
    g.add_argument("--log_interval", type=int, default=5, help="kept for compatibility")
    g.add_argument("--max_batch_size", type=int, default=48, help="views per attention chunk")
    g.add_argument("--average_rgb", action="store_true", help="average decoded RGB views (case 2)")
    g.add_argument("--canonical_rgb_h", type=int, default=1024, help="RGB pano height")
    g.add_argument("--canonical_rgb_w", type=int, default=2048, help="RGB pano width")
    g.add_argument("--canonical_latent_h", type=int, default=2048, help="latent pano height")
    g.add_argument("--canonical_latent_w", type=int, default=4096, help="latent pano width")
    g.add_argument("--instance_latent_size", type=int, default=64, help="latent view size")
    g.add_argument("--instance_rgb_size", type=int, default=512, help="RGB view size (= latent size * 8)")
    g.add_argument("--theta_range", type=int, nargs=2, default=[0, 360], help="yaw range (degrees)")
    g.add_argument("--theta_interval", type=int, default=45, help="yaw step")
    g.add_argument("--phi_range", type=int, nargs=2, default=[0, 1], help="pitch range (degrees)")
    g.add_argument("--phi_interval", type=int, default=45, help="pitch step")
    g.add_argument("--FOV", type=float, default=72.0, help="view field of view (degrees, 0-180)")
    g.add_argument("--voronoi", action="store_true", default=True, help="always on (as the original)")
    g.add_argument("--model", default="controlnet", help="controlnet (= SD 1.5 + depth ControlNet) or a preset, "
                   "e.g. tiny-sd (with tiny-controlnet)")
    g.add_argument("--sd_path", default="sd15", help="SD model used with --model controlnet")
    g.add_argument("--controlnet_path", default="controlnet-depth-sd15", help="depth ControlNet")
    g.add_argument("--depth_data_path", default=None, help="equirectangular depth: .dpt, .npy or an image "
                   "(bright = near); none = no ControlNet")
    g.add_argument("--initialize_xt_from_zt", action="store_true", help="X_T = f(z_T)")
    g.add_argument("--sdedit", action="store_true", help="start from --sdedit_image noised to --sdedit_timestep")
    g.add_argument("--sdedit_image", default=None, help="equirectangular RGB pano to edit")
    g.add_argument("--sdedit_timestep", type=float, default=0.2, help="0 = from x_T (full generation), 1 = x_0")
    g.add_argument("--compact_sync", action="store_true", help="sync through a sparse instance-pixel operator "
                   "instead of the full latent pano (same result, little memory; instance cases)")
    g.add_argument("--num_random_crops", type=int, default=10, help="random 60-degree crops to save")
    return p


def mesh_parser() -> ArgumentParser:
    p = ArgumentParser(prog="main.py --app mesh", description="Mesh texturing (comes with the mesh support).")
    _common(p, seed=1, save_top_dir=None, tag_required=True, sampling="ddpm", case="1")
    g = p.add_argument_group("mesh")
    g.add_argument("--mesh", required=True)
    g.add_argument("--mesh_config_relative", action="store_true")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative_prompt", default=NEGATIVE)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance_scale", type=float, default=15.5)
    g.add_argument("--model", default="controlnet")
    g.add_argument("--cond_type", default="depth")
    g.add_argument("--guess_mode", action="store_true")
    g.add_argument("--conditioning_scale", type=float, default=0.7)
    g.add_argument("--conditioning_scale_end", type=float, default=0.9)
    g.add_argument("--control_guidance_start", type=float, default=0.0)
    g.add_argument("--control_guidance_end", type=float, default=0.99)
    g.add_argument("--guidance_rescale", type=float, default=0.0)
    g.add_argument("--latent_view_size", type=int, default=96)
    g.add_argument("--latent_tex_size", type=int, default=1536)
    g.add_argument("--rgb_view_size", type=int, default=768)
    g.add_argument("--rgb_tex_size", type=int, default=1024)
    g.add_argument("--camera_azims", type=int, nargs="*", action="append")
    g.add_argument("--top_cameras", action="store_false")
    g.add_argument("--mvd_end", type=float, default=0.8)
    g.add_argument("--ref_attention_end", type=float, default=0.2)
    g.add_argument("--shuffle_bg_change", type=float, default=0.4)
    g.add_argument("--shuffle_bg_end", type=float, default=0.8)
    g.add_argument("--mesh_scale", type=float, default=1.0)
    g.add_argument("--mesh_autouv", action="store_true")
    g.add_argument("--noise_space", default="texture")
    g.add_argument("--log_interval", type=int, default=5)
    g.add_argument("--view_fast_preview", action="store_false")
    g.add_argument("--tex_fast_preview", action="store_false")
    g.add_argument("--sdedit", action="store_true")
    g.add_argument("--sdedit_prompt", default=None)
    g.add_argument("--sdedit_timestep", type=float, default=0.2)
    g.add_argument("--log_height", type=int, default=256)
    g.add_argument("--log_width", type=int, default=256)
    g.add_argument("--max_batch_size", type=int, default=48)
    g.add_argument("--disable_voronoi", action="store_true")
    g.add_argument("--rasterize_mode", default="nearest")
    g.add_argument("--initialize_xt_from_zt", action="store_true")
    g.add_argument("--save_gif", action="store_true")
    return p


def gs_parser() -> ArgumentParser:
    p = ArgumentParser(prog="main.py --app gs", description="3D Gaussian texturing (comes with the gs support).")
    _common(p, seed=0, save_top_dir=None, tag_required=True, top_required=True)
    g = p.add_argument_group("gs")
    g.add_argument("--log_interval", type=int, default=2)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative_prompt", default=NEGATIVE)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance_scale", type=float, default=35.0)
    g.add_argument("--model", default="controlnet")
    g.add_argument("--cond_type", default="depth")
    g.add_argument("--guess_mode", action="store_true")
    g.add_argument("--conditioning_scale", type=float, default=0.7)
    g.add_argument("--conditioning_scale_end", type=float, default=0.9)
    g.add_argument("--control_guidance_start", type=float, default=0.0)
    g.add_argument("--control_guidance_end", type=float, default=0.99)
    g.add_argument("--guidance_rescale", type=float, default=0.0)
    g.add_argument("--force_clean_composition", action="store_true")
    g.add_argument("--dataset_type", choices=("dense", "sparse", "colmap", "blender"), default="colmap")
    g.add_argument("--plyfile", default=None)
    g.add_argument("--source_path", default=None)
    g.add_argument("--up_vec", choices=("z", "y"), default="z")
    g.add_argument("--antialiased", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--zt_init", action="store_true")
    g.add_argument("--background_color", choices=("white", "black"), default="white")
    g.add_argument("--color_assign_method", choices=("previous", "zero", "instance"), default="previous")
    g.add_argument("--canonical_domain", choices=("rgb", "latent"), default="rgb")
    g.add_argument("--total_image_to_use", type=int, default=50)
    g.add_argument("--latent_view_size", type=int, default=64)
    g.add_argument("--rgb_view_size", type=int, default=512)
    g.add_argument("--mvd_end", type=float, default=0.8)
    g.add_argument("--ref_attention_end", type=float, default=0.2)
    g.add_argument("--max_batch_size", type=int, default=50)
    g.add_argument("--iterations", type=int, default=1000)
    g.add_argument("--final_iterations", type=int, default=4000)
    g.add_argument("--xyz_lr", type=float, default=3e-4)
    g.add_argument("--scale_lr", type=float, default=0.005)
    g.add_argument("--quat_lr", type=float, default=0.001)
    g.add_argument("--opacity_lr", type=float, default=0.05)
    g.add_argument("--feature_lr", type=float, default=0.025)
    g.add_argument("--enable_opacity", action="store_true")
    g.add_argument("--enable_xyz", action="store_true")
    g.add_argument("--enable_covariance", action="store_true")
    return p


PARSERS = {"ambiguous_image": ambiguous_parser, "wide_image": wide_parser, "panorama": panorama_parser,
           "mesh": mesh_parser, "gs": gs_parser}
