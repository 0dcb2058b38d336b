"""`sample_mipadapter.py`: the original `inference.py` (same flags and defaults: 30 steps, seed 420, its negative
prompt, CFG 5.0 as its SDXL pipeline ran) for any number of references: `--ref word=path` (several images:
`word=a.jpg,b.jpg`), the original two flags or a `--ref_dir` folder whose file stems are the entity words.
Beyond the original: `--ref_mask word=mask.png` confines a reference to a region (multiplied into the routing),
`--ip_step_range START END` keeps the image branch on only inside that part of the schedule, and
`--save_weight_maps` writes each reference's routing map as a heat map over the image."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.cli import ArgumentParser, parse_args, positive_int, torch_dtype_from_name
from common.data.masks import load_mask
from common.errors import UsageError
from common.io import atomic_save_image, atomic_write_json
from common.models.adapters import read_manifest, weights_path
from common.models.image_encoders import load_image_encoder
from common.models.loading import load_pipeline, pipeline_family
from mipadapter import references as refs_mod
from mipadapter.model import VARIANTS, MIPAdapter
from mipadapter.outputs import safe_name, weight_overlay
from mipadapter.pipeline import GUIDANCE_SCALE, NEGATIVE_PROMPT, generate


def str2bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "y"):
        return True
    if text.lower() in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction of the schedule in [0, 1], got {text}")
    return value


def add_model_flags(p: ArgumentParser) -> None:
    g = p.add_argument_group("model (inference.py names first)")
    g.add_argument("--base_model_path", "--pretrained_model_name_or_path", "--model", dest="base_model_path",
                   default=None, help="SDXL base (sdxl) / RealVisXL_V1.0 (sdxl_plus): preset, hub id or folder "
                                      "(default: the variant's base model)")
    g.add_argument("--image_encoder_path", default=None,
                   help="CLIP vision folder or preset (default: the manifest's, else the variant's)")
    g.add_argument("--ip_ckpt", required=True,
                   help="MIP-Adapter checkpoint (model_sdxl.bin, model_sdxl_plus.bin, .safetensors) or a trained "
                        "output folder with adapter.json")
    g.add_argument("--is_plus", type=str2bool, default=None,
                   help="True: the sdxl_plus variant (ViT-H/14, Resampler, 16 tokens); checked against --ip_ckpt")
    g.add_argument("--variant", choices=tuple(VARIANTS), default=None,
                   help="sdxl | sdxl_plus (same as --is_plus False/True; default: read from the checkpoint)")
    g.add_argument("--dtype", default="fp16" if torch.cuda.is_available() else "fp32",
                   choices=("fp32", "fp16", "bf16"), help="model dtype")
    g.add_argument("--device", default=None, help="torch device (default: cuda when available)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="sample_mipadapter.py", description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    g = p.add_argument_group("references")
    g.add_argument("--ref", action="append", default=[], metavar="WORD=PATH[,PATH]",
                   help="a reference object: its entity word (must appear in the prompt) and its image(s); repeat "
                        "for each object")
    g.add_argument("--reference_image1_path", default=None, help="original flag: reference 1 (file stem = word)")
    g.add_argument("--reference_image2_path", default=None, help="original flag: reference 2 (file stem = word)")
    g.add_argument("--ref_dir", default=None,
                   help="folder of references: cat.jpg -> word 'cat' (or a sub-folder cat/ with several images)")
    g.add_argument("--ref_mask", action="append", default=[], metavar="WORD=MASK",
                   help="confine the reference of WORD to the white region of MASK (multiplied into its routing)")
    s = p.add_argument_group("sampling")
    s.add_argument("--prompt", required=True, help="text prompt naming every reference's word")
    s.add_argument("--scale", type=float, default=0.6,
                   help="image-prompt scale λ (README: 0.75 for sdxl, 0.65 for sdxl_plus)")
    s.add_argument("--num_samples", type=positive_int, default=1, help="images per prompt")
    s.add_argument("--num_inference_steps", "--steps", dest="num_inference_steps", type=positive_int, default=30,
                   help="denoising steps")
    s.add_argument("--guidance_scale", type=float, default=GUIDANCE_SCALE,
                   help="classifier-free guidance (the original's generate never forwards its 7.5: the SDXL "
                        "pipeline's default 5.0 is what ran)")
    s.add_argument("--seed", type=int, default=420, help="random seed")
    s.add_argument("--height", type=positive_int, default=None, help="image height (default: the model's, 1024)")
    s.add_argument("--width", type=positive_int, default=None, help="image width (default: the model's, 1024)")
    s.add_argument("--negative_prompt", default=NEGATIVE_PROMPT, help="negative prompt")
    s.add_argument("--ip_step_range", nargs=2, type=fraction, default=(0.0, 1.0), metavar=("START", "END"),
                   help="fractions of the schedule inside which the image branch is on")
    o = p.add_argument_group("output")
    o.add_argument("--output_dir", required=True, help="writes <prompt>_gen_<i>.png")
    o.add_argument("--save_weight_maps", action="store_true",
                   help="also write <prompt>_gen_<i>_weights_<word>.png: each reference's routing map as a heat map")
    o.add_argument("--overwrite", action="store_true", help="replace existing images of the same prompt")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    return p


def checkpoint_file(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The weights file of --ip_ckpt (a file, or a folder with its manifest) and the manifest's options."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--ip_ckpt {path} does not exist")
    manifest = read_manifest(path)
    if path.is_dir() and manifest is None:
        raise UsageError(f"--ip_ckpt {path} is a folder without adapter.json; pass the weights file")
    return weights_path(path, manifest), (manifest or {}).get("options", {})


def wanted_variant(args: argparse.Namespace) -> str | None:
    if args.is_plus is not None and args.variant is not None and args.is_plus != (args.variant == "sdxl_plus"):
        raise UsageError(f"--is_plus {args.is_plus} contradicts --variant {args.variant}")
    if args.variant:
        return args.variant
    return None if args.is_plus is None else ("sdxl_plus" if args.is_plus else "sdxl")


def load(args: argparse.Namespace, *, dtype: str | None = None, device: str | None = None) -> tuple[Any, MIPAdapter, Any]:
    """(pipeline, adapter, image encoder) from the model flags; wrong-variant and non-SDXL bases are one line."""
    return load_mip(args.ip_ckpt, args.base_model_path, args.image_encoder_path, wanted_variant(args),
                    dtype or args.dtype, device or args.device)


def load_mip(ip_ckpt: str, base: str | None, image_encoder: str | None, want: str | None, dtype: str,
             device: str | None) -> tuple[Any, MIPAdapter, Any]:
    from common.models.ip_adapter import read_ip_adapter, variant_of

    file, options = checkpoint_file(ip_ckpt)
    state = read_ip_adapter(file)
    found = {"plain": "sdxl", "plus": "sdxl_plus"}[variant_of(state, str(file))]
    if want is not None and want != found:
        raise UsageError(f"--ip_ckpt {file} is a {found} checkpoint but {want} was asked for "
                         f"(--is_plus {found == 'sdxl_plus'} / --variant {found})")
    variant = VARIANTS[found]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = torch_dtype_from_name(dtype)
    pipe = load_pipeline(base or variant.base, torch_dtype=torch_dtype, device=device)
    if pipeline_family(pipe) != "sdxl":
        raise UsageError(f"MIP-Adapter needs an SDXL base model, got a {pipeline_family(pipe)} one")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    adapter = MIPAdapter(pipe.unet, state, source=str(file))
    encoder = load_image_encoder(image_encoder or options.get("image_encoder") or variant.image_encoder,
                                 torch_dtype=torch_dtype, device=device)
    have = encoder.model.config.projection_dim if variant.feature == "pooled" else encoder.model.config.hidden_size
    need = adapter.image_proj_state["proj.weight" if found == "sdxl" else "proj_in.weight"].shape[1]
    if have != need:
        raise UsageError(f"the image encoder gives {variant.feature} features of size {have} but {file} takes {need}; "
                         f"pass the encoder it was trained with (--image_encoder_path)")
    return pipe, adapter, encoder


def reference_masks(references, mask_flags, height: int, width: int) -> torch.Tensor | None:
    """[K, h, w] float masks at the latent size (1 everywhere for a reference without one), or None."""
    paths = refs_mod.masks_for(references, mask_flags)
    if not paths:
        return None
    return torch.stack([load_mask(paths[r.word.lower()], (height, width), soft=True, mode="area")
                        if r.word.lower() in paths else torch.ones(height, width) for r in references])


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Sample --num_samples images; returns the written image paths."""
    args = parse_args(build_parser(), argv)
    references = refs_mod.from_flags(args.ref, [args.reference_image1_path, args.reference_image2_path], args.ref_dir)
    refs_mod.check(references, args.prompt)
    if args.ip_step_range[0] >= args.ip_step_range[1]:
        raise UsageError(f"--ip_step_range START must be below END, got {args.ip_step_range}")
    refs_mod.masks_for(references, args.ref_mask)  # bad words before loading the model
    out_dir = Path(args.output_dir)
    stem = safe_name(args.prompt)
    targets = [out_dir / f"{stem}_gen_{i}.png" for i in range(args.num_samples)]
    existing = [t for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{existing[0]} exists; pass --overwrite or another --output_dir")
    pipe, adapter, encoder = load(args)
    height = args.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = args.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    f = pipe.vae_scale_factor
    if height % f or width % f:
        raise UsageError(f"--height/--width must be multiples of {f}, got {height}x{width}")
    if len(references) > 2:
        print(f"note: {len(references)} references; MIP-Adapter was trained with 2 (more is extrapolation)")
    masks = reference_masks(references, args.ref_mask, height // f, width // f)
    images, maps = generate(pipe, adapter, encoder, args.prompt, [r.images() for r in references],
                            [r.word for r in references], scale=args.scale, num_samples=args.num_samples,
                            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                            seed=args.seed, height=height, width=width, negative_prompt=args.negative_prompt,
                            masks=masks, ip_step_range=tuple(args.ip_step_range), weight_maps=args.save_weight_maps,
                            progress=args.progress)
    written = []
    for i, (img, target) in enumerate(zip(images, targets)):
        atomic_save_image(img, target)
        written.append(target)
        if maps is not None:
            for k, ref in enumerate(references):
                atomic_save_image(weight_overlay(img, maps[i, k]), out_dir / f"{stem}_gen_{i}_weights_{safe_name(ref.word)}.png")
    atomic_write_json(out_dir / f"{stem}_gen.json", {
        "prompt": args.prompt, "references": {r.word: [str(p) for p in r.paths] for r in references},
        "scale": args.scale, "seed": args.seed, "steps": args.num_inference_steps, "ip_ckpt": str(args.ip_ckpt),
        "variant": adapter.variant.name, "ip_step_range": list(args.ip_step_range), "images": [t.name for t in written]})
    for t in written:
        print(t)
    return written
