"""Sample with a trained (or merged) concept, as the reference `diffusers_sample.py` / LDM `sample.py`.

The paper's sampler: DDIM, 200 steps, eta 1, guidance 6. Writes one row image per prompt (`<prompt>.png`,
the reference's naming), every image under `samples/<i>.png`, and `prompts.json` (image stem -> prompt, the
layout CustomConcept101's evaluate.py reads), rewritten after every image so the two stay in step. Without
`--outdir` every run gets a new numbered folder beside the concept (`sample-001`, ...); an `--outdir` that
already holds samples is refused unless `--overwrite`. `apply_customdiffusion` is the seam other samplers use.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from common.cli import ArgumentParser, SamplingConfig, parse_args, positive_int, torch_dtype_from_name
from common.errors import UsageError
from common.io import atomic_save_image
from common.pipelines.text2image import generate, use_ddim
from customdiffusion.apply import apply_customdiffusion
from customdiffusion.outputs import SAMPLES_DIR, SampleRecord, claim_run_dir, holds_samples

__all__ = ["apply_customdiffusion", "check_prompt_tokens", "read_prompts", "sample_images", "sample_to_folder",
           "main"]

_MODIFIER = re.compile(r"<[A-Za-z0-9_\-]+>")


def read_prompts(prompt: str | None = None, from_file: str | None = None) -> list[str]:
    """One prompt, or the non-empty lines of a file. A `prompt` naming an existing file is read as one."""
    if from_file:
        path = Path(from_file)
        if not path.is_file():
            raise UsageError(f"prompt file not found: {from_file}")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise UsageError(f"{from_file} holds no prompts")
        return lines
    if prompt is None:
        raise UsageError("give --prompt or --from-file")
    if Path(prompt).is_file():
        return read_prompts(from_file=prompt)
    return [prompt]


def check_prompt_tokens(pipe: Any, prompts: Sequence[str], concept_tokens: Sequence[str]) -> None:
    """Refuse a prompt naming a `<token>` the pipeline's tokenizer does not know: it would be split into
    sub-words and sample the base model's idea of them, silently."""
    known = set(pipe.tokenizer.get_vocab())
    for prompt in prompts:
        for token in _MODIFIER.findall(prompt):
            if token not in known:
                have = "+".join(concept_tokens) if concept_tokens else "none"
                raise UsageError(f"prompt {prompt!r} names {token}, which the loaded concept does not define "
                                 f"(its tokens: {have}); fix the prompt or load the concept that has it")


def check_sampling(num_inference_steps: int, num_images: int, batch_size: int, height: int | None,
                   width: int | None, guidance_scale: float = 6.0, eta: float = 1.0, factor: int = 8) -> None:
    """Refuse step counts, image counts and sizes that cannot sample (sizes: positive multiples of the model's
    `factor`, 8 before it is loaded), as sample.py does -- before any model is loaded where possible."""
    if batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {batch_size}")
    SamplingConfig(num_inference_steps=num_inference_steps, num_images=num_images, height=height, width=width,
                   guidance_scale=guidance_scale, eta=eta, factor=factor)


def sample_images(pipe: Any, prompt: str, num_images: int, batch_size: int, generator: torch.Generator,
                  **kwargs: Any) -> list[PIL.Image.Image]:
    """`num_images` images of one prompt, `batch_size` per call, all drawn from one generator."""
    images: list[PIL.Image.Image] = []
    while len(images) < num_images:
        n = min(batch_size, num_images - len(images))
        images += generate(pipe, [prompt] * n, generator=generator, output_type="pil", progress=False, **kwargs)
    return images


def _row(images: Sequence[PIL.Image.Image]) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.hstack([np.asarray(im) for im in images]))


