"""The original main.py's flags, per app (same names and defaults), plus --model tiny-*, --device, --dtype,
--eta and --config, and a few extras (model paths, rasteriser backend) that say where we differ."""
from __future__ import annotations

import argparse

from common.cli import ArgumentParser, nonnegative_int, positive_int
from synctweedies.cases import case_id

APPS = ("ambiguous_image", "wide_image", "panorama", "mesh", "gs")
NEGATIVE = "oversmoothed, blurry, depth of field, out of focus, low quality, bloom, glowing effect."


def _common(p: argparse.ArgumentParser, *, seed: int, save_top_dir: str | None, tag_required: bool,
            sampling: str = "ddim", case: int = 2, top_required: bool = False) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--app", choices=APPS, required=True, help="which application to run")
    g.add_argument("--case_num", type=case_id, default=case, help="synchronisation case 0-6 (2 = SyncTweedies)")
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
    g.add_argument("--num_inference_steps", type=positive_int, default=30, help="steps per stage")
    g.add_argument("--guidance_scale", type=float, default=10.0, help="CFG scale")
    g.add_argument("--stage2_noise_level", type=nonnegative_int, default=50, help="noise level of the upscaled stage-I image")
    g.add_argument("--views_names", nargs="+", default=["identity", "rotate_cw"], help="one view per prompt")
    g.add_argument("--rotate_angle", type=float, default=45.0, help="angle of inner_rotate (degrees)")
    g.add_argument("--initialize_xt_from_zt", action="store_true", help="X_T = f(z_T)")
    g.add_argument("--initialize_same_xt", action="store_true", help="every instance starts from the same noise")
    g.add_argument("--scaling_factor", type=float, default=1.0, help="unused (as in the original)")
    g.add_argument("--log_step", type=nonnegative_int, default=10, help="save the canonical x0|t preview every N steps (0: off)")
    g.add_argument("--optimize_inverse_mapping", action="store_true", help="n-to-1: canonical stack, Adam inverse")
    g.add_argument("--iterations", type=nonnegative_int, default=10, help="Adam steps per inverse (n-to-1)")
    g.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (n-to-1)")
    g.add_argument("--num_of_zs", type=positive_int, default=10, help="size of the canonical stack (n-to-1)")
    g.add_argument("--skip_stage_2", action="store_true", help="stop after stage I")
    d = p.add_argument_group("ambiguous_image: where we differ from the original (each flag's other value, or "
                             "--as_original, gives the original's behaviour)")
    d.add_argument("--stage2_condition", choices=("own_view", "canonical"), default="own_view",
                   help="stage II condition of each view: own_view = its own upscaled stage-I view, no noise added, "
                        "class label --stage2_noise_level (the original); canonical = the view of the upscaled "
                        "stage-I canonical image noised to --stage2_noise_level (one shared condition)")
    d.add_argument("--x0_thresholding", choices=("scheduler", "off"), default="scheduler",
                   help="scheduler = threshold / clip x0|t as the IF scheduler config says, in DDIM and DDPM steps; "
                   "off = only in DDPM steps (the original)")
    d.add_argument("--inverse_warm_start", choices=("zero", "noise"), default="zero",
                   help="n-to-1: start of each first Adam inverse: zeros, or a N(0, I) stack (original)")
    d.add_argument("--inverse_lr_schedule", choices=("cosine", "constant"), default="cosine",
                   help="n-to-1: Adam lr cosine-annealed within each inverse, or constant --lr (original)")
    d.add_argument("--stack_noise_scale", choices=("sqrt_k", "one"), default="sqrt_k",
                   help="n-to-1: canonical stack noise z_T: members of variance K so their mean is N(0, I) "
                        "(sqrt_k), or unit members (one, the original)")
    d.add_argument("--as_original", action="store_true", help="shorthand for --x0_thresholding off "
                   "--inverse_warm_start noise --inverse_lr_schedule constant --stack_noise_scale one")
    return p


