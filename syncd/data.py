"""The SynCD dataset layout (§1.4, §2.3): `<root>/*metadata.json` (or `*metadata_with_scores.json` when
filtering), images `<root>/<file>`, masks `<root>/masks/<stem>.jpg` (> 0 = foreground); tuples of 2-3 views
of one object, target first. Items: data/data.py's random square crop around the object (data/utils_.py
square_crop_with_mask), LANCZOS-resized, in [-1, 1]."""
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


def mask_bbox(mask: Image.Image) -> tuple[int, int, int, int] | None:
    """data/utils_.py mask_to_bbox: (x0, y0, x1, y1), max exclusive, of the foreground (> 0); None when there
    is none or it is a single row or column."""
    m = np.asarray(mask.convert("L")) > 0
    if not m.any():
        return None
    rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
    if cols[-1] <= cols[0] or rows[-1] <= rows[0]:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def square_crop_with_mask(img: Image.Image, mask: Image.Image, rng: random.Random, min_padding: int = 200
                          ) -> tuple[Image.Image, Image.Image]:
    """data/utils_.py square_crop_with_mask(random=True): corners drawn at random around the mask's box (top-left
    in [0, x0 - min_padding), bottom-right in [min(x1 + min_padding, W - 1), W); same for y), then the square
    of side 2 * (min(width, height) // 2) about their rounded centre. No foreground: the image as it is and an
    all-foreground mask (then `resize_center_crop` squares it)."""
    bbox = mask_bbox(mask)
    if bbox is None:
        return img, Image.new("L", img.size, 255)
    w, h = img.size
    ul0 = rng.randrange(0, max(1, bbox[0] - min_padding))
    ul1 = rng.randrange(0, max(1, bbox[1] - min_padding))
    lr0 = rng.randrange(min(bbox[2] + min_padding, w - 1), w)
    lr1 = rng.randrange(min(bbox[3] + min_padding, h - 1), h)
    cx, cy = np.round(np.array([ul0 + lr0, ul1 + lr1]) / 2).astype(int)  # numpy's round half to even
    s = min(lr0 - ul0, lr1 - ul1) // 2
    box = (int(cx) - s, int(cy) - s, int(cx) + s, int(cy) + s)
    return img.crop(box), mask.crop(box)


def resize_center_crop(img: Image.Image, size: int, resample=Image.LANCZOS) -> Image.Image:
    """torchvision Resize(size, LANCZOS) (shorter side to size, longer int(size * long / short)) + CenterCrop(size)
    (offsets int(round((L - size) / 2)))."""
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def latent_mask(mask: Image.Image, size: int, kernel_size: int = 5) -> torch.Tensor:
    """data.py transform_mask + dilate_mask: the binarised (> 0) mask LANCZOS-resized to the latent size as
    floats in [0, 1], then dilated by a kernel_size x kernel_size box (conv with ones, clamped to [0, 1];
    kernel_size <= 1: no dilation) -> bool [size, size], visible where > 0 (as the original's attention mask)."""
    binary = mask.convert("L").point(lambda v: 255 if v > 0 else 0)
    m = torch.from_numpy(np.asarray(resize_center_crop(binary, size), dtype=np.float32) / 255.0)[None, None]
    if kernel_size > 1:
        kernel = torch.ones(1, 1, kernel_size, kernel_size)
        m = torch.nn.functional.conv2d(m, kernel, padding="same").clamp(0, 1)
    return m[0, 0] > 0


def to_model_range(img: Image.Image) -> torch.Tensor:
    """ToTensor + Normalize((0.5,) * 3, (0.5,) * 3), in that operation order: [3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float().div(255)
    return x.sub(0.5).div(0.5)


def select_images(n_images: int, want: int | None, rng: random.Random) -> list[tuple[int, bool]]:
    """(image index, flipped) per slot, target first. want None (numref -1): every image in order; enough
    images: `want` distinct ones at random (the target too); too few: drawn without replacement from the
    images and their horizontal flips (repeated past twice the images, where the original fails)."""
    if want is None:
        return [(i, False) for i in range(n_images)]
    if n_images >= want:
        return [(i, False) for i in rng.sample(range(n_images), want)]
    pool = [(i, False) for i in range(n_images)] + [(i, True) for i in range(n_images)]
    return rng.sample(pool * -(-want // len(pool)), want)


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
    """Tuples from one or more SynCD folders. numref = -1: every valid image of a tuple, in order (the first is
    the target); numref > 0: numref + 1 images drawn at random (with horizontal flips when short; see
    `select_images`). Each image: the original's jittered square crop around its mask, LANCZOS to the
    resolution, [-1, 1]. drop rates: per sample one draw c;
    c < drop_both: empty prompt (+ image drop flag); < drop_both + drop_image: image drop flag only (unused by
    FLUX, as in the original); < drop_both + drop_image + drop_text: empty prompt."""

    def __init__(self, roots: Sequence[str], resolution: int = 512, numref: int = -1, filter_aesthetics: float = -1,
                 filter_dino: float = -1, drop_both: float = 0.05, drop_image: float = 0.05, drop_text: float = 0.05,
                 mask_ones_prob: float = 0.1, mask_kernel_size: int = 5):
        self.resolution, self.numref = resolution, numref
        self.mask_kernel_size = mask_kernel_size  # the original's dilate_mask with kernel_size 5 (both configs)
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
        picks = select_images(len(names), self.numref + 1 if self.numref > 0 else None, rng)
        order = [i for i, _ in picks]
        images, masks = [], []
        r = self.resolution
        for i, flip in picks:
            img = Image.open(root / names[i]).convert("RGB")
            mpath = root / "masks" / f"{Path(names[i]).stem}.jpg"
            mask = Image.open(mpath).convert("L") if mpath.is_file() else Image.new("L", img.size, 255)
            if mask.size != img.size:
                raise UsageError(f"mask {mpath} is {mask.size[0]}x{mask.size[1]}, its image {img.size[0]}x{img.size[1]}")
            if flip:  # the original flips before cropping
                img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
            img, mask = square_crop_with_mask(img, mask, rng)
            img = resize_center_crop(img, r)
            images.append(to_model_range(img))
            masks.append(latent_mask(mask, r // 8, self.mask_kernel_size))
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
