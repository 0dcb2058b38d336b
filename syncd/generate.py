"""SynCD data generation (§1): tuples of NUM images of one object generated jointly as one batch with
Masked Shared Attention - deformable objects (masks estimated online from category-token attention) and
rigid objects from meshes (depth-conditioned, MSA masks from the renders, latent warping across views for
t > --warp_thresh; each view scaled and pasted near the bottom of a black canvas as the original's loader,
`syncd.paste`, off with --no_paste); then (--score) DINOv2 pair similarity on mask-cropped objects + aesthetic
score. Prompts come from --prompts, or a local causal LM (--llm, `syncd.llm_prompts`) writes that file first.

Output (the original layout): <outdir>/{i}_{rank}_{k}.jpg, <outdir>/masks/{stem}.jpg, <outdir>/metadata_{rank}.json
(list of {filenames, prompts, objaverse_id, category}; prompts are the background / cleaned captions, not the
generation prompts, as the original); with --score <outdir>/metadata_with_scores.json.
Resumable: finished tuples (listed in the metadata) are skipped. Sharded over processes (accelerate launch):
tuple i goes to rank i % world_size.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from common.cli import ArgumentParser, add_model_args, parse_args, positive_int
from common.errors import UsageError
from common.io import atomic_save_image, atomic_write_json
from common.models.loading import load_pipeline, pipeline_family
from common.pipelines.conditioning import build_conditioning
from common.pipelines.denoisers import FluxDenoiser
from common.pipelines.latents import decode_latents
from common.pipelines.loop import Hook, StepState, sample
from common.render.cameras import Cameras
from common.render.mesh import load_mesh, normalize_mesh
from common.render.raster import rasterize
from common.render.raster.maps import depth_map
from common.train.conditioning import flux_latent_image_ids, flux_pack_latents, flux_unpack_latents
from syncd.msa import AttentionStore, area_token_mask, category_token_span, install_recording, msa_gates, msa_plan, \
    stacked_key_rotary
from syncd.pipeline import flux_scheduler
from syncd.paste import inverse_depth_image, paste, sample_paste
from syncd.warp import LatentWarpHook, render_depth, shift_scale_correspondences, triplet_correspondences

RIGID_NEGATIVE = "3d render, cartoon, low resolution, illustration, blurry"
#: phrases the original removes from rigid captions (src/dataloader.py PHRASES_TO_REMOVE)
RIGID_DROP_PHRASES = (
    "worn", "low-poly", "secluded", "rustic", "figurine", "distinctive", "retro-style", "quirky", "retro", "nostalgic",
    "historic", "peaceful", "wondrous", "mystical", "in a magical kingdom,", "fantastical", "majestic", "vibrant",
    "tranquil", "cartoon", "industrial-chic", "traditional", "chic", "vintage-inspired", "ornate", "rendering", "cozy",
    "flying in the air", "picturesque", "futuristic", "high-tech", "fantasy world", "from the future", "quaint",
    "vintage", "low poly number", "legendary", "striking", "serene", "bold and graphic", "stylish", "lush", "exotic",
    "trendy", "modern", "minimalist", "stunning", "iconic", "neon", "antique", "charming", "impressive", "whimsical",
    "bustling", "gleaming")
MESH_EXT = (".obj", ".glb", ".gltf", ".ply")
#: the original's assets/categories.txt
DEFORMABLE_CATEGORIES = ("Hamster", "Rabbit", "Fox", "Parrot", "Bird", "Squirrel", "Cat", "Dog", "Alpaca", "Mouse",
                         "Frog", "Bear", "Woodpecker", "Duck", "Fish", "Monkey")
JPEG_QUALITY = 75  #: PIL's default, what the original's `im_.save("....jpg")` writes


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="SynCD: generate multi-image object tuples (deformable with MSA; rigid from meshes).")
    add_model_args(p, default="flux-dev")
    p.add_argument("--mode", "--category_type", dest="mode", default="deformable", choices=("deformable", "rigid"),
                   help="deformable (prompts + MSA) or rigid (meshes: depth + warping + MSA)")
    p.add_argument("--prompts", default=None,
                   help="JSON prompt file: deformable [{category, background: [...], description}], rigid "
                        "{mesh id: [captions]}; default: --llm or built-in examples")
    p.add_argument("--llm", default=None, help="optional local transformers causal LM folder: writes the prompt file "
                   "(--prompts, default <outdir>/prompts_llm_<mode>.json; resumable) the way gen_prompts.py asks")
    p.add_argument("--captions", default=None, help="rigid --llm: Cap3D CSV 'object id,caption' (default: mesh stems)")
    p.add_argument("--num_prompts", type=positive_int, default=None, help="--llm: captions asked per request (25 / 10)")
    p.add_argument("--llm_batch_size", type=positive_int, default=None,
                   help="--llm: requests per deformable category (6) / rigid objects per batch (10)")
    p.add_argument("--max_new_tokens", type=positive_int, default=2048, help="--llm: new tokens per reply")
    p.add_argument("--prompts_only", action="store_true", help="--llm: write the prompt file and stop")
    p.add_argument("--category", nargs="*", default=list(DEFORMABLE_CATEGORIES),
                   help="deformable categories for --llm (default: the original's assets/categories.txt, 16 animals)")
    p.add_argument("--mesh_dir", "--objaverse_dir", dest="mesh_dir", default=None,
                   help="rigid: a folder of meshes (OBJ/GLB/PLY) or one mesh file")
    p.add_argument("--depth_model", default=None, help="rigid: FLUX.1-Depth-dev (default: --model with its "
                   "patch embedding widened for the depth channels, zero-initialised: plumbing for tiny models)")
    p.add_argument("--outdir", required=True, help="output folder")
    p.add_argument("--num", type=positive_int, default=3, help="images per tuple (NUM)")
    p.add_argument("--num_tuples", type=positive_int, default=None,
                   help="tuples to generate (default: one per prompt-file category; rigid: every mesh x --repeat_each_id)")
    p.add_argument("--repeat_each_id", type=positive_int, default=2, help="rigid: tuples per mesh (the original's 2)")
    p.add_argument("--inference_steps", "--num_inference_steps", dest="inference_steps", type=positive_int, default=None,
                   help="denoising steps (default: 50 deformable, 30 rigid)")
    p.add_argument("--guidance_scale", type=float, default=None, help="FLUX guidance (default: 3.5 / 10.0)")
    p.add_argument("--true_cfg_scale", type=float, default=2.5,
                   help="rigid: negative-prompt true CFG from step 1 (the original's guidance_scale_real 2.5; 1 = off)")
    p.add_argument("--height", "--resolution", dest="height", type=positive_int, default=None,
                   help="image size (default: 1024 deformable, 512 rigid)")
    p.add_argument("--warp_thresh", type=float, default=0.8, help="rigid: warp latents while t > this")
    p.add_argument("--no_warp", "--skip_warping", dest="no_warp", action="store_true", help="rigid: no latent warping")
    p.add_argument("--no_paste", action="store_true",
                   help="rigid: no scale-and-paste augmentation (views fill the frame; default: s ~ U(0.7, 0.95), "
                        "pasted near the bottom of a black canvas)")
    p.add_argument("--negative_prompt", default=RIGID_NEGATIVE, help="rigid: negative prompt of the true CFG")
    p.add_argument("--no_msa", action="store_true", help="no shared attention (independent images)")
    p.add_argument("--save_attn_mask", action="store_true", default=True, help="deformable: save the estimated masks")
    p.add_argument("--attention_backend", default="sdpa", choices=("sdpa", "flex", "triton"), help="MSA backend")
    p.add_argument("--seed", type=int, default=42, help="seed (each rank adds its index)")
    p.add_argument("--score", action="store_true", help="compute DINOv2 / aesthetic scores (metadata_with_scores.json)")
    p.add_argument("--tiny_backbones", action="store_true", help="tiny random scoring backbones (tests)")
    p.add_argument("--dinov2_model", default="facebook/dinov2-with-registers-large",
                   help="DINOv2 for --score (the original's dinov2_vitl14_reg)")
    p.add_argument("--aesthetic_model", default=None, help="LAION aesthetic head .pth for --score")
    p.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return p


# ------------------------------------------------------------------------------------------------- prompts

_EXAMPLES = [{"category": "cat", "background": ["A photo of a cat playing in a garden", "A cat on a sofa in a living room",
                                                "A cat sitting on a wooden fence at sunset"],
              "description": "The bengal cat with marbled coat features a pattern of vivid orange and black spots"}]


def deformable_prompts(args, rng: random.Random) -> list[dict[str, Any]]:
    data = read_prompt_file(args.prompts, list) if args.prompts else _EXAMPLES
    tuples = []
    for i in range(args.num_tuples or len(data)):
        entry = data[i % len(data)]
        if not isinstance(entry, dict) or not {"category", "background", "description"} <= set(entry):
            raise UsageError(f"--prompts: entries need category, background and description, got {entry!r:.80}")
        bgs, desc = list(entry["background"]), entry["description"]
        if len(bgs) < args.num:
            raise UsageError(f"category {entry['category']!r} has {len(bgs)} background prompts; --num {args.num}")
        if not desc:
            raise UsageError(f"category {entry['category']!r} has no description prompts")
        picked = rng.sample(bgs, args.num)
        desc = desc if isinstance(desc, str) else rng.choice(desc)
        tuples.append({"category": entry["category"], "captions": picked,  # the metadata's prompts (the original's)
                       "prompts": [f"{b.rstrip('.')}. {desc.rstrip('.')}. wide angle shot" for b in picked]})
    return tuples


def read_prompt_file(path: str, kind: type) -> Any:
    """A --prompts JSON file: a list (deformable) or a dict (rigid)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--prompts {path}: no such file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"--prompts {path}: not JSON ({e.msg})") from None
    if not isinstance(data, kind) or not data:
        raise UsageError(f"--prompts {path}: a non-empty {'list' if kind is list else 'dict'} expected for this --mode")
    return data