def wide_parser() -> ArgumentParser:
    p = ArgumentParser(prog="main.py --app wide_image", description="Arbitrary-size images from SD2 latent windows.")
    _common(p, seed=1, save_top_dir="results/panorama360_depth", tag_required=False)
    g = p.add_argument_group("wide_image")
    g.add_argument("--prompt", required=True, help="text prompt")
    g.add_argument("--negative_prompt", default="", help="negative prompt")
    g.add_argument("--num_inference_steps", type=positive_int, default=50, help="denoising steps")
    g.add_argument("--guidance_scale", type=float, default=7.5, help="CFG scale")
    g.add_argument("--model", default="sd", help="sd (= --sd_path) or a preset / hub id / folder, e.g. tiny-sd")
    g.add_argument("--sd_path", default="stabilityai/stable-diffusion-2-base", help="SD model")
    g.add_argument("--ref_attention_end", type=float, default=0.2, help="reference-view attention while "
                   "t > (1 - x) T")
    g.add_argument("--mvd_end", type=float, default=0.8, help="synchronise while t > (1 - mvd_end) T")
    g.add_argument("--log_step", type=nonnegative_int, default=10, help="kept for compatibility")
    g.add_argument("--eval_w", type=int, nargs="+", default=list(range(0, 80, 10)), help="unused (original)")
    g.add_argument("--eval_h", type=int, nargs="+", default=[0] * 8, help="unused (original)")
    g.add_argument("--initialize_xt_from_zt", action="store_true", help="X_T = f(z_T)")
    g.add_argument("--window_stride", type=positive_int, default=8, help="window stride in latent pixels")
    g.add_argument("--latent_instance_size", type=positive_int, default=None, help="latent window size "
                   "(default: the model's native latent size, 64 for SD2-base as the original)")
    g.add_argument("--rgb_instance_size", type=positive_int, default=None, help="RGB window size (default and "
                   "only valid value: latent size x the VAE factor)")
    g.add_argument("--panorama_height", type=positive_int, default=512, help="image height (multiple of 8)")
    g.add_argument("--panorama_width", type=positive_int, default=3072, help="image width (multiple of 8)")
    g.add_argument("--max_batch_size", type=positive_int, default=1000, help="views per attention chunk (split_groups)")
    return p


def panorama_parser() -> ArgumentParser:
    p = ArgumentParser(prog="main.py --app panorama", description="360-degree panoramas from depth-conditioned "
                       "perspective views.")
    _common(p, seed=0, save_top_dir="results/panorama360_depth", tag_required=False)
    g = p.add_argument_group("panorama")
    g.add_argument("--prompt", default="a bedroom with a window", help="text prompt")
    g.add_argument("--negative_prompt", default=NEGATIVE, help="negative prompt")
    g.add_argument("--steps", "--num_inference_steps", dest="steps", type=positive_int, default=30,
                   help="denoising steps (--num_inference_steps is an alias)")
    g.add_argument("--guidance_scale", type=float, default=25.0, help="CFG scale")
    g.add_argument("--cond_type", choices=("depth",), default="depth", help="ControlNet condition")
    g.add_argument("--conditioning_scale", type=float, default=0.7, help="ControlNet scale at the first step")
    g.add_argument("--conditioning_scale_end", type=float, default=0.9, help="ControlNet scale at the last step")
    g.add_argument("--control_guidance_start", type=float, default=0.0, help="ControlNet on from this fraction")
    g.add_argument("--control_guidance_end", type=float, default=0.99, help="ControlNet off after this fraction")
    g.add_argument("--mvd_end", type=float, default=0.8, help="synchronise while t > (1 - mvd_end) T")
    g.add_argument("--ref_attention_end", type=float, default=0.2, help="reference attention while t > (1-x) T")
    g.add_argument("--log_interval", type=nonnegative_int, default=5, help="kept for compatibility")
    g.add_argument("--max_batch_size", type=positive_int, default=48, help="views per attention chunk")
    g.add_argument("--average_rgb", action="store_true", help="average decoded RGB views (case 2)")
    g.add_argument("--canonical_rgb_h", type=positive_int, default=1024, help="RGB pano height")
    g.add_argument("--canonical_rgb_w", type=positive_int, default=2048, help="RGB pano width")
    g.add_argument("--canonical_latent_h", type=positive_int, default=2048, help="latent pano height")
    g.add_argument("--canonical_latent_w", type=positive_int, default=4096, help="latent pano width")
    g.add_argument("--instance_latent_size", type=positive_int, default=64, help="latent view size")
    g.add_argument("--instance_rgb_size", type=positive_int, default=None, help="RGB view size (default and only "
                   "valid value: latent size x the VAE factor, 512 for SD)")
    g.add_argument("--theta_range", type=int, nargs=2, default=[0, 360], help="yaw range (degrees)")
    g.add_argument("--theta_interval", type=positive_int, default=45, help="yaw step")
    g.add_argument("--phi_range", type=int, nargs=2, default=[0, 1], help="pitch range (degrees)")
    g.add_argument("--phi_interval", type=positive_int, default=45, help="pitch step")
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
    g.add_argument("--num_random_crops", type=nonnegative_int, default=10, help="random 60-degree crops to save")
    return p


