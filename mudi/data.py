"""MuDI's training data: DreamBooth items from `metadata.jsonl`, turned into Seg-Mix composites with
probability `segmix_prob` once training reaches `segmix_start_step` (spec §1.1).

The step reaches the item through the sampler: with `wants_step = True` the Trainer hands `__getitem__` a
`StepIndex(index, step)`, so the switch holds with dataloader workers > 0 and after an exact resume (the
original flips a flag on the main-process dataset, which forked workers never see). A plain int index uses
`self.step`, which `set_step` updates (single process, workers = 0).

Items: pixel_values [3, R, R] in [-1, 1], prompt, mask_map [1, R/8, R/8], id, segmix (bool: applied), and with
a class (prior) set: class_pixel_values, class_prompt, class_mask_map.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import RandomCrop

from common.data import load_rgb
from common.data.masks import load_mask
from common.errors import UsageError
from common.train.steps import split_step_index
from mudi.metadata import Metadata, Record
from mudi.segmix import (
    SegMixConfig,
    Subject,
    check_relative_scale,
    collage,
    collage_pair,
    crop_subject,
    loss_mask_map,
    max_factor,
    resize_subject,
    scale_factors,
    segmix_prompt,
)

LATENT_FACTOR = 8


def load_mask_u8(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as uint8 [H, W] (0..255, common.data.masks' reading of any mode); `size` (W, H) must match."""
    mask = (load_mask(path, soft=True).numpy() * 255).round().astype(np.uint8)
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        raise UsageError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is {size[0]}x{size[1]}; "
                         "masks must have the size of their image")
    return mask


def dreambooth_transform(img: Image.Image, resolution: int, center_crop: bool) -> torch.Tensor:
    """The original's image transform: Resize(R, bilinear) -> Center/RandomCrop(R) -> [-1, 1]. Returns [3, R, R]."""
    img = TF.resize(img, [resolution], interpolation=TF.InterpolationMode.BILINEAR)
    if center_crop:
        img = TF.center_crop(img, [resolution, resolution])
    else:  # torchvision's RandomCrop draws: none for a square image, else top then left
        top, left, h, w = RandomCrop.get_params(img, (resolution, resolution))
        img = TF.crop(img, top, left, h, w)
    return TF.normalize(TF.to_tensor(img), [0.5], [0.5])


@dataclass
class SegMixOptions:
    """The MuDI flags that shape the data (see scripts/train_mudi.py --help)."""

    resolution: int = 1024
    segmix_prob: float = 0.3
    segmix_start_step: int = 0
    relative_scale: float = 0.0
    soft_alpha: float = 1.0
    num_subjects: int = 2
    center_crop: bool = False
    random_flip: bool = False
    model: str = "sdxl"
    repeats: int = 1
    num_class_images: int | None = 100


