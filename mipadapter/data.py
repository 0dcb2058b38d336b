"""MIP-Adapter's training data (spec §1.6): SA-1B-derived samples with two labelled objects each.

Layout: `images/<id>.png`, `masks/<id>.png` (indexed instance map), `jsons/<id>.json` with `text` (caption),
`original_size` (w, h) and `final_masks` [{label, logit, box=[x1, y1, x2, y2], value}]; the ids come from a
list file (`configs/selected_indexes_sam_10k.pkl`, read without executing code; .txt / .json also work) or,
without one, from jsons/. Selection, crop and reference construction follow data/subject_dataset.py step by
step (float boxes, the square crop around *all* json boxes, bilinear resizes, the rectangle masks re-measured
at the training resolution, fill_cavity, white padding, flip / Resize(224) / RandomCrop; crop_top_left in the
source image's pixels). Unlike the original, errors (a missing file, a broken json) are raised, not swallowed
into an endless resampling loop; only a sample without two valid objects is resampled, a bounded number of times.
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
import torch.nn.functional as F
from PIL import Image

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
    """Area ratio in AREA_RANGE and w/h in ASPECT_RANGE on the json's float box; size = (w, h) of the image."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        return False
    area = w * h / size[0] / size[1]
    return AREA_RANGE[0] < area < AREA_RANGE[1] and ASPECT_RANGE[0] < w / h < ASPECT_RANGE[1]


