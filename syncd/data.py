"""The SynCD dataset layout (§1.4, §2.3): `<root>/*metadata.json` (or `*metadata_with_scores.json` when
filtering), images `<root>/<file>`, masks `<root>/masks/<stem>.jpg` (> 0 = foreground); tuples of 2-3 views
of one object, target first. Items: a random mask-keeping square crop per image, resized, in [-1, 1]."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.errors import UsageError


def metadata_files(root: Path, filtered: bool) -> list[Path]:
    """Filtered: `*metadata_with_scores.json`; else `*metadata.json` and the generator's `metadata_{rank}.json`."""
    if filtered:
        return sorted(root.glob("*metadata_with_scores.json"))
    files = set(root.glob("*metadata.json")) | set(root.glob("metadata_[0-9]*.json"))
    return sorted(f for f in files if not f.name.endswith("with_scores.json"))


def valid_images(entry: dict[str, Any], filter_aesthetics: float, filter_dino: float) -> list[int]:
    """Image i is valid iff aesthetic_i >= filter_aesthetics and it belongs to a pair (i, j) with
    filter_dino <= dino_ij <= 0.98 (upper bound: near duplicates); filters <= -1 ... off."""
    names = entry["filenames"]
    n = len(names)
    ok = list(range(n))
    if filter_aesthetics > 0:
        scores = entry.get("aesthetics_scores", {})
        ok = [i for i in ok if scores.get(Path(names[i]).stem, -1e9) >= filter_aesthetics]
    if filter_dino > 0:
        d = entry.get("dino_scores")
        paired = set()
        for i in range(n):
            for j in range(i + 1, n):
                if filter_dino <= d[i][j] <= 0.98:
                    paired |= {i, j}
        ok = [i for i in ok if i in paired]
    return ok


