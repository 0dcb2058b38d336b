"""Prior (class) images with masks for MuDI's prior preservation: the flags of the original `generate_prior.py`.

Per image i: generate "a photo of a {class}, simple background, ..." with the base model; with --gen_mask,
detect the class with OWLv2 and require EXACTLY one box (else regenerate, up to --max_tries), then segment that
box with SAM and save `mask_{i}.png` (0/255). Unlike the original, a class that never yields one box stops with
an error instead of silently saving an unmasked image at the last try; images go in as `img_{i}.png` only with
their mask, so an interrupted run resumes where it stopped (same seeds, same images). Masks already in
--mask_dir are used as they are (bring your own masks). Finally `class_metadata.jsonl` (which the original leaves
to the user) gets this class under --class_id, merged with the classes already listed there.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from common.cli import ArgumentParser, parse_args, torch_dtype_from_name
from common.errors import UsageError
from common.io import atomic_save_image
from mudi.detect import OWLV2_ID, Detector, Segmenter
from mudi.metadata import CLASS_METADATA_FILE, write_class_metadata

PROMPT = "a photo of a {}, simple background, full body view, award winning photography, highly detailed"
NEGATIVE = "anime, cartoon, graphic, text, painting, crayon, graphite, abstract glitch, blurry"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="MuDI prior images (+ OWLv2 box + SAM mask) and class_metadata.jsonl.")
    p.add_argument("--gen_class", required=True, help="class noun for the prompt and the default OWLv2 query")
    p.add_argument("--out_dir", default=None, help="image folder (default: dataset/prior/<class_with_underscores>)")
    p.add_argument("--num_images", type=int, default=50, help="number of prior images")
    p.add_argument("--gen_mask", action="store_true", help="detect with OWLv2 (one box) and segment with SAM")
    p.add_argument("--owl_query", default=None, help="OWLv2 text query (default: --gen_class)")
    p.add_argument("--mask_dir", default=None, help="mask folder (default: --out_dir); masks already there are kept")
    p.add_argument("--class_id", default="a", help="id of this class in class_metadata.jsonl (match the instance id)")
    p.add_argument("--class_data_dir", default=None,
                   help="folder whose class_metadata.jsonl gets this class (default: --out_dir)")
    p.add_argument("--model", "--pretrained_model_name_or_path", dest="model", default="sdxl",
                   help="base model (preset, hub id or folder)")
    p.add_argument("--pretrained_vae_model_name_or_path", default=None, help="another VAE (e.g. the fp16-fix one)")
    p.add_argument("--owl_model", default=OWLV2_ID, help='OWLv2 hub id / folder ("tiny", "tiny-single": random weights)')
    p.add_argument("--threshold", type=float, default=0.4, help="OWLv2 score threshold")
    p.add_argument("--sam_checkpoint", default=None, help='SAM checkpoint, e.g. sam_vit_h_4b8939.pth ("tiny": random)')
    p.add_argument("--sam_model_type", default="vit_h", help="SAM architecture of the checkpoint")
    p.add_argument("--max_tries", type=int, default=10, help="generations per image before giving up")
    p.add_argument("--num_inference_steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance_scale", type=float, default=None, help="CFG scale (default: the pipeline's)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="base seed (image i, try k: its own seed)")
    p.add_argument("--dtype", default="fp16" if torch.cuda.is_available() else "fp32", help="model dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return p


@dataclass
class PriorJob:
    gen_class: str
    out_dir: Path
    mask_dir: Path
    num_images: int
    query: str
    gen_mask: bool
    max_tries: int = 10
    seed: int = 0
    sampling: dict[str, Any] | None = None


def image_seed(seed: int, index: int, attempt: int) -> int:
    return seed * 1_000_003 + index * 1_000 + attempt


def _mask_png(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")


def generate_prior(job: PriorJob, generate_image, detector: Detector | None, segmenter: Segmenter | None,
                   progress: bool = True) -> list[int]:
    """Fill out_dir with img_{i}.png (and mask_dir with mask_{i}.png); returns the indices written now.

    `generate_image(seed) -> PIL image`. With `gen_mask`, an image counts only with exactly one detected box.
    """
    job.out_dir.mkdir(parents=True, exist_ok=True)
    job.mask_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in tqdm(range(job.num_images), desc=f"prior ({job.gen_class})", disable=not progress):
        img_path, mask_path = job.out_dir / f"img_{i}.png", job.mask_dir / f"mask_{i}.png"
        if img_path.is_file() and (mask_path.is_file() or not job.gen_mask):
            continue
        for attempt in range(job.max_tries):
            image = generate_image(image_seed(job.seed, i, attempt))
            if not job.gen_mask:
                break
            if mask_path.is_file():  # a mask brought for this index: keep it
                break
            boxes = detector(image, [job.query])
            if len(boxes) == 1:
                atomic_save_image(_mask_png(segmenter(image, boxes[0])), mask_path)
                break
        else:
            raise UsageError(f"no image of '{job.gen_class}' with exactly one '{job.query}' box after {job.max_tries} "
                             f"tries (image {i}); try another --owl_query, --threshold or class")
        atomic_save_image(image, img_path)
        written.append(i)
    return written


def class_entries(job: PriorJob, class_id: str, metadata_dir: Path) -> list[dict[str, str]]:
    entries = []
    for i in range(job.num_images):
        img, mask = job.out_dir / f"img_{i}.png", job.mask_dir / f"mask_{i}.png"
        if not img.is_file():
            continue
        entry = {"id": class_id, "file_name": os.path.relpath(img, metadata_dir),
                 "text": f"A photo of a {job.gen_class}"}
        if mask.is_file():
            entry["mask_path"] = os.path.relpath(mask, metadata_dir)
        entries.append(entry)
    return entries


def update_class_metadata(metadata_dir: Path, class_id: str, gen_class: str, entries: list[dict[str, str]]) -> Path:
    """Merge this class into `metadata_dir/class_metadata.jsonl` (other ids kept, this id's lines replaced)."""
    path = metadata_dir / CLASS_METADATA_FILE
    id_map: dict[str, str] = {}
    others: list[dict[str, str]] = []
    if path.is_file():
        lines = [json.loads(s) for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
        if lines and isinstance(lines[0].get("id"), dict):
            id_map = dict(lines[0]["id"])
            others = [row for row in lines[1:] if row.get("id") != class_id]
    id_map[class_id] = gen_class
    return write_class_metadata(metadata_dir, id_map, others + entries)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(build_parser(), argv)
    if args.num_images < 1 or args.max_tries < 1:
        raise UsageError("--num_images and --max_tries must be at least 1")
    out_dir = Path(args.out_dir or Path("dataset/prior") / args.gen_class.replace(" ", "_"))
    job = PriorJob(args.gen_class, out_dir, Path(args.mask_dir or out_dir), args.num_images,
                   args.owl_query or args.gen_class, args.gen_mask, args.max_tries, args.seed)
    detector = segmenter = None
    if args.gen_mask:
        from mudi.detect import load_owlv2, load_sam

        if not args.sam_checkpoint:
            raise UsageError("--gen_mask needs --sam_checkpoint (e.g. sam_vit_h_4b8939.pth)")
        detector = load_owlv2(args.owl_model, threshold=args.threshold, device=args.device)
        segmenter = load_sam(args.sam_checkpoint, model_type=args.sam_model_type, device=args.device)
    pipe = None

    def generate_image(seed: int) -> Image.Image:
        nonlocal pipe
        if pipe is None:
            pipe = _load_pipe(args)
        from common.pipelines.text2image import generate

        generator = torch.Generator(args.device).manual_seed(seed)
        return generate(pipe, PROMPT.format(args.gen_class), NEGATIVE, num_inference_steps=args.num_inference_steps,
                        guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                        generator=generator, output_type="pil", progress=False)[0]

    generate_prior(job, generate_image, detector, segmenter)
    metadata_dir = Path(args.class_data_dir or out_dir)
    path = update_class_metadata(metadata_dir, args.class_id, args.gen_class, class_entries(job, args.class_id,
                                                                                              metadata_dir))
    print(f"wrote {path}")
    return path


def _load_pipe(args):
    from common.models.loading import load_model, load_pipeline, resolve_spec

    pipe = load_pipeline(args.model, torch_dtype=torch_dtype_from_name(args.dtype), device=args.device)
    if args.pretrained_vae_model_name_or_path:
        from diffusers import AutoencoderKL

        pipe.vae = load_model(resolve_spec(args.pretrained_vae_model_name_or_path), AutoencoderKL,
                              torch_dtype=torch_dtype_from_name(args.dtype)).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
