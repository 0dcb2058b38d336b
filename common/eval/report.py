"""Outputs of an evaluation: per-concept CSV, a Markdown table with the paper's rows beside ours, and a
contact sheet of the worst and best scored prompts."""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from common.data import load_rgb
from common.eval.scoring import TaskScores
from common.io import atomic_save_image, atomic_write_text

# (method, CLIP-T, CLIP-I, DINO). A method's protocol passes its own rows (`paper_rows`, e.g.
# customdiffusion.eval_protocol.PAPER_TABLES, mipadapter.eval_protocol.PAPER_TABLES); none are kept here.
PAPER_TABLES: dict[str, list[tuple[str, float, float, float]]] = {}
PAPER_COLUMNS = ("clip_t", "clip_i", "dino")
COLUMN_TITLES = {"clip_t": "CLIP-T", "clip_t_cos": "CLIP-T (cos)", "clip_i": "CLIP-I", "dino": "DINO",
                 "dinov2": "DINOv2", "aesthetic": "Aesthetic"}


def write_csv(path: str | Path, scores: list[TaskScores]) -> None:
    """One row per task: task, n_images, then every metric (per-concept parts included)."""
    keys = list(dict.fromkeys(k for s in scores for k in s.metrics))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["task", "n_images", *keys])
    for s in scores:
        writer.writerow([s.task, s.n_images, *(f"{s.metrics[k]:.6f}" if k in s.metrics else "" for k in keys)])
    atomic_write_text(path, buf.getvalue())


def summary_markdown(
    title: str, table: str, ours: dict[str, float], ours_label: str, *, notes: list[str] = (),
    paper_rows: Sequence[tuple[str, float, float, float]] | None = None,
) -> str:
    """The paper's rows (`paper_rows`, else PAPER_TABLES[table]) and ours in one Markdown table; extra metrics
    of ours get columns that the paper rows leave empty."""
    extra = [k for k in ours if k not in PAPER_COLUMNS and k in COLUMN_TITLES]
    cols = [*PAPER_COLUMNS, *extra]
    lines = [f"## {title}", "", "| Method | " + " | ".join(COLUMN_TITLES[c] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, *vals in (paper_rows if paper_rows is not None else PAPER_TABLES.get(table, [])):
        cells = [f"{v:.4f}" for v in vals] + [""] * len(extra)
        lines.append(f"| {name} (paper) | " + " | ".join(cells) + " |")
    lines.append(f"| **{ours_label} (ours)** | " + " | ".join(f"**{ours[c]:.4f}**" if c in ours else "–" for c in cols) + " |")
    lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def rank_prompts(scores: list[TaskScores], metric: str = "clip_t") -> list[tuple[float, str, str, list[str]]]:
    """(mean score, task, prompt, image paths) per distinct (task, prompt), lowest score first."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for s in scores:
        for row in s.per_image:
            if metric in row:
                groups[(s.task, row["prompt"])].append(row)
    ranked = [(sum(r[metric] for r in rows) / len(rows), task, prompt, [r["path"] for r in rows])
              for (task, prompt), rows in groups.items()]
    return sorted(ranked, key=lambda x: x[0])


def contact_sheet(
    ranked: list[tuple[float, str, str, list[str]]], k: int = 4, thumb: int = 160, metric: str = "clip_t"
) -> Image.Image:
    """Two rows of thumbnails: the k worst prompts (top) and the k best (bottom), first image of each, captioned
    with score, task and prompt."""
    worst, best = ranked[:k], ranked[-k:][::-1]
    cols = max(len(worst), 1)
    cap = 46
    sheet = Image.new("RGB", (cols * thumb, 2 * (thumb + cap) + 20), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), f"worst {metric} (top) / best {metric} (bottom)", fill="black")
    for r, group in enumerate((worst, best)):
        for c, (score, task, prompt, paths) in enumerate(group):
            x, y = c * thumb, 20 + r * (thumb + cap)
            img = load_rgb(paths[0])
            img.thumbnail((thumb, thumb))
            sheet.paste(img, (x + (thumb - img.width) // 2, y))
            text = f"{score:.3f} {task}\n{prompt[:26]}\n{prompt[26:52]}"
            draw.multiline_text((x + 2, y + thumb + 1), text, fill="black", spacing=1)
    return sheet


def save_contact_sheet(path: str | Path, scores: list[TaskScores], k: int = 4, metric: str = "clip_t") -> bool:
    """Write the contact sheet if any image has `metric`; returns whether one was written."""
    ranked = rank_prompts(scores, metric)
    if not ranked:
        return False
    atomic_save_image(contact_sheet(ranked, k, metric=metric), path)
    return True