def _control(g, cond_choices=("depth", "normal")) -> None:
    """ControlNet flags shared by the mesh and Gaussian apps."""
    g.add_argument("--cond_type", choices=cond_choices, default="depth",
                   help="ControlNet condition rendered from the geometry")
    g.add_argument("--guess_mode", action="store_true", help="ControlNet guess mode (conditions the positive "
                   "CFG half only)")
    g.add_argument("--conditioning_scale", type=float, default=0.7, help="ControlNet scale at the first step")
    g.add_argument("--conditioning_scale_end", type=float, default=0.9, help="ControlNet scale at the last step "
                   "(linear in between)")
    g.add_argument("--control_guidance_start", type=float, default=0.0, help="ControlNet on from this fraction "
                   "of the steps")
    g.add_argument("--control_guidance_end", type=float, default=0.99, help="ControlNet off after this fraction "
                   "of the steps")
    g.add_argument("--guidance_rescale", type=float, default=0.0, help="CFG rescale factor (0 = off)")


def mesh_parser() -> ArgumentParser:
    p = ArgumentParser(prog="main.py --app mesh", description="Mesh texturing: a UV texture synchronised over "
                       "10 depth-conditioned views (SyncMVD layout).")
    _common(p, seed=1, save_top_dir=None, tag_required=True, sampling="ddpm", case=1)
    g = p.add_argument_group("mesh")
    g.add_argument("--mesh", required=True, help="input mesh (.obj with UVs and optional texture, .glb, .ply)")
    g.add_argument("--mesh_config_relative", action="store_true", help="resolve --mesh relative to the --config "
                   "file's folder")
    g.add_argument("--prompt", required=True, help="text prompt (a view direction suffix is added per view)")
    g.add_argument("--negative_prompt", default=NEGATIVE, help="negative prompt")
    g.add_argument("--steps", "--num_inference_steps", dest="steps", type=positive_int, default=30,
                   help="denoising steps (--num_inference_steps is an alias)")
    g.add_argument("--guidance_scale", type=float, default=15.5, help="CFG scale")
    g.add_argument("--model", default="controlnet", help="controlnet (= --sd_path + --controlnet_path) or a "
                   "preset, e.g. tiny-sd (with tiny-controlnet)")
    g.add_argument("--sd_path", default="sd15", help="SD model used with --model controlnet")
    g.add_argument("--controlnet_path", default=None, help="ControlNet (default: SD1.5 depth, or "
                   "lllyasviel/control_v11p_sd15_normalbae for --cond_type normal)")
    _control(g)
    g.add_argument("--latent_view_size", type=positive_int, default=96, help="latent view size (instances)")
    g.add_argument("--latent_tex_size", type=positive_int, default=1536, help="latent texture size (canonical)")
    g.add_argument("--rgb_view_size", type=positive_int, default=None, help="RGB view size (default and only "
                   "valid value: latent view size x the VAE factor, 768 for SD)")
    g.add_argument("--rgb_tex_size", type=positive_int, default=1024, help="RGB texture size of the output")
    g.add_argument("--camera_azims", type=int, nargs="*", action="append", help="extra camera azimuths in "
                   "degrees at elevation 0, appended to the defaults -180..135 step 45 (as the original)")
    g.add_argument("--top_cameras", action="store_false", help="on by default: two cameras at elevation 30, "
                   "azimuth 0 and 180; passing the flag turns them off")
    g.add_argument("--mvd_end", type=float, default=0.8, help="synchronise while t > (1 - mvd_end) T")
    g.add_argument("--ref_attention_end", type=float, default=0.2, help="front/back reference-view attention "
                   "while t > (1 - x) T")
    g.add_argument("--shuffle_bg_change", type=float, default=0.4, help="random-colour backgrounds while "
                   "t >= (1 - x) T")
    g.add_argument("--shuffle_bg_end", type=float, default=0.8, help="then random black/white backgrounds while "
                   "t >= (1 - x) T; white after")
    g.add_argument("--mesh_scale", type=float, default=1.0, help="the mesh is centred and scaled to fit "
                   "[-s, s]^3")
    g.add_argument("--mesh_autouv", action="store_true", help="compute a new UV atlas with xatlas")
    g.add_argument("--noise_space", choices=("texture",), default="texture", help="where z_T is drawn for "
                   "--initialize_xt_from_zt (texture only, as the original)")
    g.add_argument("--log_interval", type=nonnegative_int, default=5, help="save x0|t view previews every N steps (0: off)")
    g.add_argument("--view_fast_preview", action="store_false", help="on by default: previews use a linear "
                   "latent->RGB map; passing the flag decodes with the VAE")
    g.add_argument("--tex_fast_preview", action="store_false", help="on by default: texture previews use the "
                   "linear map; passing the flag decodes views with the VAE and bakes them")
    g.add_argument("--sdedit", action="store_true", help="edit the mesh's existing texture instead of "
                   "generating one")
    g.add_argument("--sdedit_prompt", default=None, help="target prompt for --sdedit (overrides --prompt)")
    g.add_argument("--sdedit_timestep", type=float, default=0.2, help="SDEdit start: 0 = from x_T (full "
                   "generation), 1 = x_0 (no change)")
    g.add_argument("--log_height", type=positive_int, default=256, help="height of the turntable frames")
    g.add_argument("--log_width", type=positive_int, default=256, help="width of the turntable frames")
    g.add_argument("--max_batch_size", type=positive_int, default=48, help="views per attention chunk / VAE batch")
    g.add_argument("--disable_voronoi", action="store_true", help="leave texels no pixel samples empty "
                   "instead of Voronoi-filling them")
    g.add_argument("--rasterize_mode", choices=("nearest", "bilinear"), default="nearest", help="texel lookup "
                   "of rendering and its adjoint in baking")
    g.add_argument("--initialize_xt_from_zt", action="store_true", help="z_T ~ N(0, I) on the latent texture, "
                   "X_T = f(z_T) over iid background noise")
    g.add_argument("--save_gif", action="store_true", help="also save a 50-frame turntable GIF")
    g.add_argument("--camera_distance", type=float, default=2.0, help="camera distance from the origin "
                   "(orthographic cameras seeing [-1, 1]^2, as SyncMVD)")
    g.add_argument("--raster_backend", choices=("auto", "torch", "triton", "pytorch3d"), default="auto",
                   help="triangle rasteriser")
    return p


