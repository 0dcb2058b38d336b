"""Plain text-to-image from any preset, hub id or folder: the quickstart and a smoke test of the stack."""
from __future__ import annotations

import os
from typing import Sequence

import torch

from common.cli import ArgumentParser, add_model_args, add_sampling_args, parse_args, torch_dtype_from_name
from common.errors import UsageError
from common.io import atomic_save_image
from common.models.adapters import apply_adapters
from common.models.loading import load_pipeline
from common.pipelines.text2image import generate


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Text-to-image with the shared sampling loop (SD, SDXL, FLUX, IF stage I).")
    add_model_args(parser, default="tiny-sd")
    add_sampling_args(parser, steps=30, guidance_scale=None)  # None: the pipeline's own default
    parser.add_argument("--num_images", type=int, default=1, help="images per prompt")
    parser.add_argument("--output", default="outputs/sample.png",
                        help="PNG to write; with --num_images > 1, _<i> is added before the extension")
    return parser


def main(argv: Sequence[str] | None = None) -> list[str]:
    args = parse_args(build_parser(), argv)
    if not args.prompt:
        raise UsageError("no prompt: pass --prompt \"a photo of a dog\"")
    if not args.output.lower().endswith(".png"):
        raise UsageError(f"--output must be a .png file, got {args.output}")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value <= 0 or value % 8):
            raise UsageError(f"--{flag} must be a positive multiple of 8, got {value}")
    pipe = load_pipeline(args.pretrained_model_name_or_path, torch_dtype=torch_dtype_from_name(args.dtype),
                         device=args.device, revision=args.revision, variant=args.variant)
    apply_adapters(pipe, args.adapters)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    images = generate(pipe, args.prompt, args.negative_prompt or None, num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.guidance_scale, height=args.height, width=args.width, eta=args.eta,
                      generator=generator, num_images_per_prompt=args.num_images, output_type="pil")
    stem, ext = os.path.splitext(args.output)
    paths = [args.output] if len(images) == 1 else [f"{stem}_{i}{ext}" for i in range(len(images))]
    for image, path in zip(images, paths):
        atomic_save_image(image, path)
        print(f"wrote {path} ({image.width}x{image.height})")
    return paths
