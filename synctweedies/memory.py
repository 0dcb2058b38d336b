"""Refuse a wide image or panorama that cannot fit in memory, before any large tensor is made.

The estimates are lower bounds (tensors a run must hold at once, counted exactly from the flags), so they
never refuse a run that fits; a 10^7-pixel-wide canvas or a 10^6 x 10^6 latent pano is refused in a line
instead of being killed for memory minutes later.
"""
from __future__ import annotations

import torch

from common.memory import refuse_if_too_big

_F32, _I64 = 4, 8


def num_window_starts(length: int, window: int, stride: int) -> int:
    """len(synctweedies.wide.window_starts(length, window, stride)) without building the list (window <= length)."""
    span = length - window
    return span // stride + 1 + (1 if span % stride else 0)


def wide_image_bytes(height: int, width: int, window: int, stride: int, factor: int) -> tuple[int, int]:
    """(lower bound on the bytes, number of windows) of a wide image: RGB canvas [1, 3, H, W] in pixels, square
    latent windows of `window` (clamped to the canvas) every `stride` latent pixels, VAE factor `factor`.

    Counted: the decoded windows [n, 3, S, S] float32 (S = window x factor, clamped), the RGB and latent
    projections' gather indices ([n, S*S] / [n, window^2] int64) and coverage counts (float32 per canvas pixel),
    and the final canvas [1, 3, H, W] float32.
    """
    lat_h, lat_w = height // factor, width // factor
    wh, ww = min(window, lat_h), min(window, lat_w)
    n = num_window_starts(lat_h, wh, stride) * num_window_starts(lat_w, ww, stride)
    rgb_window, rgb_canvas = wh * ww * factor * factor, lat_h * lat_w * factor * factor
    need = (n * (rgb_window * (3 * _F32 + _I64) + wh * ww * _I64) + lat_h * lat_w * _F32
            + rgb_canvas * (_F32 + 3 * _F32))
    return need, n


def panorama_bytes(latent_hw: tuple[int, int], rgb_hw: tuple[int, int], latent_channels: int,
                   dtype: torch.dtype, compact_sync: bool) -> int:
    """Lower bound on the bytes of a panorama run: per latent pano pixel its coverage count (float32) and, unless
    --compact_sync, the pano buffer of one sync and its normalised copy ([C, H, W] each, in `dtype`); per RGB
    pano pixel its coverage count, the read-out buffer and the final pano ([3, H, W] float32 each)."""
    latent_px, rgb_px = latent_hw[0] * latent_hw[1], rgb_hw[0] * rgb_hw[1]
    per_latent = _F32 + (0 if compact_sync else 2 * latent_channels * torch.tensor([], dtype=dtype).element_size())
    return latent_px * per_latent + rgb_px * (_F32 + 2 * 3 * _F32)


def check_fits(need: int, device: str | torch.device, what: str, advice: str) -> None:
    """UsageError (one line) when the lower bound `need` exceeds the memory of `device`."""
    refuse_if_too_big(need, device, what, advice)
