"""`eval_customdiffusion.py`: the CustomConcept101 protocol (customdiffusion.eval_protocol) plus `--generate`,
which first samples every concept with its trained checkpoint using the paper's sampler (DDIM 200 steps, eta 1,
guidance 6, 5 images per prompt -> 100 per concept), skipping concepts whose images are complete and
resampling any folder an interrupted run left incomplete (resumable)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from common.cli import ArgumentParser, positive_int, torch_dtype_from_name
from common.errors import UsageError
from common.eval.datasets import Benchmark
from common.models.loading import load_pipeline
from customdiffusion import eval_protocol
from customdiffusion.outputs import SAMPLES_DIR, holds_samples, read_record
from customdiffusion.sample import check_sampling, sample_to_folder


def add_generate_args(p: ArgumentParser) -> None:
    g = p.add_argument_group("--generate (sampling before scoring)")
    g.add_argument("--ckpt", "--pretrained_model_name_or_path", dest="ckpt", default="sd14",
                   help="base model the concepts were trained from")
    g.add_argument("--concepts_root", default=None,
                   help="folder with one trained concept per benchmark entry: <concepts_root>/<concept name>/ "
                        "(any checkpoint layout; multi-concept: <name1>+<name2>/ from joint training or merging)")
    g.add_argument("--samples_per_prompt", type=positive_int, default=5,
                   help="images per prompt (CustomConcept101: 5)")
    g.add_argument("--sample_batch_size", type=positive_int, default=5, help="images per sampling forward pass")
    g.add_argument("--num_inference_steps", type=positive_int, default=200,
                   help="DDIM steps (paper: 200; also 50)")
    g.add_argument("--guidance_scale", type=float, default=6.0, help="classifier-free guidance")
    g.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    g.add_argument("--sample_seed", type=int, default=42, help="sampling seed")
    g.add_argument("--sample_dtype", default="fp16" if torch.cuda.is_available() else "fp32",
                   choices=("fp32", "fp16", "bf16"), help="dtype of the diffusion model while sampling")
    g.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the model's)")


def is_complete(folder: Path, expected: int) -> bool:
    """A finished sample folder: `expected` prompt records, each with its image."""
    table = read_record(folder)
    return table is not None and len(table) == expected and all(
        (folder / SAMPLES_DIR / f"{stem}.png").is_file() for stem in table)


def generate(args: argparse.Namespace, bench: Benchmark) -> None:
    """Sample <sample_root>/<task>/ for every task (or --concepts) whose checkpoint exists."""
    if not args.concepts_root:
        raise UsageError("--generate needs --concepts_root (one trained concept folder per benchmark entry)")
    check_sampling(args.num_inference_steps, args.samples_per_prompt, args.sample_batch_size, args.height,
                   args.width, args.guidance_scale, args.eta)
    root, out_root = Path(args.concepts_root), Path(args.sample_root)
    tasks = [bench.task(n) for n in args.concepts] if args.concepts else list(bench.tasks)
    todo = [t for t in tasks if (root / t.name).exists()]
    if not todo:
        raise UsageError(f"no trained concept in {root} matches a {bench.name} entry (e.g. {root / tasks[0].name})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for task in todo:
        outdir = out_root / task.name
        prompts = task.prompts(with_token=True)
        if is_complete(outdir, len(prompts) * args.samples_per_prompt):
            print(f"{task.name}: images exist, skipped")
            continue
        expected = len(prompts) * args.samples_per_prompt
        redo = holds_samples(outdir)  # an interrupted run (or other counts) of this script: sample it again
        if redo:
            have = sum((outdir / SAMPLES_DIR / f"{stem}.png").is_file() for stem in read_record(outdir) or {})
            print(f"{task.name}: {have} of {expected} images (interrupted run or other settings), sampling again")
        pipe = load_pipeline(args.ckpt, torch_dtype=torch_dtype_from_name(args.sample_dtype), device=device)
        pipe.set_progress_bar_config(disable=True)
        paths = sample_to_folder(pipe, root / task.name, prompts=prompts, outdir=outdir,
                                 num_images=args.samples_per_prompt, batch_size=args.sample_batch_size,
                                 seed=args.sample_seed, num_inference_steps=args.num_inference_steps,
                                 guidance_scale=args.guidance_scale, eta=args.eta, height=args.height,
                                 width=args.width, skip_grid=True, overwrite=redo)
        print(f"{task.name}: {len(paths)} images")


def main(argv: Sequence[str] | None = None) -> dict:
    return eval_protocol.main(argv, add_generate_args=add_generate_args, generate=generate)