def square_crop_with_mask(img: Image.Image, mask: Image.Image, rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """A random square crop (side = shortest side) that keeps the mask's bounding box when it can."""
    w, h = img.size
    s = min(w, h)
    m = np.asarray(mask.convert("L")) > 0
    ys, xs = np.nonzero(m)
    if w > h:
        lo, hi = (max(0, xs.max() + 1 - s), min(w - s, xs.min())) if xs.size else (0, w - s)
        x0 = rng.randint(min(lo, hi), max(lo, hi))
        box = (x0, 0, x0 + s, s)
    else:
        lo, hi = (max(0, ys.max() + 1 - s), min(h - s, ys.min())) if ys.size else (0, h - s)
        y0 = rng.randint(min(lo, hi), max(lo, hi))
        box = (0, y0, s, y0 + s)
    return img.crop(box), mask.crop(box)


def read_metadata(path: Path) -> list[dict[str, Any]]:
    """The tuples of one metadata file; a file that is not a list of {filenames, prompts} of equal length (as
    the generator writes) is a one-line UsageError, not a traceback mid-way."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); fix or remove it") from None
    if not isinstance(entries, list):
        raise UsageError(f"{path} must hold a list of tuples ({{\"filenames\": [...], \"prompts\": [...]}})")
    for k, entry in enumerate(entries):
        names = entry.get("filenames") if isinstance(entry, dict) else None
        prompts = entry.get("prompts") if isinstance(entry, dict) else None
        if not isinstance(names, list) or not isinstance(prompts, list):
            raise UsageError(f"{path}: tuple {k} needs lists \"filenames\" and \"prompts\"")
        if len(names) != len(prompts):
            raise UsageError(f"{path}: tuple {k} has {len(names)} filenames but {len(prompts)} prompts; "
                             "they must match one to one")
    return entries


def _image_size(path: Path) -> tuple[int, int]:
    """(W, H) of an image file; an unreadable one is a UsageError."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise UsageError(f"cannot read image {path}: {' '.join(str(e).split())}; replace or remove the file") from None


class SynCDDataset(Dataset):
    """Tuples from one or more SynCD folders. numref = -1: every valid image of a tuple; numref > 0: a tuple
    of numref + 1 (resampled with horizontal flips when short). drop rates: per sample one draw c;
    c < drop_both: empty prompt (+ image drop flag); < drop_both + drop_image: image drop flag only (unused by
    FLUX, as in the original); < drop_both + drop_image + drop_text: empty prompt."""

    def __init__(self, roots: Sequence[str], resolution: int = 512, numref: int = -1, filter_aesthetics: float = -1,
                 filter_dino: float = -1, drop_both: float = 0.05, drop_image: float = 0.05, drop_text: float = 0.05,
                 mask_ones_prob: float = 0.1):
        self.resolution, self.numref = resolution, numref
        self.drops = (drop_both, drop_image, drop_text)
        self.mask_ones_prob = mask_ones_prob
        self.items: list[tuple[Path, list[str], list[str]]] = []
        filtered = filter_aesthetics > 0 or filter_dino > 0
        for root in map(Path, roots):
            files = metadata_files(root, filtered)
            if not files:
                raise UsageError(f"{root} has no {'*metadata_with_scores.json' if filtered else '*metadata.json'}")
            for f in files:
                for entry in read_metadata(f):
                    keep = valid_images(entry, filter_aesthetics, filter_dino)
                    if len(keep) >= 2:
                        self.items.append((root, [entry["filenames"][i] for i in keep],
                                           [entry["prompts"][i] for i in keep]))
        if not self.items:
            raise UsageError("no SynCD tuple with >= 2 valid images in " + ", ".join(map(str, roots)))

    def __len__(self) -> int:
        return len(self.items)

    def check(self) -> None:
        """Every image exists and its mask (if any) has its size - before any model loads."""
        for root, names, _ in self.items:
            for name in names:
                if not (root / name).is_file():
                    raise UsageError(f"missing image {root / name}")
                mpath = root / "masks" / f"{Path(name).stem}.jpg"
                size = _image_size(root / name)
                if mpath.is_file():
                    msize = _image_size(mpath)
                    if size != msize:
                        raise UsageError(f"mask {mpath} is {msize[0]}x{msize[1]}, its image {size[0]}x{size[1]}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,))))  # seeded per item by the Trainer
        root, names, prompts = self.items[int(index)]
        order = list(range(len(names)))
        flips = [False] * len(order)
        if self.numref > 0:
            want = self.numref + 1
            while len(order) < want:
                order.append(rng.choice(order[:len(names)]))
                flips.append(True)
            order, flips = order[:want], flips[:want]
        images, masks = [], []
        r = self.resolution
        for i, flip in zip(order, flips):
            img = Image.open(root / names[i]).convert("RGB")
            mpath = root / "masks" / f"{Path(names[i]).stem}.jpg"
            mask = Image.open(mpath).convert("L") if mpath.is_file() else Image.new("L", img.size, 255)
            if mask.size != img.size:
                raise UsageError(f"mask {mpath} is {mask.size[0]}x{mask.size[1]}, its image {img.size[0]}x{img.size[1]}")
            img, mask = square_crop_with_mask(img, mask, rng)
            if flip:
                img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
            img = img.resize((r, r), Image.BICUBIC)
            mask = mask.resize((r // 8, r // 8), Image.NEAREST)
            images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
            masks.append(torch.from_numpy(np.asarray(mask) > 0))
        c = rng.random()
        both, image, text = self.drops
        drop_text = c < both or both + image <= c < both + image + text
        drop_image = c < both + image
        m = torch.stack(masks)
        if rng.random() < self.mask_ones_prob:
            m = torch.ones_like(m)
        return {"images": torch.stack(images), "masks": m, "prompt": "" if drop_text else prompts[order[0]],
                "drop_image": drop_image}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    n = {it["images"].shape[0] for it in items}
    if len(n) > 1:
        raise UsageError("tuples of different sizes in one batch: use --train_batch_size 1 or --numref")
    return {"images": torch.stack([it["images"] for it in items]), "masks": torch.stack([it["masks"] for it in items]),
            "prompts": [it["prompt"] for it in items], "drop_image": [it["drop_image"] for it in items]}