def llm_prompt_file(args, meshes: list[Path] | None) -> Path:
    """Run the local LLM (`syncd.llm_prompts`) for the categories (deformable) or objects (rigid) not yet in the
    prompt file; returns its path."""
    from syncd.llm_prompts import LocalLLM, deformable_prompt_file, read_captions, rigid_prompt_file

    rigid = meshes is not None
    path = Path(args.prompts) if args.prompts else Path(args.outdir) / f"prompts_llm_{args.mode}.json"
    captions = None
    if rigid:
        captions = mesh_captions(read_captions(args.captions) if args.captions else None, meshes)
    llm = LocalLLM(args.llm, device=args.device, max_new_tokens=args.max_new_tokens, seed=args.seed)
    if rigid:
        rigid_prompt_file(llm, captions, path, num_prompts=args.num_prompts or 10,
                          batch_size=args.llm_batch_size or 10, progress=args.progress)
    else:
        deformable_prompt_file(llm, args.category, path, num_prompts=args.num_prompts or 25,
                               batch_size=args.llm_batch_size or 6, progress=args.progress)
    return path


def mesh_captions(csv: dict[str, str] | None, meshes: list[Path]) -> dict[str, str]:
    """The captions the LLM is asked about: the Cap3D rows of the meshes at hand only (the original keeps the rows
    of its asset list, `captions[0].isin(categories)`), a mesh without a row gets none; without a CSV, each mesh
    stem ("red_mug" -> "red mug")."""
    if csv is None:
        return {m.stem: m.stem.replace("_", " ") for m in meshes}
    return {m.stem: csv[m.stem] for m in meshes if m.stem in csv}


