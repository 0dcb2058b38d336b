"""Helpers of the MuDI tests: a synthetic multi-subject dataset (solid-colour subjects with exact masks)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"a": (255, 0, 0), "b": (0, 0, 255), "c": (0, 255, 0), "d": (255, 255, 0), "e": (0, 255, 255)}
PHRASES = {"a": "olis red toy", "b": "hta blue toy", "c": "ult green toy", "d": "amg yellow toy", "e": "lun cyan toy"}


def write_subject(folder: Path, name: str, colour, size=(96, 128), box=(20, 30, 70, 110), ellipse=False,
                  background=(40, 140, 60)) -> None:
    """Image `name`.png: a `colour` rectangle (or ellipse) in `box` (x0, y0, x1, y1) on `background`; exact mask."""
    from PIL import ImageDraw

    w, h = size
    img = Image.new("RGB", (w, h), background)
    mask = Image.new("L", (w, h), 0)
    for canvas, fill in ((img, colour), (mask, 255)):
        draw = ImageDraw.Draw(canvas)
        (draw.ellipse if ellipse else draw.rectangle)([box[0], box[1], box[2] - 1, box[3] - 1], fill=fill)
    img.save(folder / f"{name}.png")
    mask.save(folder / f"mask_{name}.png")


def make_dataset(folder: Path, ids=("a", "b"), per_id: int = 2, *, extra_lines=(), class_names=False,
                 filename="metadata.jsonl", **subject_kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    id_map = {k: (PHRASES[k].split(" ", 1)[1] if class_names else PHRASES[k]) for k in ids}
    lines = [json.dumps({"id": id_map})]
    for k in ids:
        for i in range(per_id):
            name = f"{k}{i:02d}"
            write_subject(folder, name, COLOURS[k], ellipse=bool(i % 2), **subject_kw)
            lines.append(json.dumps({"id": k, "file_name": f"{name}.png", "mask_path": f"mask_{name}.png",
                                     "text": f"A photo of a {id_map[k]} number {i}"}))
    lines += list(extra_lines)
    (folder / filename).write_text("\n".join(lines) + "\n")
    return folder


def solid(colour, h, w):
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()