def sample_to_folder(pipe: Any, concept: str | Path | None, *, prompts: str | Sequence[str], outdir: str | Path,
                     num_images: int = 5, batch_size: int = 5, seed: int = 42, num_inference_steps: int = 200,
                     guidance_scale: float = 6.0, eta: float = 1.0, compress: bool | None = None,
                     height: int | None = None, width: int | None = None, skip_grid: bool = False,
                     overwrite: bool = False) -> list[Path]:
    """Apply `concept` (if any) to `pipe`, sample every prompt and write the images. Returns their paths.

    `outdir` must not hold samples yet (else UsageError) unless `overwrite`, which removes the old ones first.
    """
    check_sampling(num_inference_steps, num_images, batch_size, height, width, guidance_scale, eta,
                   factor=getattr(pipe, "vae_scale_factor", 8))
    prompt_list = read_prompts(prompts) if isinstance(prompts, str) else list(prompts)
    outdir = Path(outdir)
    record = SampleRecord(outdir)
    if holds_samples(outdir) and not overwrite:
        record.start(overwrite=False)  # refuses before the concept touches the pipeline
    tokens = apply_customdiffusion(pipe, concept, compress=compress) if concept is not None else []
    check_prompt_tokens(pipe, prompt_list, tokens)
    record.start(overwrite=overwrite)
    use_ddim(pipe)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    written: list[Path] = []
    for prompt in prompt_list:
        images = sample_images(pipe, prompt, num_images, batch_size, generator, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, eta=eta, height=height, width=width)
        if not skip_grid:
            atomic_save_image(_row(images), outdir / ("-".join(prompt[:50].split()).replace("/", "_") + ".png"))
        for im in images:
            path = outdir / SAMPLES_DIR / f"{len(written)}.png"
            atomic_save_image(im, path)
            record.add(path, prompt)
            written.append(path)
    return written


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="sample_customdiffusion.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", "--pretrained_model_name_or_path", "--model", dest="ckpt", required=True,
                   help="base model: preset (tiny-sd), hub id or folder")
    p.add_argument("--delta_ckpt", default=None, help="concept checkpoint, any layout (none: the base model)")
    p.add_argument("--prompt", default=None, help="prompt to generate")
    p.add_argument("--from-file", "--from_file", "--prompt_file", dest="from_file", default=None,
                   help="file with one prompt per line")
    p.add_argument("--compress", action="store_true", help="the delta is compressed (detected from the file anyway)")
    p.add_argument("--sdxl", action="store_true", help="the base is SDXL (detected from the model anyway)")
    p.add_argument("--batch_size", type=positive_int, default=5, help="images per prompt per forward pass")
    p.add_argument("--num_images", "--n_samples", dest="num_images", type=positive_int, default=None,
                   help="images per prompt (default: --batch_size)")
    p.add_argument("--freeze_model", default="crossattn_kv", choices=["crossattn_kv", "crossattn"],
                   help="kept for the original CLI; the layout is read from the checkpoint")
    p.add_argument("--num_inference_steps", "--ddim_steps", dest="num_inference_steps", type=int, default=200,
                   help="DDIM steps")
    p.add_argument("--guidance_scale", "--scale", dest="guidance_scale", type=float, default=6.0,
                   help="classifier-free guidance scale")
    p.add_argument("--eta", "--ddim_eta", dest="eta", type=float, default=1.0, help="DDIM eta")
    p.add_argument("--height", "--H", dest="height", type=int, default=None, help="image height (default: model's)")
    p.add_argument("--width", "--W", dest="width", type=int, default=None, help="image width (default: model's)")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.add_argument("--outdir", default=None,
                   help="output folder (default: a new numbered folder sample-NNN beside --delta_ckpt, else under "
                        "outputs/customdiffusion)")
    p.add_argument("--overwrite", action="store_true", help="replace the samples already in --outdir")
    p.add_argument("--skip_grid", action="store_true", help="do not write the per-prompt row images")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="model dtype")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    return p


def main(argv: Sequence[str] | None = None) -> list[Path]:
    from common.models.loading import load_pipeline, pipeline_family

    args = parse_args(build_parser(), argv)
    prompts = read_prompts(args.prompt, args.from_file)
    num_images = args.num_images or args.batch_size
    check_sampling(args.num_inference_steps, num_images, args.batch_size, args.height, args.width,
                   args.guidance_scale, args.eta)
    if args.delta_ckpt and not Path(args.delta_ckpt).exists():
        raise UsageError(f"Custom Diffusion checkpoint not found: {args.delta_ckpt}; check the path")
    if args.outdir and holds_samples(args.outdir) and not args.overwrite:
        SampleRecord(args.outdir).start(overwrite=False)  # refuse before loading any model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.ckpt, torch_dtype=torch_dtype_from_name(args.dtype), device=device)
    pipe.set_progress_bar_config(disable=True)
    if args.sdxl and pipeline_family(pipe) != "sdxl":
        raise UsageError(f"--sdxl given but {args.ckpt} is not an SDXL model")
    check_sampling(args.num_inference_steps, num_images, args.batch_size, args.height, args.width,
                   args.guidance_scale, args.eta, factor=pipe.vae_scale_factor)
    # the concept and the prompts are checked before any output folder is made
    tokens = apply_customdiffusion(pipe, args.delta_ckpt, compress=args.compress or None) if args.delta_ckpt else []
    check_prompt_tokens(pipe, prompts, tokens)
    if args.outdir:
        outdir = Path(args.outdir)
    else:
        delta = Path(args.delta_ckpt) if args.delta_ckpt else None
        base = (delta if delta.is_dir() else delta.parent) if delta else Path("outputs/customdiffusion")
        outdir = claim_run_dir(base)
    paths = sample_to_folder(pipe, None, prompts=prompts, outdir=outdir, num_images=num_images,
                             batch_size=args.batch_size, seed=args.seed, num_inference_steps=args.num_inference_steps,
                             guidance_scale=args.guidance_scale, eta=args.eta, height=args.height, width=args.width,
                             skip_grid=args.skip_grid, overwrite=args.overwrite)
    print(f"wrote {len(paths)} images to {outdir}")
    return paths