def clean_rigid_caption(caption: str) -> str:
    """The original's `clean_prompt` for rigid captions: lower-case, the listed phrases removed (here as whole
    words, so "chic" does not cut "chicken"), spaces collapsed."""
    text = caption.lower()
    for phrase in RIGID_DROP_PHRASES:
        text = re.sub(rf"(?<!\w){re.escape(phrase)}(?!\w)", "", text)
    return " ".join(text.split())


def rigid_prompt(caption: str) -> str:
    return f"{clean_rigid_caption(caption)} a natural image with the object on the ground."


def rigid_captions(prompts: dict[str, list[str]] | None, stem: str, k: int, num: int) -> list[str] | None:
    """Captions of tuple k of object `stem`: the original takes captions[min(len - num, num k):] cyclically;
    None (skip) when the object has fewer than num (k + 1) captions. Without a prompt file: 'a {stem}'."""
    if prompts is None:
        return [f"a {stem.replace('_', ' ')}"] * num
    caps = prompts.get(stem)
    if not caps or len(caps) < num * (k + 1):
        return None
    caps = caps[min(len(caps) - num, num * k):]
    return [caps[j % len(caps)] for j in range(num)]


# ------------------------------------------------------------------------------------------------- generation


class MaskUpdate(Hook):
    """Deformable: after each step, fold the step's attention record into the estimate and rebuild masks (a no-op
    when the store already closed the step in its last layer)."""

    def __init__(self, store: AttentionStore, plan):
        self.store, self.plan = store, plan

    def on_step_end(self, state: StepState) -> None:
        self.store.end_step()
        self.plan.token_masks = self.store.masks()