def valid_box(mask: np.ndarray, box: Sequence[float]) -> bool:
    """is_valid_bbox: 2-5 distinct mask values inside the box (float box truncated to int for the slice); the
    largest count covers >= 0.6 of the float box area; the main segment -- the largest value after the lowest
    one (the background) -- is not larger than the box over the whole mask. mask: [H, W] instance ids."""
    x1, y1, x2, y2 = box
    inside = mask[int(y1):int(y2), int(x1):int(x2)]
    values, counts = np.unique(inside, return_counts=True)
    if not MASK_VALUES[0] <= len(values) <= MASK_VALUES[1]:
        return False
    area = (x2 - x1) * (y2 - y1)
    if counts.max() / area < MAIN_MASK_COVER:
        return False
    main = values[counts[1:].argmax() + 1]
    return not (mask == main).sum() > area


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """is_contained's ratio: intersection / min(area) when they intersect, else 0."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return w * h / min(area(a), area(b))


def _boxes(meta: dict) -> list[dict]:
    return [c for c in meta.get("final_masks", []) if "box" in c]


def select_entities(meta: dict, mask: np.ndarray) -> list[dict]:
    """Candidate objects in logit order that pass every filter of steps 1-3 (each {label, box, logit}; the box
    as the json's floats)."""
    caption = meta["text"]
    h, w = mask.shape
    chosen: list[dict] = []
    for cand in sorted(_boxes(meta), key=lambda c: -float(c["logit"])):
        label = str(cand["label"])
        box = tuple(float(v) for v in cand["box"])
        if not float(cand["logit"]) > MIN_LOGIT or " " in label or label not in caption:
            continue
        if not _box_ok(box, (w, h)) or not valid_box(mask, box):
            continue
        if any(_overlap(c["box"], box) > MAX_OVERLAP for c in chosen):
            continue
        chosen.append({"label": label, "box": box, "logit": float(cand["logit"])})
    return chosen


def square_crop(size: tuple[int, int], boxes: Sequence[Sequence[float]], rng: random.Random
                ) -> tuple[int, int, int] | None:
    """(top, left, side): a random square of side min(w, h) holding every box (the union's float extremes
    truncated to int; left drawn first), or None when there is none."""
    w, h = size
    side = min(w, h)
    min_x, min_y = int(min(b[0] for b in boxes)), int(min(b[1] for b in boxes))
    max_x, max_y = int(max(b[2] for b in boxes)), int(max(b[3] for b in boxes))
    lo_x, hi_x = max(0, max_x - side), min(min_x, w - side)
    lo_y, hi_y = max(0, max_y - side), min(min_y, h - side)
    if lo_x <= hi_x and lo_y <= hi_y:
        left = rng.randint(lo_x, hi_x)
        return rng.randint(lo_y, hi_y), left, side
    return None


def _resize_short(img: Image.Image, size: int, resample: int) -> Image.Image:
    """torchvision Resize(int) on a PIL image: shorter side to `size`, the longer one truncated."""
    w, h = img.size
    out = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img if out == img.size else img.resize(out, resample)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision CenterCrop(size) (offsets rounded)."""
    top, left = int(round((img.height - size) / 2.0)), int(round((img.width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision ToTensor of an RGB image: [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)


def fill_cavity(segment: np.ndarray) -> np.ndarray:
    """subject_dataset.fill_cavity ("fast but not accurate"): a pixel is kept when the segment has a pixel at or
    before it and one strictly after it along its row, and likewise along its column. bool [H, W]."""
    m = segment.astype(np.int64)
    row, col = m.cumsum(-1), m.cumsum(-2)
    return (row > 0) & (row < row[..., -1:]) & (col > 0) & (col < col[..., -1:, :])


def image_seg(box: Box, seg: np.ndarray) -> np.ndarray:
    """subject_dataset.image_seg: the most frequent id in seg[y1:y2, x1:x2] other than the lowest one (the only
    one when alone), holes filled by fill_cavity over the whole map. float [H, W] in {0, 1}."""
    x1, y1, x2, y2 = box
    values, counts = np.unique(seg[y1:y2, x1:x2], return_counts=True)
    if len(values) == 0:
        return np.zeros(seg.shape, np.float32)
    main = values[counts[1:].argmax() + 1] if len(values) > 1 else values[0]
    return fill_cavity(seg == main).astype(np.float32)


def reference_crop(image: torch.Tensor, segment: np.ndarray, box: Box, gen: torch.Generator) -> torch.Tensor:
    """get_entity_image: the crop's pixels on white outside the segment, cut to box (x2, y2 exclusive), padded
    with white by (long - short) // 2 on both short sides, then RandomHorizontalFlip, Resize(224) (bilinear, no
    antialias, as torchvision 0.14 on tensors) and RandomCrop(224). image: [3, R, R] in [0, 1]; returns
    [3, 224, 224] in [0, 1] (CLIP normalisation is clip_normalise's)."""
    x1, y1, x2, y2 = box
    seg = torch.from_numpy(segment)
    out = (image * seg + 1 - seg)[:, y1:y2, x1:x2]
    h, w = y2 - y1, x2 - x1
    if h < w:
        pad = (w - h) // 2
        out = F.pad(out, (0, 0, pad, pad), value=1.0)
    elif h > w:
        pad = (h - w) // 2
        out = F.pad(out, (pad, pad, 0, 0), value=1.0)
    if torch.rand(1, generator=gen) < 0.5:
        out = out.flip(-1)
    h, w = out.shape[-2:]
    size = (REF_SIZE, int(REF_SIZE * w / h)) if h <= w else (int(REF_SIZE * h / w), REF_SIZE)
    if size != (h, w):
        out = F.interpolate(out[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]
    h, w = out.shape[-2:]
    if (h, w) != (REF_SIZE, REF_SIZE):
        i = int(torch.randint(0, h - REF_SIZE + 1, (1,), generator=gen))
        j = int(torch.randint(0, w - REF_SIZE + 1, (1,), generator=gen))
        out = out[:, i:i + REF_SIZE, j:j + REF_SIZE]
    return out


def clip_normalise(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """[3, 224, 224] with CLIP mean/std (what the original's dataset hands the image encoder); a tensor is taken
    as [3, H, W] in [0, 1]."""
    t = image if isinstance(image, torch.Tensor) else _to_tensor(image.convert("RGB"))
    return (t - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


@dataclass
class Sample:
    """One training sample before tensors: the R x R crop, references [3, 224, 224] in [0, 1], words, caption
    and the SDXL size conditions (original_size (h, w); crop_top_left in the source image's pixels, as the
    original passes them)."""

    image: Image.Image
    references: list[torch.Tensor]
    words: list[str]
    caption: str
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def _box_mask(size: tuple[int, int], box: Sequence[float]) -> Image.Image:
    """The original's cv2.fillConvexPoly rectangle (int32 corners, both ends inclusive) as an L image."""
    w, h = size
    x1, y1, x2, y2 = (int(v) for v in box)
    m = np.zeros((h, w), np.uint8)
    m[max(y1, 0):max(y2 + 1, 0), max(x1, 0):max(x2 + 1, 0)] = 1
    return Image.fromarray(m)


def build_sample(image: Image.Image, mask: np.ndarray, meta: dict, resolution: int, rng: random.Random
                 ) -> Sample | None:
    """Steps 1-6 for one sample as data/subject_dataset.py does them; None when it does not give two objects
    with different labels."""
    if mask.shape != (image.height, image.width):
        raise UsageError(f"mask size {mask.shape[::-1]} differs from image size {image.size}")
    entities = select_entities(meta, mask)
    if len(entities) < NUM_OBJECTS:
        return None
    w, h = image.size
    res = resolution
    seg = Image.fromarray(mask)
    rects = [_box_mask(image.size, e["box"]) for e in entities]
    crop = square_crop(image.size, [tuple(float(v) for v in c["box"]) for c in _boxes(meta)], rng)
    if crop is not None:
        top, left, side = crop
        area = (left, top, left + side, top + side)
        img = _resize_short(image.crop(area), res, Image.BILINEAR)
        seg = _resize_short(seg.crop(area), res, Image.NEAREST)
        rects = [_resize_short(r.crop(area), res, Image.NEAREST) for r in rects]
        corner = (top, left)
    else:  # Resize + CenterCrop; the original still reports ((h - R) // 2, (w - R) // 2)
        img = _center_crop(_resize_short(image, res, Image.BILINEAR), res)
        seg = _center_crop(_resize_short(seg, res, Image.NEAREST), res)
        rects = [_center_crop(_resize_short(r, res, Image.NEAREST), res) for r in rects]
        corner = ((h - res) // 2, (w - res) // 2)
    pixels, seg_ids = _to_tensor(img), np.asarray(seg)
    gen = torch.Generator().manual_seed(rng.randrange(2**63))
    refs, words = [], []
    for e, rect in zip(entities, rects):
        ys, xs = np.nonzero(np.asarray(rect))
        if len(ys) == 0:
            continue
        box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        bw, bh = box[2] - box[0], box[3] - box[1]
        if not (bh * bw > MIN_CROPPED_AREA and bw > 0 and ASPECT_RANGE[0] < bh / bw < ASPECT_RANGE[1]):
            continue
        refs.append(reference_crop(pixels, image_seg(box, seg_ids), box, gen))
        words.append(e["label"])
        if len(refs) == NUM_OBJECTS:
            break
    if len(refs) < NUM_OBJECTS or words[0] == words[1]:
        return None
    ow, oh = meta.get("original_size", image.size)
    return Sample(img, refs, words, meta["text"], (int(oh), int(ow)), corner)


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
        pixels = (_to_tensor(sample.image) - 0.5) / 0.5  # ToTensor + Normalize([0.5], [0.5])
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