def gs_parser() -> ArgumentParser:
    p = ArgumentParser(prog="main.py --app gs", description="3D Gaussian texturing: per-Gaussian colours "
                       "synchronised over depth-conditioned dataset views (n-to-1: Adam inverse).")
    _common(p, seed=0, save_top_dir=None, tag_required=True, top_required=True)
    g = p.add_argument_group("gs")
    g.add_argument("--log_interval", type=nonnegative_int, default=2, help="save x0|t view previews every N steps (0: off)")
    g.add_argument("--prompt", required=True, help="text prompt")
    g.add_argument("--negative_prompt", default=NEGATIVE, help="negative prompt")
    g.add_argument("--steps", "--num_inference_steps", dest="steps", type=positive_int, default=30,
                   help="denoising steps (--num_inference_steps is an alias)")
    g.add_argument("--guidance_scale", type=float, default=35.0, help="CFG scale")
    g.add_argument("--model", default="controlnet", help="controlnet (= --sd_path + --controlnet_path) or a "
                   "preset, e.g. tiny-sd (with tiny-controlnet)")
    g.add_argument("--sd_path", default="sd15", help="SD model used with --model controlnet")
    g.add_argument("--controlnet_path", default=None, help="ControlNet (default: SD1.5 depth)")
    _control(g, cond_choices=("depth",))
    g.add_argument("--force_clean_composition", action="store_true", help="composite the decoded views over the "
                   "exact background colour (by the rendered alpha) before fitting colours")
    g.add_argument("--dataset_type", choices=("dense", "sparse", "colmap", "blender"), default="colmap",
                   help="camera source: blender (transforms_train.json) or colmap (dense/sparse = colmap)")
    g.add_argument("--plyfile", default=None, help="pretrained 3DGS point cloud (.ply)")
    g.add_argument("--source_path", default=None, help="dataset folder with the cameras")
    g.add_argument("--up_vec", choices=("z", "y"), default="z", help="world up axis of the scene (kept for "
                   "compatibility: dataset cameras are used as they are)")
    g.add_argument("--antialiased", action=argparse.BooleanOptionalAction, default=True,
                   help="antialiased (gsplat) splatting; --no-antialiased for scenes trained with the original "
                        "3DGS code")
    g.add_argument("--zt_init", action="store_true", help="X_T rendered from per-Gaussian noise over iid "
                   "background noise")
    g.add_argument("--background_color", choices=("white", "black"), default="white", help="render background")
    g.add_argument("--color_assign_method", choices=("previous", "zero", "instance"), default="previous",
                   help="init of each colour fit: the last fit of the same quantity, zeros, or the PLY's colours")
    g.add_argument("--canonical_domain", choices=("rgb", "latent"), default="rgb", help="per-Gaussian RGB "
                   "(rendered, VAE-encoded) or 4-channel latent features (rendered at latent size)")
    g.add_argument("--total_image_to_use", type=positive_int, default=50, help="use the first N dataset cameras")
    g.add_argument("--latent_view_size", type=positive_int, default=64, help="latent view size (instances)")
    g.add_argument("--rgb_view_size", type=positive_int, default=None, help="RGB view size (default and only "
                   "valid value: latent view size x the VAE factor, 512 for SD)")
    g.add_argument("--mvd_end", type=float, default=0.8, help="synchronise while t > (1 - mvd_end) T")
    g.add_argument("--ref_attention_end", type=float, default=0.2, help="reference-view attention while "
                   "t > (1 - x) T")
    g.add_argument("--max_batch_size", type=positive_int, default=50, help="views per attention chunk / VAE batch")
    g.add_argument("--iterations", type=nonnegative_int, default=1000, help="Adam steps of each colour fit (the inverse g)")
    g.add_argument("--final_iterations", type=nonnegative_int, default=4000, help="Adam steps of the final colour fit")
    g.add_argument("--xyz_lr", type=float, default=3e-4, help="position lr (with --enable_xyz; unused here)")
    g.add_argument("--scale_lr", type=float, default=0.005, help="scale lr (with --enable_covariance; unused "
                   "here)")
    g.add_argument("--quat_lr", type=float, default=0.001, help="rotation lr (with --enable_covariance; unused "
                   "here)")
    g.add_argument("--opacity_lr", type=float, default=0.05, help="opacity lr (with --enable_opacity; unused "
                   "here)")
    g.add_argument("--feature_lr", type=float, default=0.025, help="Adam lr of the colour features")
    g.add_argument("--enable_opacity", action="store_true", help="also optimise opacities (not supported: "
                   "geometry stays fixed)")
    g.add_argument("--enable_xyz", action="store_true", help="also optimise positions (not supported)")
    g.add_argument("--enable_covariance", action="store_true", help="also optimise scales/rotations (not "
                   "supported)")
    g.add_argument("--views_per_step", type=positive_int, default=1, help="views rendered per Adam step of a fit")
    return p


PARSERS = {"ambiguous_image": ambiguous_parser, "wide_image": wide_parser, "panorama": panorama_parser,
           "mesh": mesh_parser, "gs": gs_parser}
