"""Arbitrary-size images: square windows over a wide canvas (f = crop, g = count-weighted average)."""
from __future__ import annotations

import torch

from common.errors import UsageError
from synctweedies.projection import GatherProjection


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering [0, length): every `stride`, plus one flush with the end if the stride misses it."""
    if window > length:
        raise UsageError(f"window {window} is larger than the canvas side {length}")
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


class WindowProjection(GatherProjection):
    """Canvas z [1, C, H, W] <-> windows [N, C, window_h, window_w], row-major over (top, left) offsets.

    With H=64, W=384, window 64, stride 8 (SD2 latents of a 512x3072 image) there are 41 windows.
    """

    def __init__(self, height: int, width: int, window: int | tuple[int, int] = 64, stride: int = 8):
        wh, ww = (window, window) if isinstance(window, int) else window
        wh, ww = min(wh, height), min(ww, width)
        self.tops, self.lefts = window_starts(height, wh, stride), window_starts(width, ww, stride)
        self.offsets = [(t, l) for t in self.tops for l in self.lefts]
        rows = torch.arange(wh)[:, None] * width + torch.arange(ww)[None]  # [wh, ww] ids of a window at (0, 0)
        index = torch.stack([(rows + t * width + l).flatten() for t, l in self.offsets])
        super().__init__(index, (height, width), (wh, ww))
        self.window, self.stride = (wh, ww), stride

    def scaled(self, factor: int) -> "WindowProjection":
        """The same windows on a canvas `factor` times larger (latent -> RGB: factor 8)."""
        h, w = self.canonical_hw
        proj = WindowProjection(h * factor, w * factor, (self.window[0] * factor, self.window[1] * factor),
                                self.stride * factor)
        if proj.offsets != [(t * factor, l * factor) for t, l in self.offsets]:
            raise AssertionError("scaled windows do not line up")
        return proj

    def count_map(self) -> torch.Tensor:
        """How many windows cover each canvas pixel: [H, W]."""
        return self.count.view(*self.canonical_hw)