class ControlDenoiser(FluxDenoiser):
    """FLUX with channel-concatenated control tokens (FLUX.1-Depth-dev); true CFG only from step 1."""

    def __init__(self, *a, control: torch.Tensor | None = None, **kw):
        super().__init__(*a, **kw)
        self.control = control

    def _run(self, x, t, embeds, pooled, ids, negative: bool = False):
        if self.control is not None:
            x = torch.cat([x, self.control.to(x.dtype)], dim=-1)
        return super()._run(x, t, embeds, pooled, ids, negative)

    def __call__(self, x_t, t, step: int = 0):
        scale = self.true_cfg_scale
        if step < 1:
            self.true_cfg_scale = 1.0
        try:
            return super().__call__(x_t, t, step)
        finally:
            self.true_cfg_scale = scale


def widen_for_depth(transformer) -> None:
    """Double the patch embedding's input channels (new columns zero) so depth tokens can be concatenated;
    a no-op contribution until trained - only for bases without a depth variant (tiny models)."""
    old = transformer.x_embedder
    new = torch.nn.Linear(old.in_features * 2, old.out_features, bias=old.bias is not None,
                          device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_features] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    transformer.x_embedder = new
    transformer.register_to_config(in_channels=old.in_features * 2)


def to_pil(img: torch.Tensor, truncate: bool = False) -> list[Image.Image]:
    """Decoded images [N, 3, H, W] in [-1, 1] -> PIL. Deformable: rounded (diffusers' postprocess, as
    gen_deformable.py); rigid (`truncate`): clip(x / 2 + 0.5) * 255 cast down, as gen_rigid.py."""
    x = ((img.float().clamp(-1, 1) / 2 + 0.5) * 255).permute(0, 2, 3, 1)
    x = x.floor() if truncate else x.round()
    return [Image.fromarray(a.byte().cpu().numpy()) for a in x]


def _decode(pipe, tokens: torch.Tensor, latent_hw, truncate: bool = False) -> list[Image.Image]:
    lat = flux_unpack_latents(tokens, latent_hw)
    return to_pil(decode_latents(pipe.vae, lat.to(pipe.vae.dtype)), truncate)


