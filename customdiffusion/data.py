"""Custom Diffusion's training data: concepts, the resize augmentation with its loss mask and prompt
words, and the prior-preservation (class) images.

Augmentation (paper §3 / spec §1.6), as the original repository's data pipelines (diffusers and LDM) draw it, at
training size S with a mask at S/f (f = the VAE's pixels per latent cell, 8 for SD; measured from the VAE by
the trainer, never assumed), in the original's random-number order:
* flip: torchvision's RandomHorizontalFlip(0.5 * hflip), one torch.rand(1) drawn even with flips off;
* with probability 2/3 (`np.random.randint(0, 3) < 2`) draw r ~ U{S//3 .. S}, else r ~ U{floor(1.2 S) ..
  floor(1.4 S) - 1}; an odd r is rounded up to even;
* r < 0.6 S: prompt prefixed "a far away " / "very small ", then the image, resized to r x r, is pasted at a
  random place of a zero (mid-grey) S x S canvas; the mask is 1 on the pasted square shrunk by one latent
  cell per side;
* r > S: prompt prefixed "zoomed in " / "close up ", then a random S x S crop of the r x r image, mask ones;
* 0.6 S <= r <= S (always with --noaug): the image resized to S x S, mask all ones, prompt unchanged.
Class images go through the original's torchvision chain (flip, bilinear resize of the short side, centre or
random crop). All randomness comes from the global generators, which the Trainer seeds per item (exact resume).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.data import list_images, load_rgb
from common.errors import UsageError

DEFAULT_LATENT_FACTOR = 8  # SD/SDXL VAEs; the trainer passes the factor of the VAE it loaded
CONCEPT_FIELDS = ("instance_prompt", "class_prompt", "instance_data_dir", "class_data_dir")


@dataclass
class Concept:
    """One concept: its images and prompt, and the class images / prompt of its prior-preservation set."""

    instance_prompt: str
    instance_data_dir: str
    class_prompt: str | None = None
    class_data_dir: str | None = None


def load_concepts_list(path: str | Path, with_prior_preservation: bool) -> list[Concept]:
    """Read `--concepts_list` (a JSON list; CustomConcept101's dataset.json entries work as they are)."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--concepts_list {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--concepts_list {path} is not valid JSON: {err}") from None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"--concepts_list {path} must hold a non-empty JSON list of concept objects")
    needed = CONCEPT_FIELDS if with_prior_preservation else ("instance_prompt", "instance_data_dir")
    concepts = []
    for i, entry in enumerate(entries):
        missing = [k for k in needed if not isinstance(entry, dict) or not entry.get(k)]
        if missing:
            raise UsageError(f"--concepts_list {path}: entry {i} lacks {', '.join(missing)}")
        base = path.parent
        resolve = lambda p: str(p if Path(p).is_absolute() or Path(p).exists() else base / p) if p else None
        concepts.append(Concept(entry["instance_prompt"], resolve(entry["instance_data_dir"]),
                                entry.get("class_prompt"), resolve(entry.get("class_data_dir"))))
    return concepts


def draw_scale(size: int) -> int:
    """The augmentation's random resize r (see module docstring): numpy's global RNG, two draws, even r."""
    if np.random.randint(0, 3) < 2:
        scale = int(np.random.randint(size // 3, size + 1))
    else:
        scale = int(np.random.randint(int(1.2 * size), int(1.4 * size)))
    return scale + 1 if scale % 2 == 1 else scale


def place(pixels: torch.Tensor, size: int, scale: int, factor: int = DEFAULT_LATENT_FACTOR
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels [3, scale, scale] in [-1, 1] -> (canvas [3, S, S], mask [1, S/f, S/f]): pasted (scale < S) or
    cropped (scale > S) at a random place, as in the module docstring (the caller decides which r paste)."""
    f = factor
    mask = torch.zeros(1, size // f, size // f)
    if scale == size:
        return pixels, mask + 1
    if scale > size:  # the original draws the crop centre; top = centre - S//2 is the same number
        top, left = (int(np.random.randint(0, scale - size + 1)) for _ in range(2))
        return pixels[:, top: top + size, left: left + size], mask + 1
    top, left = (int(np.random.randint(0, size - scale + 1)) for _ in range(2))
    canvas = torch.zeros(3, size, size)
    canvas[:, top: top + scale, left: left + scale] = pixels
    mask[:, top // f + 1: (top + scale) // f - 1, left // f + 1: (left + scale) // f - 1] = 1
    return canvas, mask


def _to_pixels(image: Image.Image, scale: int) -> torch.Tensor:
    """Bilinear resize to scale x scale, then [0, 255] -> [-1, 1] computed in float64 and cast to float32, as
    the original's `preprocess` does (a float32 division can differ in the last bit). -> [3, scale, scale]"""
    resized = np.asarray(image.resize((scale, scale), resample=Image.BILINEAR), dtype=np.uint8)
    return torch.from_numpy((resized / 127.5 - 1.0).astype(np.float32)).permute(2, 0, 1)


def augment(image: Image.Image, prompt: str, size: int, *, aug: bool = True, hflip: bool = False,
            factor: int = DEFAULT_LATENT_FACTOR) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One training view of an instance image: (pixels [3, S, S] in [-1, 1], mask [1, S/f, S/f], prompt)."""
    if torch.rand(1) < 0.5 * hflip:  # torchvision RandomHorizontalFlip(0.5 * hflip): drawn even when off
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    scale = draw_scale(size) if aug else size
    if scale < 0.6 * size:
        prompt = str(np.random.choice(["a far away ", "very small "])) + prompt
    elif scale > size:
        prompt = str(np.random.choice(["zoomed in ", "close up "])) + prompt
    else:
        scale = size  # the original keeps the whole image for 0.6 S <= r <= S
    pixels, mask = place(_to_pixels(image, scale), size, scale, factor)
    return pixels, mask, prompt


def class_transform(size: int, *, center_crop: bool = False, hflip: bool = False):
    """The original's class-image chain: PIL -> [3, S, S] in [-1, 1] (flip p = 0.5 * hflip, drawn even when off;
    bilinear resize of the short side to S; centre or random S x S crop)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomHorizontalFlip(0.5 * hflip),
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(size) if center_crop else transforms.RandomCrop(size),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


def read_real_prior(class_dir: str | Path) -> tuple[list[Path], list[str]]:
    """A retrieved (real) prior folder: images.txt (one path per line) and caption.txt (one caption per line)."""
    class_dir = Path(class_dir)
    images_txt, captions_txt = class_dir / "images.txt", class_dir / "caption.txt"
    if not images_txt.is_file() or not captions_txt.is_file():
        raise UsageError(
            f"--real_prior needs {images_txt} and {captions_txt} (one image path / caption per line); the LAION "
            "retrieval service is gone, so gather real images yourself or drop --real_prior to generate them")
    paths = [Path(p.strip()) for p in images_txt.read_text().splitlines() if p.strip()]
    paths = [p if p.is_absolute() or p.exists() else class_dir / p for p in paths]
    captions = [c.strip() for c in captions_txt.read_text().splitlines() if c.strip()]
    if len(paths) != len(captions):
        raise UsageError(f"{images_txt} lists {len(paths)} images but {captions_txt} has {len(captions)} captions")
    return paths, captions


class CustomDiffusionDataset(Dataset):
    """Instance images of all concepts (+ their class images): item i pairs instance i mod N with class i mod M.

    Items: instance_pixels [3, S, S], instance_mask [1, S/f, S/f] (f = `latent_factor`), instance_prompt, and
    with prior preservation class_pixels [3, S, S], class_prompt.
    """

    def __init__(self, concepts: list[Concept], size: int = 512, *, with_prior_preservation: bool = False,
                 real_prior: bool = False, num_class_images: int = 100, center_crop: bool = False,
                 hflip: bool = False, aug: bool = True, latent_factor: int = DEFAULT_LATENT_FACTOR):
        if latent_factor < 1 or size % latent_factor:
            raise UsageError(f"--resolution {size} is not a multiple of the VAE's latent factor {latent_factor}")
        self.size, self.center_crop, self.hflip, self.aug = size, center_crop, hflip, aug
        self.latent_factor = latent_factor
        self.instances: list[tuple[Path, str]] = []
        self.classes: list[tuple[Path, str]] = []
        for c in concepts:
            self.instances += [(p, c.instance_prompt) for p in list_images(c.instance_data_dir)]
            if with_prior_preservation:
                if not c.class_data_dir or not c.class_prompt:
                    raise UsageError("--with_prior_preservation needs --class_data_dir and --class_prompt")
                if real_prior:
                    paths, captions = read_real_prior(c.class_data_dir)
                    pairs = list(zip(paths, captions))
                else:
                    pairs = [(p, c.class_prompt) for p in list_images(c.class_data_dir)]
                self.classes += pairs[:num_class_images]
        self.with_prior = with_prior_preservation
        self.class_transform = class_transform(size, center_crop=center_crop, hflip=hflip)
        if with_prior_preservation and not self.classes:
            raise UsageError("no class images found: generate them (drop --real_prior) or fill --class_data_dir")

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, prompt = self.instances[index % len(self.instances)]
        pixels, mask, prompt = augment(load_rgb(path), prompt, self.size, aug=self.aug, hflip=self.hflip,
                                     factor=self.latent_factor)
        item = {"instance_pixels": pixels, "instance_mask": mask, "instance_prompt": prompt}
        if self.with_prior:
            cpath, cprompt = self.classes[index % len(self.classes)]
            item["class_pixels"] = self.class_transform(load_rgb(cpath))
            item["class_prompt"] = cprompt
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch = instances first, then class images (masks of ones), as the upstream trainer lays it out."""
    pixels = [it["instance_pixels"] for it in items]
    masks = [it["instance_mask"] for it in items]
    prompts = [it["instance_prompt"] for it in items]
    num_instance = len(items)
    if "class_pixels" in items[0]:
        pixels += [it["class_pixels"] for it in items]
        masks += [torch.ones_like(items[0]["instance_mask"]) for _ in items]
        prompts += [it["class_prompt"] for it in items]
    return {"pixel_values": torch.stack(pixels), "mask": torch.stack(masks), "prompts": prompts,
            "num_instance": num_instance}
