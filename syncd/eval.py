"""SynCD's DreamBench protocol (§5) through common/eval: CLIP-T (prompt without the subject token), CLIP-I,
DINO (and DINOv2 with --metrics ... dinov2) per subject, averaged; plus MDINO - DINO on background-masked
images (object masks of both the generated and the reference images), when masks are given:
<sample_root>/<subject>/masks/<image name> and <benchmark>/dataset/<subject>/masks/<reference stem>.png|jpg.

Sample layout = what scripts/sample_syncd.py writes with --ref_images <benchmark>/dataset/<subject>:
<sample_root>/<subject>/*.png + prompts.json. Paper rows: the spec did not retrieve the paper's numbers, so
none are printed (fill PAPER_ROWS from arXiv 2502.01720 Tables 1/2 to print them beside ours)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from common.cli import parse_args
from common.eval.datasets import DREAMBENCH_TOKEN, load_dreambench
from common.eval.runners import build_backbones, eval_parser, evaluate, find_task_folders
from common.eval.scoring import read_generated
from common.eval.similarity import pairwise_mean
from common.io import atomic_write_json

#: (method, CLIP-T, CLIP-I, DINO) rows of the paper (arXiv 2502.01720 Tables 1/2: 1-ref and 3-ref, FLUX and SDXL,
#: baselines). Still empty: the stored copies of the paper reachable here (arxiv.org/html/2502.01720v2,
#: ar5iv.labs.arxiv.org/html/2502.01720, hf-mirror.xnestle.com/papers/2502.01720.md) only gave their opening
#: pages (abstract, introduction), never the tables; no number is entered that was not read from the paper.
PAPER_ROWS: list[tuple[str, float, float, float]] = []


def _mask_for(folder: Path, stem: str) -> Path | None:
    for ext in (".png", ".jpg", ".jpeg"):
        p = folder / "masks" / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def masked(img_path: Path, mask_path: Path) -> Image.Image:
    """The image with its background (mask == 0) set to black."""
    img = Image.open(img_path).convert("RGB")
    m = np.asarray(Image.open(mask_path).convert("L").resize(img.size, Image.NEAREST)) > 0
    return Image.fromarray(np.asarray(img) * m[..., None].astype(np.uint8))


def mdino(args, bench, backbones) -> dict[str, float] | None:
    """Mean MDINO over subjects having masks for their generated and reference images (None: no masks)."""
    dino = backbones.dino or backbones.dinov2
    if dino is None:
        return None
    per = {}
    for task, folder in find_task_folders(bench, Path(args.sample_root), args.concepts):
        gen = read_generated(folder)
        gm = [_mask_for(folder, p.stem) for p in gen.paths]
        refs = task.concepts[0].references
        rm = [_mask_for(Path(r).parent, Path(r).stem) for r in refs]
        if not all(gm) or not all(rm):
            continue
        g = dino.encode_images([masked(p, m) for p, m in zip(gen.paths, gm)])
        r = dino.encode_images([masked(Path(p), m) for p, m in zip(refs, rm)])
        per[task.name] = float(pairwise_mean(g, r).mean())
    return per or None


def build_parser():
    p = eval_parser("eval_syncd.py", "SynCD on DreamBench: CLIP-T, CLIP-I, DINO (+ MDINO with masks).")
    p.add_argument("--token", default=DREAMBENCH_TOKEN, help="subject token in the prompts (dropped for CLIP-T)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(build_parser(), argv)
    bench = load_dreambench(args.benchmark_root, token=args.token)
    drop = lambda prompt: " ".join(w for w in prompt.split() if w != args.token)
    result = evaluate(args, bench, table="syncd_dreambench", title="SynCD on DreamBench", label="ours",
                      clip_text=drop, paper_rows=PAPER_ROWS or None,
                      notes=["CLIP-T = 2.5 * max(cos, 0) on the prompt without the subject token",
                             "paper rows: not retrieved (spec §5); fill syncd/eval.py PAPER_ROWS"])
    with torch.no_grad():
        per = mdino(args, bench, build_backbones(args))
    if per is not None:
        result["mdino"] = {"mean": sum(per.values()) / len(per), "per_task": per}
        print(f"MDINO (background-masked DINO): {result['mdino']['mean']:.4f} over {len(per)} subjects")
        out = Path(args.output) if args.output else Path(args.sample_root) / "eval"
        atomic_write_json(out / "scores.json", result)
    else:
        print("MDINO: skipped (no masks/ for the generated and reference images)")
    return result
