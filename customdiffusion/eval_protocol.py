"""Custom Diffusion's CustomConcept101 protocol and the paper's numbers (the generic scoring lives in
common.eval): CLIP-T = ViT-B/32 CLIPScore with the modifier tokens removed from the prompt, CLIP-I and DINO
the mean of all generated x reference pairs, per concept then averaged; optional KID for language drift.

Before scoring, every sample folder must have its images and prompts.json in step (an interrupted sampling
run is refused, never scored with mislabelled images).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from common.cli import ArgumentParser, parse_args
from common.errors import UsageError
from common.eval.datasets import Benchmark, load_customconcept101, strip_tokens
from common.eval.runners import eval_parser, evaluate, find_task_folders, kid_main
from common.io import atomic_write_json
from customdiffusion.outputs import check_in_step

# (method, CLIP-T, CLIP-I, DINO): customconcept101 README, 200 DDPM steps and [50 steps] (spec §4.2).
PAPER_TABLES: dict[str, list[tuple[str, float, float, float]]] = {
    "customdiffusion-single-200": [
        ("Textual Inversion", 0.6126, 0.7524, 0.5111),
        ("DreamBooth", 0.7522, 0.7520, 0.5533),
        ("Custom Diffusion", 0.7602, 0.7440, 0.5311),
    ],
    "customdiffusion-single-50": [
        ("Textual Inversion", 0.6117, 0.7530, 0.5128),
        ("DreamBooth", 0.7514, 0.7521, 0.5541),
        ("Custom Diffusion", 0.7583, 0.7456, 0.5335),
    ],
    "customdiffusion-multi-200": [
        ("DreamBooth", 0.7383, 0.6625, 0.3816),
        ("Custom Diffusion (Opt)", 0.7627, 0.6577, 0.3650),
        ("Custom Diffusion (Joint)", 0.7567, 0.6680, 0.3760),
    ],
    "customdiffusion-multi-50": [
        ("DreamBooth", 0.7366, 0.6636, 0.3849),
        ("Custom Diffusion (Opt)", 0.7599, 0.6595, 0.3684),
        ("Custom Diffusion (Joint)", 0.7534, 0.6704, 0.3799),
    ],
}

#: A sampler for `--generate`: (args, benchmark) -> None, writing <sample_root>/<task>/ + prompts.json.
GenerateFn = Callable[[argparse.Namespace, Benchmark], None]


def build_parser(add_generate_args: Callable[[ArgumentParser], None] | None = None) -> ArgumentParser:
    p = eval_parser("eval_customdiffusion.py", __doc__.split("\n\n")[0])
    if add_generate_args is not None:
        add_generate_args(p)
    p.add_argument("--multi", action="store_true", help="multi-concept: use dataset_multiconcept.json pairs")
    p.add_argument("--paper_steps", type=int, default=200, choices=(200, 50),
                   help="which DDPM-step column of the paper's table to show beside ours")
    p.add_argument("--kid_real_dir", default=None,
                   help="real images (e.g. 500 held-out LAION images of the class) for KID; needs --kid_gen_dir")
    p.add_argument("--kid_gen_dir", default=None, help="images generated from the plain class prompts, for KID")
    p.add_argument("--inception", default=None,
                   help="clean-fid inception-2015-12-05.pt for KID (default: torchvision inception_v3 weights)")
    return p


def check_sample_folders(args: argparse.Namespace, bench: Benchmark) -> None:
    """Every folder to be scored has exactly one prompts.json record per image (customdiffusion.outputs)."""
    for _, folder in find_task_folders(bench, Path(args.sample_root), args.concepts):
        check_in_step(folder)


def main(argv: Sequence[str] | None = None, *, add_generate_args: Callable[[ArgumentParser], None] | None = None,
         generate: GenerateFn | None = None) -> dict:
    """Score (and with `generate`, first sample) CustomConcept101 under this protocol; returns the summary."""
    args = parse_args(build_parser(add_generate_args), argv)
    if args.generate and generate is None:
        raise UsageError("--generate needs the Custom Diffusion sampler: run scripts/eval_customdiffusion.py")
    if bool(args.kid_real_dir) != bool(args.kid_gen_dir):
        raise UsageError("KID needs both --kid_real_dir and --kid_gen_dir")
    bench = load_customconcept101(args.benchmark_root, multi=args.multi)
    if args.generate:
        generate(args, bench)
    check_sample_folders(args, bench)
    kind = "multi" if args.multi else "single"
    kid_result = None
    if args.kid_real_dir:
        kid_argv = ["--real_dir", args.kid_real_dir, "--gen_dir", args.kid_gen_dir, "--seed", str(args.seed)]
        kid_argv += (["--inception", args.inception] if args.inception else [])
        kid_argv += (["--device", args.device] if args.device else [])
        kid_argv += (["--tiny_backbones"] if args.tiny_backbones else [])
        kid_result = kid_main(kid_argv)
    table = f"customdiffusion-{kind}-{args.paper_steps}"
    result = evaluate(
        args, bench, table=table, paper_rows=PAPER_TABLES[table],
        title=f"CustomConcept101 {kind}-concept (Custom Diffusion protocol, paper at {args.paper_steps} steps)",
        label="Custom Diffusion", clip_text=strip_tokens,
        notes=["CLIP-T = 2.5 * max(cos, 0) with modifier tokens (<new1>, ...) removed from the prompt",
               "CLIP-I / DINO: mean of the generated x reference cosine matrix"
               + (", averaged over both concepts" if args.multi else "")],
    )
    if kid_result is not None:
        result["kid"] = kid_result
        out = Path(args.output) if args.output else Path(args.sample_root) / "eval"
        atomic_write_json(out / "scores.json", result)
    return result
