"""MIP-Adapter's training data (spec §1.6): SA-1B-derived samples with two labelled objects each.

Layout: `images/<id>.png`, `masks/<id>.png` (indexed instance map), `jsons/<id>.json` with `text` (caption),
`original_size` (w, h) and `final_masks` [{label, logit, box=[x1, y1, x2, y2], value}]; the ids come from a
list file (`configs/selected_indexes_sam_10k.pkl`, read without executing code; .txt / .json also work) or,
without one, from jsons/. Entity selection follows data/subject_dataset.py's constants. Unlike the original,
errors (a missing file, a broken json) are raised, not swallowed into an endless resampling loop; only a sample
without two valid objects is resampled, a bounded number of times.
"""
from __future__ import annotations

import io
import json
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from common.data import load_rgb
from common.errors import UsageError

AREA_RANGE = (0.08, 0.7)
ASPECT_RANGE = (0.3, 3.0)
MIN_LOGIT = 0.3
MASK_VALUES = (2, 5)
MAIN_MASK_COVER = 0.6
MAX_OVERLAP = 0.8
MIN_CROPPED_AREA = 200
NUM_OBJECTS = 2
REF_SIZE = 224
MAX_RESAMPLES = 50
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Box = tuple[int, int, int, int]


class _NoCode(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise UsageError(f"the id list pickle refers to {module}.{name}; only plain lists of ids are read")


def read_ids(path: str | Path) -> list[str]:
    """A list of sample ids from .pkl (plain list only, no code runs), .json or .txt (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--data_pkl_file {path} not found")
    if path.suffix == ".pkl":
        ids = _NoCode(io.BytesIO(path.read_bytes())).load()
    elif path.suffix == ".json":
        ids = json.loads(path.read_text())
    else:
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not isinstance(ids, (list, tuple)) or not ids:
        raise UsageError(f"{path} holds no list of sample ids")
    return [str(i) for i in ids]


def _box_ok(box: Sequence[float], size: tuple[int, int]) -> bool:
    """Area ratio in AREA_RANGE and w/h in ASPECT_RANGE; size = (w, h)."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        return False
    area = w * h / (size[0] * size[1])
    return AREA_RANGE[0] < area < AREA_RANGE[1] and ASPECT_RANGE[0] < w / h < ASPECT_RANGE[1]


def valid_box(mask: np.ndarray, box: Box) -> bool:
    """is_valid_bbox: 2-5 distinct mask values inside the box; the largest covers >= 0.6 of it; that segment's
    full area is not larger than the box. mask: [H, W] instance ids."""
    x1, y1, x2, y2 = box
    inside = mask[y1:y2, x1:x2]
    values, counts = np.unique(inside, return_counts=True)
    if not MASK_VALUES[0] <= len(values) <= MASK_VALUES[1]:
        return False
    main = values[counts.argmax()]
    box_area = inside.size
    return counts.max() >= MAIN_MASK_COVER * box_area and (mask == main).sum() <= box_area


def _overlap(a: Box, b: Box) -> float:
    """intersection / min(area)."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return w * h / max(1, min(area(a), area(b)))


def select_entities(meta: dict, mask: np.ndarray) -> list[dict]:
    """Candidate objects in logit order that pass every filter of steps 1-3 (each {label, box, logit})."""
    caption = meta["text"]
    h, w = mask.shape
    chosen: list[dict] = []
    for cand in sorted(meta.get("final_masks", []), key=lambda c: -float(c["logit"])):
        label = str(cand["label"]).strip()
        box = tuple(int(round(v)) for v in cand["box"])
        if float(cand["logit"]) <= MIN_LOGIT or " " in label or not label or label not in caption:
            continue
        if not _box_ok(box, (w, h)) or not valid_box(mask, box):
            continue
        if any(_overlap(box, c["box"]) > MAX_OVERLAP for c in chosen):
            continue
        chosen.append({"label": label, "box": box, "logit": float(cand["logit"])})
    return chosen


def square_crop(size: tuple[int, int], boxes: Sequence[Box], rng: random.Random) -> tuple[int, int, int]:
    """(top, left, side): a random square of side min(w, h) holding every box, else the centre square."""
    w, h = size
    side = min(w, h)
    lo_x, hi_x = max(0, max(b[2] for b in boxes) - side), min(w - side, min(b[0] for b in boxes))
    lo_y, hi_y = max(0, max(b[3] for b in boxes) - side), min(h - side, min(b[1] for b in boxes))
    if lo_x <= hi_x and lo_y <= hi_y:
        return rng.randint(lo_y, hi_y), rng.randint(lo_x, hi_x), side
    return (h - side) // 2, (w - side) // 2, side


def reference_crop(image: Image.Image, mask: np.ndarray, box: Box, rng: random.Random) -> Image.Image:
    """The object's largest segment in its box (holes filled) on white, cropped to the box, padded square with
    white, randomly flipped, REF_SIZE x REF_SIZE."""
    x1, y1, x2, y2 = box
    inside = mask[y1:y2, x1:x2]
    values, counts = np.unique(inside, return_counts=True)
    segment = ndimage.binary_fill_holes(inside == values[counts.argmax()])
    pixels = np.asarray(image)[y1:y2, x1:x2].copy()
    pixels[~segment] = 255
    h, w = segment.shape
    side = max(h, w)
    canvas = np.full((side, side, 3), 255, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = pixels
    out = Image.fromarray(canvas)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out.resize((REF_SIZE, REF_SIZE), Image.BICUBIC)


def clip_normalise(image: Image.Image) -> torch.Tensor:
    """[3, 224, 224] with CLIP mean/std (what the original's dataset hands the image encoder)."""
    t = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    return (t - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


@dataclass
class Sample:
    """One training sample before tensors: cropped image, references, words, caption and SDXL size conditions."""

    image: Image.Image
    references: list[Image.Image]
    words: list[str]
    caption: str
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def build_sample(image: Image.Image, mask: np.ndarray, meta: dict, resolution: int, rng: random.Random
                 ) -> Sample | None:
    """Steps 1-6 for one sample; None when it does not give exactly two objects with different labels."""
    if mask.shape != (image.height, image.width):
        raise UsageError(f"mask size {mask.shape[::-1]} differs from image size {image.size}")
    entities = select_entities(meta, mask)
    if len(entities) < NUM_OBJECTS:
        return None
    top, left, side = square_crop(image.size, [e["box"] for e in entities], rng)
    kept = []
    for e in entities:
        x1, y1, x2, y2 = e["box"]
        cx1, cy1 = max(x1 - left, 0), max(y1 - top, 0)
        cx2, cy2 = min(x2 - left, side), min(y2 - top, side)
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        if (cx2 - cx1) * (cy2 - cy1) <= MIN_CROPPED_AREA or not ASPECT_RANGE[0] < (cx2 - cx1) / (cy2 - cy1) < ASPECT_RANGE[1]:
            continue
        kept.append(e)
        if len(kept) == NUM_OBJECTS:
            break
    if len(kept) != NUM_OBJECTS or kept[0]["label"] == kept[1]["label"]:
        return None
    refs = [reference_crop(image, mask, e["box"], rng) for e in kept]
    crop = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    ow, oh = meta.get("original_size", image.size)
    return Sample(crop, refs, [e["label"] for e in kept], meta["text"], (int(oh), int(ow)),
                  (int(top * resolution / side), int(left * resolution / side)))


class SubjectDataset(torch.utils.data.Dataset):
    """Items: pixel_values [3, R, R] in [-1, 1], ref_pixels [2, 3, 224, 224] CLIP-normalised, words (2), caption,
    original_size (h, w), crop_top_left, and a drop draw in [0, 1) for the CFG dropout."""

    def __init__(self, data_root: str | Path, ids: Sequence[str] | None = None, resolution: int = 512):
        self.root = Path(data_root)
        for sub in ("images", "masks", "jsons"):
            if not (self.root / sub).is_dir():
                raise UsageError(f"--data_root {self.root} has no {sub}/ folder (expected images/, masks/, jsons/)")
        self.ids = list(ids) if ids else sorted(p.stem for p in (self.root / "jsons").glob("*.json"))
        if not self.ids:
            raise UsageError(f"no samples in {self.root / 'jsons'}")
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, sample_id: str) -> tuple[Image.Image, np.ndarray, dict]:
        path = self.root / "jsons" / f"{sample_id}.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"cannot read {path}: {err}") from None
        image = load_rgb(self.root / "images" / f"{sample_id}.png")
        try:
            with Image.open(self.root / "masks" / f"{sample_id}.png") as m:
                mask = np.asarray(m)
        except OSError as err:
            raise UsageError(f"cannot read mask of {sample_id}: {err}") from None
        return image, (mask if mask.ndim == 2 else mask[..., 0]), meta

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = random.Random(int(torch.randint(0, 2**31, ())))
        for attempt in range(MAX_RESAMPLES):
            i = index if attempt == 0 else rng.randrange(len(self.ids))
            sample = build_sample(*self.load(self.ids[i]), self.resolution, rng)
            if sample is not None:
                break
        else:
            raise UsageError(f"no sample with two valid objects after {MAX_RESAMPLES} tries; check --data_root")
        pixels = torch.from_numpy(np.asarray(sample.image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        return {"pixel_values": pixels, "ref_pixels": torch.stack([clip_normalise(r) for r in sample.references]),
                "words": sample.words, "caption": sample.caption, "original_size": sample.original_size,
                "crop_top_left": sample.crop_top_left, "drop": float(torch.rand(()))}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pixel_values": torch.stack([i["pixel_values"] for i in items]),
            "ref_pixels": torch.stack([i["ref_pixels"] for i in items]),
            "words": [i["words"] for i in items], "captions": [i["caption"] for i in items],
            "original_size": [i["original_size"] for i in items],
            "crop_top_left": [i["crop_top_left"] for i in items],
            "drop": torch.tensor([i["drop"] for i in items])}


def write_synthetic_sample(root: str | Path, sample_id: str, *, size: tuple[int, int] = (96, 80),
                           objects: Sequence[tuple[str, Box, float]] = (("cat", (8, 10, 40, 50), 0.9),
                                                                         ("dog", (50, 20, 90, 60), 0.8)),
                           caption: str = "a cat next to a dog", seed: int = 0) -> None:
    """A sample in the released layout: each object a filled rectangle segment (plus one small other segment
    inside its box, so the box holds 2-3 mask values). size = (w, h). For tests and smoke runs."""
    root = Path(root)
    for sub in ("images", "masks", "jsons"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    w, h = size
    rs = np.random.RandomState(seed)
    Image.fromarray(rs.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{sample_id}.png")
    mask = np.zeros((h, w), np.uint8)
    entries = []
    for k, (label, (x1, y1, x2, y2), logit) in enumerate(objects):
        value = 10 + 10 * k
        mask[y1 + 1:y2 - 1, x1 + 1:x2 - 1] = value
        mask[y1 + 2:y1 + 4, x1 + 2:x1 + 4] = value + 5  # a small other segment inside the box
        entries.append({"label": label, "logit": logit, "box": [x1, y1, x2, y2], "value": value})
    Image.fromarray(mask).save(root / "masks" / f"{sample_id}.png")
    (root / "jsons" / f"{sample_id}.json").write_text(json.dumps(
        {"text": caption, "original_size": [w, h], "final_masks": entries}))
