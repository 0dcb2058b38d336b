"""`sample_flux.py` of SynCD: a fine-tuned FLUX (released `pytorch_model.bin` layout, strict key check) samples
a prompt with 1..k reference images of an object (§3). Writes <outdir>/<ref folder stem>/<slug>_<k>.png
(image k uses seed + k); refuses to overwrite earlier results unless --overwrite."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch

from common.cli import ArgumentParser, add_model_args, parse_args, positive_int
from common.data.images import list_images, load_rgb
from common.errors import UsageError
from common.io import atomic_save_image, atomic_write_json
from common.models.loading import load_pipeline, pipeline_family, preset_family
from syncd.pipeline import NEGATIVE_PROMPT, generate, preprocess_reference


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="SynCD: sample a fine-tuned FLUX with reference images of an object.")
    add_model_args(p, default="flux-dev")
    p.add_argument("--prompt", default="An actionfigure wearing a hat", help="text prompt (default: %(default)r)")
    p.add_argument("--ref_images", required=True, nargs="+",
                   help="a folder of reference images (the first --numref in sorted order) or image files")
    p.add_argument("--finetuned_path", default=None,
                   help="SynCD checkpoint: pytorch_model.bin (released) / .safetensors (ours) or its folder; SDXL "
                        "also sdxl_finetuned_20k.ckpt (Lightning: UNet LoRA + IP-Adapter)")
    p.add_argument("--outdir", default=None, help="output folder (default: ./samples_flux FLUX, ./samples SDXL)")
    p.add_argument("--num_images_per_prompt", type=positive_int, default=4, help="images (default: %(default)s)")
    p.add_argument("--inference_steps", "--num_inference_steps", dest="inference_steps", type=positive_int,
                   default=None, help="denoising steps (default: 30 FLUX, 50 SDXL)")
    p.add_argument("--numref", type=positive_int, default=1, help="reference images to use (default: %(default)s)")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="FLUX: distilled guidance (default 3.5); SDXL: text guidance (default 7.5)")
    p.add_argument("--true_cfg_scale", type=float, default=1.0,
                   help="text guidance scale; > 1 turns on the 3-pass image/text guidance (default: %(default)s)")
    p.add_argument("--image_guidance_scale", type=float, default=None,
                   help="image guidance of the normalised guidance; FLUX: 0 = plain true CFG (default 1.0); "
                        "SDXL: s0 of s_img(t) (default 8.0)")
    p.add_argument("--adaptive_image_guidance_scale", type=float, default=5.0,
                   help="SDXL: s_img(t) = s0 + this * (1000 - t) / 1000 (default: %(default)s)")
    p.add_argument("--ref_category", default=None, help='SDXL: reference prompts "photo of a {category}"')
    p.add_argument("--ip_adapter_scale", type=float, default=0.6,
                   help="SDXL: scale of the IP-Adapter-Plus global image condition (default: %(default)s)")
    p.add_argument("--ip_adapter_path", default=None,
                   help="SDXL: IP-Adapter-Plus weights (ip-adapter-plus_sdxl_vit-h.bin / .safetensors); the first "
                        "reference is its image. Also needed with a --finetuned_path that holds fine-tuned to_k_ip/to_v_ip "
                        "(sdxl_finetuned_20k.ckpt): the checkpoint has no image projection")
    p.add_argument("--image_encoder", default=None,
                   help="SDXL: image encoder of the IP-Adapter (preset, hub id or folder; default: clip-vit-h-14)")
    p.add_argument("--negative_prompt", default=None, help=f"negative prompt (default FLUX: {NEGATIVE_PROMPT!r}; SDXL: '')")
    p.add_argument("--seed", type=int, default=42, help="seed; image k uses seed + k (default: %(default)s)")
    p.add_argument("--height", "--resolution", dest="height", type=positive_int, default=512,
                   help="size of the (square) target and reference images (default: %(default)s)")
    p.add_argument("--attention_backend", default="sdpa", choices=("sdpa", "flex", "triton"),
                   help="backend of the masked (neg_mode) pass (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output images")
    return p


def reference_paths(ref_images: Sequence[str], numref: int) -> tuple[list[Path], str]:
    """The first `numref` reference images and the output sub-folder name."""
    if len(ref_images) == 1 and Path(ref_images[0]).is_dir():
        folder = Path(ref_images[0])
        paths = list_images(folder)
        stem = folder.name
    else:
        paths = [Path(p) for p in ref_images]
        for p in paths:
            if not p.is_file():
                raise UsageError(f"--ref_images: no such image or folder: {p}")
        stem = paths[0].parent.name or "refs"
    if len(paths) < numref:
        raise UsageError(f"--numref {numref} but --ref_images gives {len(paths)} reference image(s)")
    return paths[:numref], stem


def reference_masks(paths: list[Path], size: int) -> torch.Tensor:
    """SDXL: masks/<stem>.jpg beside each reference (> 0 = object), centre-cropped like the image; all-ones
    when a reference has none. bool [k, size, size]."""
    from PIL import Image

    out = []
    for p in paths:
        m = p.parent / "masks" / f"{p.stem}.jpg"
        if m.is_file():
            img = Image.open(m).convert("L")
            ref_size = Image.open(p).size
            if img.size != ref_size:
                raise UsageError(f"mask {m} is {img.size[0]}x{img.size[1]}, its reference {ref_size[0]}x{ref_size[1]}")
            x = preprocess_reference(img.convert("RGB"), size)[0] > -1
        else:
            x = torch.ones(size, size, dtype=torch.bool)
        out.append(x)
    return torch.stack(out)


def slug(prompt: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:80] or "prompt"


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(build_parser(), argv)
    if args.height % 16:
        raise UsageError(f"--height must be a multiple of 16, got {args.height}")
    paths, stem = reference_paths(args.ref_images, args.numref)
    family = preset_family(args.pretrained_model_name_or_path) or "flux"
    flux = family == "flux"
    args.outdir = args.outdir or ("./samples_flux" if flux else "./samples")
    outdir = Path(args.outdir) / stem
    outs = [outdir / f"{slug(args.prompt)}_{k}.png" for k in range(args.num_images_per_prompt)]
    existing = [p for p in outs if p.exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{existing[0]} exists; pass --overwrite or another --outdir")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype, torch.float32)
    ref_images = [load_rgb(p) for p in paths]  # unreadable references fail before any model loads
    pipe = load_pipeline(args.pretrained_model_name_or_path, torch_dtype=dtype)
    family = pipeline_family(pipe)
    if family not in ("flux", "sdxl"):
        raise UsageError(f"SynCD samples FLUX or SDXL models, not {family}")
    flux = family == "flux"
    # FLUX: sample_flux.py's 2 x cast to the model dtype before / 255 - 1
    refs = torch.stack([preprocess_reference(im, args.height, dtype if flux else torch.float32) for im in ref_images])
    if not flux:  # the original's sample.py samples SDXL with Euler ancestral (the model's betas, no zero-SNR rescale)
        from diffusers import EulerAncestralDiscreteScheduler

        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if flux and (args.ip_adapter_path or args.image_encoder):
        raise UsageError("--ip_adapter_path / --image_encoder are for SDXL; the FLUX model has no IP-Adapter")
    ip_adapter = None
    if args.finetuned_path:
        from syncd.checkpoint import load_sdxl_checkpoint, load_syncd_checkpoint

        if flux:
            load_syncd_checkpoint(pipe.transformer, args.finetuned_path)
        else:  # the Lightning .ckpt, our pytorch_model.safetensors or its folder; IP weights need the base adapter
            ip_adapter = load_sdxl_checkpoint(pipe.unet, args.finetuned_path, ip_adapter_path=args.ip_adapter_path,
                                              image_encoder=args.image_encoder,
                                              ip_adapter_scale=args.ip_adapter_scale)[1]
    if args.ip_adapter_path and not flux and ip_adapter is None:
        from common.models.ip_adapter import load_ip_adapter

        ip_adapter = load_ip_adapter(pipe, args.ip_adapter_path, image_encoder=args.image_encoder,
                                     scale=args.ip_adapter_scale)
    steps = args.inference_steps or (30 if flux else 50)
    masks = None if flux else reference_masks(paths, args.height)
    for k, out in enumerate(outs):
        g = torch.Generator(device).manual_seed(args.seed + k)
        if flux:
            img = generate(pipe, args.prompt, refs, num_inference_steps=steps,
                           guidance_scale=3.5 if args.guidance_scale is None else args.guidance_scale,
                           true_cfg_scale=args.true_cfg_scale,
                           image_guidance_scale=1.0 if args.image_guidance_scale is None else args.image_guidance_scale,
                           negative_prompt=NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt,
                           generator=g, backend=args.attention_backend)[0]
        else:
            from syncd.sdxl_pipeline import generate_sdxl

            img = generate_sdxl(pipe, args.prompt, refs, masks,
                                ref_prompt=f"photo of a {args.ref_category}" if args.ref_category else "",
                                num_inference_steps=steps,
                                guidance_scale=7.5 if args.guidance_scale is None else args.guidance_scale,
                                image_guidance_scale=8.0 if args.image_guidance_scale is None else args.image_guidance_scale,
                                adaptive_image_guidance_scale=args.adaptive_image_guidance_scale,
                                negative_prompt=args.negative_prompt or "", generator=g, ip_adapter=ip_adapter)
        atomic_save_image(img, out)
        print(out)
    table_path = outdir / "prompts.json"  # {image: prompt}, what common/eval reads
    table = json.loads(table_path.read_text()) if table_path.is_file() else {}
    table.update({p.name: args.prompt for p in outs})
    atomic_write_json(table_path, table)
    return outs
