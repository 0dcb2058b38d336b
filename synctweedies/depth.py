"""Depth maps for the panorama's ControlNet: .dpt (360MonoDepth / Middlebury float format), .npy, images.

.dpt layout: float32 tag 202021.25, int32 width, int32 height, then width*height float32 depths, row-major.
ControlNet depth models expect disparity-like maps (near = bright) in [0, 1]; we convert depth that way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.errors import UsageError

DPT_TAG = 202021.25


def read_dpt(path: str | Path) -> np.ndarray:
    """[H, W] float32 depth from a .dpt file; a clear UsageError for a wrong tag or a truncated file."""
    data = Path(path).read_bytes()
    if len(data) < 12:
        raise UsageError(f"{path} is not a .dpt depth file (too short)")
    tag = np.frombuffer(data[:4], "<f4")[0]
    w, h = (int(v) for v in np.frombuffer(data[4:12], "<i4"))
    if abs(tag - DPT_TAG) > 1e-3 or w <= 0 or h <= 0:
        raise UsageError(f"{path} is not a .dpt depth file (tag {tag}, size {w}x{h})")
    if len(data) - 12 < 4 * w * h:
        raise UsageError(f"{path} is truncated: expected {w}x{h} float32 values")
    return np.frombuffer(data[12:12 + 4 * w * h], "<f4").reshape(h, w).copy()


def write_dpt(path: str | Path, depth: np.ndarray) -> None:
    h, w = depth.shape
    Path(path).write_bytes(np.float32(DPT_TAG).tobytes() + np.array([w, h], "<i4").tobytes()
                           + depth.astype("<f4").tobytes())


def load_depth(path: str | Path) -> tuple[np.ndarray, bool]:
    """(map [H, W] float32, is_depth). .dpt/.npy hold depth; an image is taken as a disparity visualisation
    (bright = near), like the original's `_vis.png`."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"depth map {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".dpt":
        return read_dpt(path), True
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim == 3 and 1 in arr.shape:
            arr = arr.squeeze()
        if arr.ndim != 2:
            raise UsageError(f"{path}: a .npy depth map must be [H, W], got shape {arr.shape}")
        return arr.astype(np.float32), True
    try:
        import PIL.Image

        img = PIL.Image.open(path)
        arr = np.asarray(img.convert("I;16") if img.mode.startswith("I") else img.convert("L"), dtype=np.float32)
    except OSError as e:
        raise UsageError(f"cannot read depth map {path}: {e}") from None
    return arr, False


def control_disparity(path: str | Path) -> torch.Tensor:
    """An equirectangular depth map as a [1, 1, H, W] disparity in [0, 1] (H:W must be 1:2)."""
    arr, is_depth = load_depth(path)
    h, w = arr.shape
    if w != 2 * h:
        raise UsageError(f"depth map {path} is {w}x{h}: an equirectangular map must be twice as wide as high")
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    if is_depth:
        valid = arr > 0
        arr = np.where(valid, 1.0 / np.maximum(arr, 1e-6), 0.0)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return torch.from_numpy(arr.astype(np.float32))[None, None]
