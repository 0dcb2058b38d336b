"""MIP-Adapter's Concept101 protocol and Table 1 (the generic scoring lives in common.eval): per combination
CLIP-T (ViT-B/32 CLIPScore on the prompts.json text: `<prompt>_gen` cut at its first '.', plus '.'), CLIP-I
and DINO averaged 0.5/0.5 over the two concepts' uncropped references, then the plain mean over the 101
combinations."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from common.cli import ArgumentParser, parse_args
from common.errors import UsageError
from common.eval.datasets import Benchmark, load_customconcept101
from common.eval.runners import eval_parser, evaluate

TABLE = "mipadapter-table1"
# (method, CLIP-T, CLIP-I, DINO): the paper's / README's Table 1 on Concept101 (spec §4.3).
PAPER_TABLES: dict[str, list[tuple[str, float, float, float]]] = {
    TABLE: [
        ("DreamBooth", 0.7383, 0.6636, 0.3849),
        ("Custom Diffusion (Opt)", 0.7599, 0.6595, 0.3684),
        ("Custom Diffusion (Joint)", 0.7534, 0.6704, 0.3799),
        ("Mix-of-Show", 0.7280, 0.6700, 0.3940),
        ("MC^2", 0.7670, 0.6860, 0.4060),
        ("FastComposer", 0.7456, 0.6552, 0.3574),
        ("λ-ECLIPSE", 0.7275, 0.6902, 0.3902),
        ("ELITE", 0.6814, 0.6460, 0.3347),
        ("IP-Adapter", 0.6343, 0.6409, 0.3481),
        ("SSR-Encoder", 0.7363, 0.6895, 0.3970),
        ("MIP-Adapter (sdxl), small 10k data", 0.7694, 0.6967, 0.4108),
        ("MIP-Adapter (sdxl), original data", 0.7750, 0.6943, 0.4127),
        ("MIP-Adapter (sdxl_plus), small 10k data", 0.7752, 0.6924, 0.4375),
        ("MIP-Adapter (sdxl_plus), original data", 0.7765, 0.6950, 0.4397),
    ],
}

#: A sampler for `--generate`: (args, benchmark) -> None, writing <sample_root>/comb_<i>/ + prompts.json.
GenerateFn = Callable[[argparse.Namespace, Benchmark], None]


def build_parser(add_generate_args: Callable[[ArgumentParser], None] | None = None) -> ArgumentParser:
    p = eval_parser("eval_mipadapter.py", __doc__.split("\n\n")[0])
    if add_generate_args is not None:
        add_generate_args(p)
    return p


def main(argv: Sequence[str] | None = None, *, add_generate_args: Callable[[ArgumentParser], None] | None = None,
         generate: GenerateFn | None = None) -> dict:
    """Score (and with `generate`, first sample) Concept101 under this protocol; returns the summary."""
    args = parse_args(build_parser(add_generate_args), argv)
    if args.generate and generate is None:
        raise UsageError("--generate needs the MIP-Adapter sampler: run scripts/eval_mipadapter.py")
    bench = load_customconcept101(args.benchmark_root, multi=True)
    if args.generate:
        generate(args, bench)
    return evaluate(
        args, bench, table=TABLE, paper_rows=PAPER_TABLES[TABLE], title="Concept101 multi-concept (MIP-Adapter Table 1)",
        label="MIP-Adapter", clip_text=lambda s: s,
        notes=["CLIP-T text = the prompts.json entry as saved (MIP-Adapter's: the image file stem '<prompt>_gen' "
               "up to its first '.', plus '.')",
               "CLIP-I / DINO averaged 0.5/0.5 over the two concepts' uncropped references"],
    )
