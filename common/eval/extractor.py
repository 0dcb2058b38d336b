"""The one seam between metrics and backbones: a `FeatureExtractor` turns images (and, for CLIP, texts) into rows.

Real backbones (open_clip, timm DINO, transformers DINOv2, Inception) and the tiny random ones of the tests are
both wrapped in it, so every metric runs the same code whichever backbone sits underneath. Its `key` names the
backbone *and* its preprocessing, which is what the feature cache keys on.
"""
from __future__ import annotations

import contextlib
import logging

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from tqdm.auto import tqdm

from common.data import load_rgb
from common.errors import UsageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Image.Image | str | os.PathLike


@dataclass(frozen=True)
class Preprocess:
    """PIL image -> [3, H, W] float tensor, written down as data so that it can be part of a cache key.

    `resize`: an int resizes the shorter side to it (torchvision `Resize(int)`, as CLIP and DINO do); an (H, W)
    pair resizes exactly (clean-fid's 299x299). `crop`: centre crop size or None. Pixels are in [0, 1] times
    `scale`, then normalised with `mean`/`std` when given.
    """

    resize: int | tuple[int, int]
    crop: int | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    interpolation: str = "bicubic"
    scale: float = 1.0
    float_resize: bool = False  # clean-fid's "clean" resize: per channel in float, no rounding or clipping

    @property
    def key(self) -> str:
        size = self.resize if isinstance(self.resize, int) else "x".join(map(str, self.resize))
        norm = "none" if self.mean is None else f"{self.mean}/{self.std}"
        exact = ",float" if self.float_resize else ""
        return f"resize={size}:{self.interpolation}{exact},crop={self.crop},scale={self.scale},norm={norm}"

    @property
    def out_size(self) -> tuple[int, int]:
        if self.crop is not None:
            return (self.crop, self.crop)
        return (self.resize, self.resize) if isinstance(self.resize, int) else tuple(self.resize)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Returns [3, H, W] float32."""
        if self.float_resize:
            return self._float_resize(img)
        mode = TF.InterpolationMode(self.interpolation)
        size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
        img = TF.resize(img.convert("RGB"), size, interpolation=mode)
        if self.crop is not None:
            img = TF.center_crop(img, [self.crop, self.crop])
        x = TF.to_tensor(img)
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean is not None:
            x = TF.normalize(x, list(self.mean), list(self.std))
        return x


    def _float_resize(self, img: Image.Image) -> torch.Tensor:
        """Each channel resized as a float ("F") image, values kept in [0, 255] x scale / 255 unclipped."""
        import numpy as np

        if self.crop is not None or self.mean is not None or isinstance(self.resize, int):
            raise ValueError("float_resize supports an exact (H, W) resize only, without crop or normalisation")
        h, w = self.resize
        resample = getattr(Image.Resampling, self.interpolation.upper())
        x = np.asarray(img.convert("RGB"), dtype=np.float32)
        chans = [np.asarray(Image.fromarray(x[..., c], mode="F").resize((w, h), resample)) for c in range(3)]
        return torch.from_numpy(np.stack(chans)) * (self.scale / 255.0)


CLIP_224 = Preprocess(224, 224, CLIP_MEAN, CLIP_STD)  # OpenAI CLIP ViT-B/32 and ViT-L/14
DINO_256_224 = Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD)  # DINO eval and DINOv2 image processor


def as_pil(image: ImageLike) -> Image.Image:
    """A PIL image as it is, or a path loaded upright as RGB (unreadable files are a UsageError)."""
    return image if isinstance(image, Image.Image) else load_rgb(image)


class FeatureExtractor:
    """A backbone as the metrics see it: `encode_images(list) -> [N, D]`, `encode_texts(list) -> [N, D]`.

    `image_fn` maps a preprocessed batch [B, 3, H, W] (on `device`, in `dtype`) to [B, D]; `text_fn` (CLIP only)
    maps a list of B strings to [B, D]. Outputs come back as float32 on the CPU, unnormalised.
    """

    def __init__(
        self,
        name: str,
        preprocess: Preprocess,
        image_fn: Callable[[torch.Tensor], torch.Tensor],
        text_fn: Callable[[list[str]], torch.Tensor] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        module: torch.nn.Module | None = None,
    ) -> None:
        self.name = name
        self.preprocess = preprocess
        self.image_fn = image_fn
        self.text_fn = text_fn
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.module = module  # kept for .to() and for benchmarks that need the raw network

    @property
    def key(self) -> str:
        """Backbone, dtype and preprocessing: two extractors with equal keys give equal features."""
        return f"{self.name}|{str(self.dtype).removeprefix('torch.')}|{self.preprocess.key}"

    @property
    def has_text(self) -> bool:
        return self.text_fn is not None

    def __repr__(self) -> str:
        return f"FeatureExtractor({self.key!r}, device={self.device}, dtype={self.dtype})"

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed -> [B, D] float32 on the CPU."""
        out = self.image_fn(pixels.to(self.device, self.dtype))
        return out.float().cpu()

    def encode_images(
        self, images: Sequence[ImageLike], *, batch_size: int | None = None, progress: bool = False, desc: str = ""
    ) -> torch.Tensor:
        """N images (PIL or paths) -> [N, D], in batches of `batch_size`."""
        bs = batch_size or self.batch_size
        rows = []
        bar = tqdm(total=len(images), desc=desc or f"{self.name} images", unit="img", disable=not progress, leave=False)
        for start in range(0, len(images), bs):
            chunk = images[start : start + bs]
            pixels = torch.stack([self.preprocess(as_pil(img)) for img in chunk])
            rows.append(self.encode_pixels(pixels))
            bar.update(len(chunk))
        bar.close()
        if not rows:
            return torch.zeros(0, 0)
        return torch.cat(rows)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], *, batch_size: int | None = None) -> torch.Tensor:
        """N strings -> [N, D] float32 on the CPU (CLIP backbones only)."""
        if self.text_fn is None:
            raise TypeError(f"{self.name} has no text encoder; CLIP-T needs a CLIP backbone")
        bs = batch_size or self.batch_size
        rows = [self.text_fn(list(texts[s : s + bs])).float().cpu() for s in range(0, len(texts), bs)]
        return torch.cat(rows) if rows else torch.zeros(0, 0)


@contextlib.contextmanager
def quiet_root_logger():
    """open_clip logs a failed download with `logging.error` on the root logger before raising; the raise
    becomes our one-line UsageError, so the extra `ERROR:root:` line is held back while loading."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


def offline_error(what: str, how: str, cause: BaseException) -> UsageError:
    """One line naming the missing backbone and how to fetch it, for a loader that failed offline."""
    reason = " ".join(str(cause).split())[:160] or type(cause).__name__
    return UsageError(f"backbone {what} is not available offline ({reason}); download it with: {how}")


def weights_tag(path: Path) -> str:
    """Identity of local weights for cache keys: a content hash of the file (or of a folder's weight files),
    so two different checkpoints never share cached features."""
    import hashlib

    from common.eval.cache import file_hash

    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json"))
    digest = hashlib.sha256("".join(file_hash(p) for p in files).encode()).hexdigest()
    return f"file:{digest[:16]}"


def existing_path(spec: str) -> Path | None:
    """`spec` as a Path when it names an existing file or folder, else None (then it is a hub id)."""
    p = Path(os.path.expanduser(spec))
    return p if p.exists() else None
