"""Score one folder of generated images against one benchmark task (CLIP-T, CLIP-I, DINO, DINOv2, aesthetic).

Generated images of a task are encoded once per backbone (CLIP features serve both CLIP-T and CLIP-I);
reference features come from the on-disk cache. Multi-concept tasks average image alignment over their
concepts with equal weight (MIP-Adapter's 0.5/0.5).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.data import list_images
from common.errors import UsageError
from common.eval.aesthetic import aesthetic_from_features
from common.eval.cache import FeatureCache
from common.eval.clip import CLIPSCORE_W
from common.eval.datasets import Task
from common.eval.extractor import FeatureExtractor
from common.eval.similarity import paired_cosine, pairwise_mean

PROMPTS_FILE = "prompts.json"


@dataclass
class Generated:
    """The images of one task folder and the prompt each was generated from (same order)."""

    folder: Path
    paths: list[Path]
    prompts: list[str]


def read_generated(folder: str | Path, expected: int | None = None) -> Generated:
    """Images in `folder/samples/` (Custom Diffusion's layout) or `folder/`, prompts from `folder/prompts.json`
    ({image file name or stem: prompt}). A missing entry or a count other than `expected` is a UsageError."""
    folder = Path(folder)
    image_dir = folder / "samples" if (folder / "samples").is_dir() else folder
    paths = list_images(image_dir)
    pfile = folder / PROMPTS_FILE
    if not pfile.is_file():
        raise UsageError(f"{PROMPTS_FILE} not found in {folder}; it maps each image file name to its prompt")
    try:
        table = json.loads(pfile.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{pfile} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(table, dict):
        raise UsageError(f"{pfile} must be a JSON object {{image name: prompt}}")
    prompts = []
    for p in paths:
        text = table.get(p.name, table.get(p.stem))
        if not isinstance(text, str):
            raise UsageError(f"{pfile} has no prompt for {p.name}; add an entry \"{p.stem}\": \"<prompt>\"")
        prompts.append(text)
    if expected is not None and len(paths) != expected:
        raise UsageError(f"{image_dir} holds {len(paths)} images but {expected} were expected (--numgen); "
                         "generate the missing ones or fix --numgen")
    return Generated(folder, paths, prompts)


@dataclass
class Backbones:
    """Which backbones to score with; None skips that metric."""

    clip: FeatureExtractor | None = None
    dino: FeatureExtractor | None = None
    dinov2: FeatureExtractor | None = None
    aesthetic: tuple[nn.Module, FeatureExtractor] | None = None  # (MLP head, CLIP ViT-L/14)

    def image_backbones(self) -> dict[str, FeatureExtractor]:
        named = {"clip_i": self.clip, "dino": self.dino, "dinov2": self.dinov2}
        return {k: v for k, v in named.items() if v is not None}


@dataclass
class TaskScores:
    task: str
    n_images: int
    metrics: dict[str, float]
    per_image: list[dict] = field(default_factory=list)  # {"path", "prompt", metric: value}


def score_task(
    task: Task,
    generated: Generated,
    backbones: Backbones,
    cache: FeatureCache,
    *,
    clip_text: Callable[[str], str] = lambda s: s,
    progress: bool = False,
) -> TaskScores:
    """All selected metrics for one task. `clip_text` maps a generation prompt to the CLIP-T text (e.g. drops
    modifier tokens). Per-image values: clip_t [N] CLIPScore, clip_t_cos [N], image alignment [N] (mean over
    references, then over concepts)."""
    n = len(generated.paths)
    per_image: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}
    for metric, ext in backbones.image_backbones().items():
        gen = ext.encode_images(generated.paths, progress=progress, desc=f"{task.name} {metric}")
        if metric == "clip_i":
            texts = [clip_text(p) for p in generated.prompts]
            cos = paired_cosine(gen, ext.encode_texts(texts))
            per_image["clip_t"] = CLIPSCORE_W * cos.clamp(min=0)
            per_image["clip_t_cos"] = cos
        rows = []
        for k, concept in enumerate(task.concepts):
            refs = cache.encode(ext, concept.references, progress=progress)
            row = pairwise_mean(gen, refs)
            rows.append(row)
            if len(task.concepts) > 1:
                metrics[f"{metric}_{k}"] = float(row.mean())
        per_image[metric] = torch.stack(rows).mean(0)
    if backbones.aesthetic is not None:
        head, clip_l14 = backbones.aesthetic
        feats = clip_l14.encode_images(generated.paths, progress=progress, desc=f"{task.name} aesthetic")
        per_image["aesthetic"] = aesthetic_from_features(head, feats).double()
    for key, values in per_image.items():
        metrics[key] = float(values.mean())
    rows = [
        {"path": str(p), "prompt": generated.prompts[i], **{k: float(v[i]) for k, v in per_image.items()}}
        for i, p in enumerate(generated.paths)
    ]
    return TaskScores(task.name, n, metrics, rows)


def mean_over_tasks(scores: list[TaskScores], keys: list[str]) -> dict[str, float]:
    """Plain mean over tasks (concepts or combinations), as both protocols report."""
    return {k: sum(s.metrics[k] for s in scores) / len(scores) for k in keys if all(k in s.metrics for s in scores)}