def generate_tuple(pipe, prompts: list[str], *, size: int, steps: int, guidance: float, generator: torch.Generator,
                   fg: torch.Tensor | None = None, spans=None, corr=None, control: torch.Tensor | None = None,
                   negative: str | None = None, true_cfg_scale: float = 1.0, warp_thresh: float = 0.8,
                   msa: bool = True, backend: str = "sdpa", max_sequence_length: int = 512, progress: bool = True
                   ) -> tuple[list[Image.Image], torch.Tensor | None, dict[str, Any]]:
    """N images of one object jointly. fg: bool [N, gh, gw] known masks (rigid) or None (deformable: estimated
    from `spans`); corr: correspondences for the latent warp; control: packed depth latents [N, L, C].
    Returns (images, final masks or None, info): deformable the Otsu estimate (float [N, gh, gw], undilated, what
    the original saves), rigid the token masks used."""
    tr, device = pipe.transformer, pipe.transformer.device
    n = len(prompts)
    factor = pipe.vae_scale_factor
    lh = lw = 2 * (size // (factor * 2))
    gh, gw = lh // 2, lw // 2
    cond = build_conditioning(pipe, prompts, [negative or ""] * n, do_cfg=true_cfg_scale > 1.0, device=device,
                              max_sequence_length=max_sequence_length)
    text_len = cond.embeds.shape[1]
    hooks: list[Hook] = []
    info: dict[str, Any] = {}
    plan = store = None
    handle = None
    if msa and n > 1:
        rot = stacked_key_rotary(tr, text_len, (lh, lw), n, device=device)
        plan = msa_plan(fg, n, text_len=text_len, key_rotary=rot, backend=backend)
        hooks.extend(msa_gates(plan))  # t = 1: no mask at all (text sees the others too); t < 1: MSA
        cond.attention = {"plan": plan}
        if fg is None and spans is not None:
            # the step closes in the last layer's record, before its attention (the original's editor)
            store = AttentionStore(spans, (gh, gw), dilate=1, layers_per_step=len(tr.attn_processors),
                                   on_step=lambda st: setattr(plan, "token_masks", st.masks()))
            cond.attention["attn_store"] = store
            hooks.append(MaskUpdate(store, plan))
        from common.attention.plan import install_plan
        handle = install_recording(tr) if store is not None else install_plan(tr)
    warp = None
    if corr is not None:
        warp = LatentWarpHook(corr, (gh, gw), thresh=warp_thresh)
        hooks.insert(0, warp)
    try:
        shape = (n, pipe.transformer.config.in_channels // (8 if control is not None else 4), lh, lw)
        noise = torch.randn(shape, generator=generator, device=device, dtype=tr.dtype)
        x = flux_pack_latents(noise)
        sched = flux_scheduler(pipe, steps, x.shape[1], device)
        den = ControlDenoiser(tr, cond, flux_latent_image_ids((lh, lw), device=device), guidance,
                              true_cfg_scale=true_cfg_scale, control=control)
        with torch.no_grad():
            x = sample(den, sched, x, hooks=hooks, progress=progress)
    finally:
        if handle is not None:
            handle.restore()
    if warp is not None:
        info["warp_steps"] = warp.calls
    masks = store.estimate() if store is not None else (plan.token_masks if plan is not None else None)
    return _decode(pipe, x, (lh, lw), truncate=control is not None), masks, info


# ------------------------------------------------------------------------------------------------- rigid


def mesh_files(path: str) -> list[Path]:
    root = Path(path)
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in MESH_EXT) if root.is_dir() else []
    if not files:
        raise UsageError(f"--mesh_dir {path}: no meshes ({', '.join(MESH_EXT)})")
    return files


def _views_to_size(depth: torch.Tensor, alpha: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canvas depth [N, C, C] and alpha -> the depth image [N, 1, size, size] in [0, 1] and a bool mask
    [N, size, size] (area-downsampled; any covered pixel is foreground, as the original's mask > 0)."""
    img = inverse_depth_image(depth)[:, None]
    a = alpha.float()[:, None]
    if img.shape[-1] != size:
        img = F.interpolate(img, size=(size, size), mode="area")
        a = F.interpolate(a, size=(size, size), mode="area")
    return img, a[:, 0] > 0


def rigid_views(mesh, num: int, size: int, rng: random.Random, tries: int = 20, *, augment: bool = True,
                canvas: int | None = None):
    """Cameras (elevation in (0, 60) deg), correspondences at 128^2 (triplets need > 10% matches per pair),
    the views rendered at the canvas size (2 * size: the original renders to 1024 for 512 images) and, with
    `augment`, scaled and pasted near the bottom of a black canvas (`syncd.paste`; views whose object covers
    < 10% of the render are redrawn). Returns (depth image [N, 1, size, size] in [0, 1], masks [N, size, size],
    correspondences (pasted) or None, pastes or None); None when no draw in `tries` qualifies."""
    canvas = canvas or 2 * size
    for _ in range(tries):
        elev = [rng.uniform(5, 55) for _ in range(num)]
        azim = [rng.uniform(0, 360) for _ in range(num)]
        cams128 = Cameras.orbit(elev, azim, distance=2.6, fov=40.0, size=128)
        d128 = render_depth(mesh, cams128, 128)
        if num == 3:
            corr = triplet_correspondences(d128, cams128)
            if corr is None:
                continue
        else:  # the original works on triplets; a pair uses (0, 1) with 1 as the anchor
            rows = triplet_correspondences(d128, cams128, min_fraction=0.0)
            corr = {(0, 1): rows[(0, 1)]} if rows else None
        cams = Cameras.orbit(elev, azim, distance=2.6, fov=40.0, size=canvas)
        frags = rasterize(cams.to_clip(mesh.verts), mesh.faces, canvas, canvas)
        depth, alpha = depth_map(frags, cams).float(), frags.mask
        if not augment:
            return (*_views_to_size(depth, alpha, size), corr, None)
        pastes = [sample_paste(float(a.float().mean()), rng, canvas) for a in alpha]
        if any(p is None for p in pastes):
            continue  # the original drops the sample: an object covering < 10% of a render
        depth = torch.stack([paste(d[None], p, mode="nearest")[0] for d, p in zip(depth, pastes)])
        alpha = torch.stack([paste(a[None].float(), p, mode="nearest")[0] > 0.5 for a, p in zip(alpha, pastes)])
        if corr is not None:
            corr = {(a, b): shift_scale_correspondences(r, pastes[a].scale, pastes[a].shift_yx, pastes[b].scale,
                                                        pastes[b].shift_yx, size=canvas) for (a, b), r in corr.items()}
        return (*_views_to_size(depth, alpha, size), corr, pastes)
    return None


def depth_tokens(pipe, depth01: torch.Tensor) -> torch.Tensor:
    """Depth images [N, 1, H, W] in [0, 1] -> packed VAE latents [N, L, 4C]: 3-channel, [-1, 1],
    (latent - shift_factor) * scaling_factor as FLUX.1-Depth-dev's control image (the original's pipeline)."""
    x = depth01.expand(-1, 3, -1, -1) * 2 - 1
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        lat = (vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode() - shift) * vae.config.scaling_factor
    return flux_pack_latents(lat)


# ------------------------------------------------------------------------------------------------- main


def _load_meta(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else []


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(build_parser(), argv)
    from accelerate import PartialState

    state = PartialState()
    rank, world = state.process_index, state.num_processes
    rigid = args.mode == "rigid"
    size = args.height or (512 if rigid else 1024)
    steps = args.inference_steps or (30 if rigid else 50)
    guidance = args.guidance_scale if args.guidance_scale is not None else (10.0 if rigid else 3.5)
    if rigid and not args.mesh_dir:
        raise UsageError("--mode rigid needs --mesh_dir (OBJ/GLB meshes)")
    if rigid and args.num not in (2, 3):
        raise UsageError("--mode rigid generates pairs or triplets (--num 2 or 3)")
    out = Path(args.outdir)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    meshes = mesh_files(args.mesh_dir) if rigid else None
    if args.llm:
        if state.is_main_process:
            args.prompts = str(llm_prompt_file(args, meshes))
        state.wait_for_everyone()
        args.prompts = args.prompts or str(out / f"prompts_llm_{args.mode}.json")
        if args.prompts_only:
            return Path(args.prompts)
    elif args.prompts_only:
        raise UsageError("--prompts_only needs --llm")
    meta_path = out / f"metadata_{rank}.json"
    meta = _load_meta(meta_path)
    done = {tuple(m["filenames"]) for m in meta}
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype, torch.float32)
    pipe = load_pipeline(args.depth_model if rigid and args.depth_model else args.pretrained_model_name_or_path,
                         torch_dtype=dtype)
    if pipeline_family(pipe) != "flux":
        raise UsageError("SynCD data generation runs on FLUX (FLUX.1-dev / FLUX.1-Depth-dev)")
    device = args.device or state.device
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if size % (pipe.vae_scale_factor * 2):
        raise UsageError(f"--height must be a multiple of {pipe.vae_scale_factor * 2}, got {size}")
    rng = random.Random(args.seed)
    if rigid:
        packed = pipe.vae.config.latent_channels * 4
        if pipe.transformer.config.in_channels == packed:
            widen_for_depth(pipe.transformer)
        rigid_caps = read_prompt_file(args.prompts, dict) if args.prompts else None
        jobs = [(m, k) for m in meshes for k in range(args.repeat_each_id)][: args.num_tuples]
    else:
        jobs = deformable_prompts(args, rng)
    for i, job in enumerate(tqdm(jobs, desc=f"tuples (rank {rank})", disable=not args.progress)):
        if i % world != rank:
            continue
        names = [f"{i}_{rank}_{k}.jpg" for k in range(args.num)]
        if tuple(names) in done and all((out / nm).is_file() for nm in names):
            continue
        g = torch.Generator(device).manual_seed(args.seed + rank + 1000 * i)
        if rigid:
            mesh_path, k = job
            caps = rigid_captions(rigid_caps, mesh_path.stem, k, args.num)
            if caps is None:
                tqdm.write(f"skipping {mesh_path.stem} (tuple {k}): fewer than {args.num * (k + 1)} captions in --prompts")
                continue
            mesh = normalize_mesh(load_mesh(mesh_path)).to(device)
            # views and pastes from a per-tuple RNG: the same draws whatever the rank count or resume point
            views = rigid_views(mesh, args.num, size, random.Random(args.seed * 1_000_003 + i),
                                augment=not args.no_paste)
            if views is None:
                tqdm.write(f"skipping {mesh_path.stem} (tuple {k}): no views with enough overlap / object area")
                continue
            depth, alpha, corr, pastes = views
            prompts = [rigid_prompt(c) for c in caps]
            lh = 2 * (size // (pipe.vae_scale_factor * 2))
            fg = area_token_mask(alpha, (lh // 2, lh // 2))
            images, _, info = generate_tuple(
                pipe, prompts, size=size, steps=steps, guidance=guidance, generator=g, fg=fg,
                corr=None if args.no_warp else corr, control=depth_tokens(pipe, depth), negative=args.negative_prompt,
                true_cfg_scale=args.true_cfg_scale, warp_thresh=args.warp_thresh, msa=not args.no_msa,
                backend=args.attention_backend, max_sequence_length=args.max_sequence_length, progress=False)
            mask_imgs = [Image.fromarray((a.cpu().numpy() * 255).astype(np.uint8)).convert("RGB") for a in alpha]
            # metadata prompts: the cleaned captions, without the generation suffix (the original's batch['prompts'])
            entry = {"filenames": names, "prompts": [clean_rigid_caption(c) for c in caps],
                     "objaverse_id": mesh_path.stem, "category": "rigid",
                     "original_filenames": [f"{mesh_path.stem}_view{j}" for j in range(args.num)], **info}
            if pastes is not None:
                entry["paste"] = [{"scale": q.scale, "x": q.x, "y": q.y, "canvas": q.canvas} for q in pastes]
        else:
            prompts = job["prompts"]
            spans = [category_token_span(pipe.tokenizer_2, p, job["category"]) for p in prompts]
            images, masks, info = generate_tuple(
                pipe, prompts, size=size, steps=steps, guidance=guidance, generator=g, spans=spans,
                msa=not args.no_msa, backend=args.attention_backend,
                max_sequence_length=args.max_sequence_length, progress=False)
            if masks is None:
                masks = torch.ones(args.num, 1, 1, dtype=torch.bool)
            up = F.interpolate(masks.float()[:, None], size=(size, size), mode="nearest")[:, 0].clamp(0, 1)
            mask_imgs = [Image.fromarray((m.cpu().numpy() * 255).astype(np.uint8)) for m in up]  # 'L', as the original
            # metadata prompts: the background captions (the original stores `prompt`, not the generation prompts)
            entry = {"filenames": names, "prompts": list(job["captions"]), "objaverse_id": "", "category": "deformable"}
        for nm, img, m in zip(names, images, mask_imgs):
            atomic_save_image(img, out / nm, quality=JPEG_QUALITY)
            atomic_save_image(m, out / "masks" / nm, quality=JPEG_QUALITY)
        meta = [m for m in meta if tuple(m["filenames"]) != tuple(names)] + [entry]
        atomic_write_json(meta_path, meta)
    state.wait_for_everyone()
    if args.score and state.is_main_process:
        from syncd.scores import score_folder

        score_folder(out, tiny=args.tiny_backbones, dinov2=args.dinov2_model, aesthetic=args.aesthetic_model,
                     device=str(device), progress=args.progress)
    return out