class MuDIDataset(Dataset):
    """Instance images (and optionally class images) of several subjects, with Seg-Mix."""

    wants_step = True

    def __init__(self, meta: Metadata, options: SegMixOptions, class_meta: Metadata | None = None) -> None:
        o = self.options = options
        self.meta, self.class_meta = meta, class_meta
        self.config = SegMixConfig.for_model(o.model, o.resolution)
        self.groups = meta.by_id()
        self.step = 0
        if not 0 <= o.segmix_prob <= 1:
            raise UsageError(f"--segmix_prob must be in [0, 1], got {o.segmix_prob}")
        if not 0 <= o.soft_alpha <= 1:
            raise UsageError(f"--soft_alpha must be in [0, 1], got {o.soft_alpha}")
        if o.resolution % LATENT_FACTOR:
            raise UsageError(f"--resolution must be a multiple of {LATENT_FACTOR}, got {o.resolution}")
        check_relative_scale(o.relative_scale, len(meta.id_map))
        if o.segmix_prob > 0:
            if len(self.groups) < 2:
                raise UsageError("Seg-Mix needs images of at least two ids (or set --segmix_prob 0)")
            if not 2 <= o.num_subjects <= len(self.groups):
                raise UsageError(f"--segmix_num_subjects must be in [2, {len(self.groups)}] (ids with images), "
                                 f"got {o.num_subjects}")
        self.class_groups: dict[str, list[Record]] = {}
        if class_meta is not None:
            self.class_groups = class_meta.by_id()
            missing = [k for k in self.groups if k not in self.class_groups]
            if missing:
                raise UsageError(f"class_metadata.jsonl has no images for id(s) {', '.join(missing)}; prior ids must "
                                 "match the instance ids")
        records = list(meta.records) + (list(class_meta.records) if class_meta is not None else [])
        for r in records:  # validate masks up front: a bad one fails before any model loads
            mask = load_mask_u8(r.mask, load_rgb(r.image).size)  # an unreadable image is a UsageError too
            try:
                crop_subject(np.zeros((*mask.shape, 3), np.uint8), mask)
            except UsageError as e:
                raise UsageError(f"{r.mask}: {e}") from None

    def __len__(self) -> int:
        """Instance images x repeats; with a class set, as the original: at least min(entries in the class folder,
        --num_class_images), so the class index (index % count per id) reaches every class image."""
        n = len(self.meta.records) * self.options.repeats
        if self.class_meta is None:
            return n
        entries = sum(1 for _ in self.class_meta.folder.iterdir())  # the original counts every file there
        cap = self.options.num_class_images
        return max(n, entries if cap is None else min(entries, cap))

    def set_step(self, step: int) -> None:
        """Main-process step for plain-int indexing (the StepIndex path does not need it)."""
        self.step = step

    # ----------------------------------------------------------------------------------------------- items
    def _subject(self, record: Record, flip: bool) -> Subject:
        img = np.asarray(load_rgb(record.image))
        mask = load_mask_u8(record.mask, (img.shape[1], img.shape[0]))
        if flip:
            img, mask = img[:, ::-1], mask[:, ::-1]
        return crop_subject(np.ascontiguousarray(img), np.ascontiguousarray(mask), record.id)

    def _flip(self) -> bool:
        """The original's flip draw; a flip then spends two torch draws, as its RandomHorizontalFlip(p=1.0) calls
        on the image and on the mask do."""
        flip = self.options.random_flip and random.random() < 0.5
        if flip:
            torch.rand(1), torch.rand(1)
        return flip

    def _compose(self, records: Sequence[Record], scales: Sequence[float] | None, height_sync: bool,
                 flips: Sequence[bool] | None = None, first_left: bool | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Seg-Mix composite of `records` (one per subject; the item's own first) -> (pixels [3, R, R],
        mask map [1, R/8, R/8], white).

        Two subjects follow the original draw for draw: a scale per subject from numpy's global generator
        (U(low f_max, f_max), own then partner; `scales` given = the fixed --relative_scale fractions), then
        is_first from `random` (own subject on the left; `first_left` given = no draw, the class branch), FLUX's
        white draw, then `collage_pair`. More subjects use the generalised `collage`."""
        cfg, o = self.config, self.options
        if flips is None:
            flips = [self._flip() for _ in records]
        subjects = [self._subject(r, f) for r, f in zip(records, flips)]
        n = len(subjects)
        fmax = [max_factor(s, cfg.canvas, n, cfg.margin) for s in subjects]
        if scales is None:
            factors = [float(np.random.uniform(f * cfg.scale_low, f)) for f in fmax]
        else:
            factors = [f * k for f, k in zip(fmax, scales)]
        subjects = [resize_subject(s, f) for s, f in zip(subjects, factors)]
        if n == 2:
            own_left = random.random() < 0.5 if first_left is None else first_left
            white = cfg.white_prob >= 1 or random.random() < cfg.white_prob
            left, right = subjects if own_left else subjects[::-1]
            result = collage_pair(left, right, cfg.canvas, cfg.margin_max, height_sync=height_sync, white=white)
        else:
            white = cfg.white_prob >= 1 or random.random() < cfg.white_prob
            result = collage(subjects, cfg.canvas, cfg.margin_max, height_sync=height_sync, white=white)
        pixels = dreambooth_transform(Image.fromarray(result.image), o.resolution, o.center_crop)
        return pixels, loss_mask_map(result.merged, o.resolution // LATENT_FACTOR, o.soft_alpha), white

    def _partners(self, own: str) -> list[str]:
        """Other ids, in the id map's order (the original's `random.choice` over them for one partner)."""
        others = [k for k in self.meta.ids if k != own and k in self.groups]
        if self.options.num_subjects == 2:
            return [random.choice(others)]
        return random.sample(others, self.options.num_subjects - 1)

    def __getitem__(self, index: Any) -> dict[str, Any]:
        """Draws in the original's order: own flip (FLUX), the Seg-Mix draw, partner id, partner image, partner
        flip, scales (numpy), is_first, white (FLUX), the collage, the crop (torch); then the class item."""
        index, step = split_step_index(index)
        step = self.step if step is None else step
        o = self.options
        reps = self.options.repeats  # the original repeats each record in place: r0, r0, r1, r1, ...
        record = self.meta.records[(index % (len(self.meta.records) * reps)) // reps]
        own_flip = self._flip()
        do_segmix = random.random() < o.segmix_prob and step >= o.segmix_start_step
        item: dict[str, Any] = {"id": record.id, "segmix": do_segmix}
        if do_segmix:
            ids = [record.id, *self._partners(record.id)]
            records, flips = [record], [own_flip]
            for k in ids[1:]:
                records.append(random.choice(self.groups[k]))
                flips.append(self._flip())
            scales = None if o.relative_scale == 0 else \
                scale_factors(ids, self.meta.ids, o.relative_scale, self.config.scale_low)
            pixels, mask_map, white = self._compose(records, scales, height_sync=False, flips=flips)
            item.update(pixel_values=pixels, mask_map=mask_map,
                        prompt=segmix_prompt([self.meta.id_map[k] for k in ids], o.model, white))
        else:
            img = load_rgb(record.image)
            if own_flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            size = o.resolution // LATENT_FACTOR
            item.update(pixel_values=dreambooth_transform(img, o.resolution, o.center_crop), prompt=record.text,
                        mask_map=torch.ones(1, size, size))
        if self.class_meta is not None:
            item.update(self._class_item(index, record.id, ids if do_segmix else None))
        return item

    def _class_item(self, index: int, own: str, ids: list[str] | None) -> dict[str, Any]:
        """Prior image of the same id (deterministic: index % count); composed like the instance when Seg-Mix
        applies, as the original: a partner id drawn anew from the class ids (itself when there is one), random
        scales whatever --relative_scale, own class image on the left (no is_first draw), shared height, white,
        captioned with the plain class names. No flips."""
        o, cm = self.options, self.class_meta
        first = self.class_groups[own][index % len(self.class_groups[own])]
        if ids is None:
            size = o.resolution // LATENT_FACTOR
            return {"class_pixel_values": dreambooth_transform(load_rgb(first.image), o.resolution, o.center_crop),
                    "class_prompt": first.text, "class_mask_map": torch.ones(1, size, size)}
        if len(ids) == 2:
            class_ids = [k for k in cm.ids if k in self.class_groups]
            others = [k for k in class_ids if k != own]
            ids = [own, random.choice(others) if len(class_ids) > 1 else own]
        records = [first] + [random.choice(self.class_groups[k]) for k in ids[1:]]
        pixels, mask_map, white = self._compose(records, None, height_sync=True, flips=[False] * len(records),
                                                first_left=True)
        return {"class_pixel_values": pixels, "class_mask_map": mask_map,
                "class_prompt": segmix_prompt([cm.id_map[k] for k in ids], o.model, white)}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Instance rows first, then class rows (when present): pixel_values [B(+B), 3, R, R], mask_map [B(+B), 1, r, r]."""
    pixels = [it["pixel_values"] for it in items]
    masks = [it["mask_map"] for it in items]
    prompts = [it["prompt"] for it in items]
    has_class = "class_pixel_values" in items[0]
    if has_class:
        pixels += [it["class_pixel_values"] for it in items]
        masks += [it["class_mask_map"] for it in items]
        prompts += [it["class_prompt"] for it in items]
    return {"pixel_values": torch.stack(pixels), "mask_map": torch.stack(masks), "prompts": prompts,
            "segmix": [it["segmix"] for it in items], "ids": [it["id"] for it in items], "num_instance": len(items),
            "has_class": has_class}
