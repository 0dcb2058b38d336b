"""360-degree panoramas: perspective views of an equirectangular canonical image (common.render.panorama).

f: nearest sampling of the pano; g: scatter each view pixel to its nearest pano pixel, Voronoi-fill the
view's footprint from those hits, add the views and divide by the number of footprints covering a pixel.
Both maps are fixed, so they are precomputed once as index lists; `sync` (f after g) can also run as a
small sparse matrix over instance pixels only, never materialising the 2048 x 4096 latent pano.
"""
from __future__ import annotations

import warnings

import torch

from common.errors import UsageError
from common.render.panorama import footprint, nearest_index, perspective_to_pano, scatter_sources
from synctweedies.projection import Projection


def view_angles(theta_range=(0, 360), theta_interval=45, phi_range=(0, 1), phi_interval=45) -> list[tuple[int, int]]:
    """(theta, phi) pairs: range(*theta_range, theta_interval) x range(*phi_range, phi_interval)."""
    if theta_interval <= 0 or phi_interval <= 0:
        raise UsageError("--theta_interval and --phi_interval must be positive")
    pairs = [(t, p) for p in range(phi_range[0], phi_range[1], phi_interval)
             for t in range(theta_range[0], theta_range[1], theta_interval)]
    if not pairs:
        raise UsageError(f"no views: theta range {theta_range} / phi range {phi_range} are empty")
    return pairs


class PanoramaProjection(Projection):
    """Pano z [1, C, H, W] <-> perspective views [N, C, s, s] at the given (theta, phi), FOV in degrees."""

    def __init__(self, pano_h: int, pano_w: int, size: int, angles: list[tuple[float, float]], fov: float = 72.0,
                 compact_sync: bool = False):
        if not 0 < fov < 180:
            raise UsageError(f"--FOV must be between 0 and 180 degrees (exclusive), got {fov}")
        self.pano_hw, self.size, self.angles, self.fov = (pano_h, pano_w), size, list(angles), fov
        self.num_instances = len(self.angles)
        self.compact_sync = compact_sync
        self.index = torch.stack([nearest_index(perspective_to_pano(t, p, fov, size, pano_h, pano_w), pano_h, pano_w)
                                  .flatten() for t, p in self.angles])  # [N, s*s]
        pixels, sources = [], []
        hw = size * size
        for i, (t, p) in enumerate(self.angles):
            px, src = scatter_sources(self.index[i], footprint(t, p, fov, size, pano_h, pano_w), pano_w)
            pixels.append(px)
            sources.append(src + i * hw)
        self.pixels, self.sources = torch.cat(pixels), torch.cat(sources)  # [M], [M] (global instance pixel)
        self.count = torch.zeros(pano_h * pano_w).index_add_(0, self.pixels, torch.ones(self.pixels.numel()))
        self._sync_matrix: torch.Tensor | None = None

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, pixels, sources, count) on `device`, copied once per device (they are large at 2048 x 4096)."""
        cache = self.__dict__.setdefault("_device_cache", {})
        key = str(device)
        if key not in cache:
            cache[key] = tuple(t.to(device) for t in (self.index, self.pixels, self.sources, self.count))
        return cache[key]

    def canonical_shape(self, channels: int) -> tuple[int, ...]:
        return (1, channels, *self.pano_hw)

    def instance_shape(self, channels: int) -> tuple[int, ...]:
        return (self.num_instances, channels, self.size, self.size)

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        c = z.shape[1]
        picked = z[0].flatten(-2)[:, self._on(z.device)[0].flatten()]
        return picked.view(c, self.num_instances, self.size, self.size).transpose(0, 1).contiguous()

    def _inverse(self, xs: torch.Tensor, var_type: str) -> torch.Tensor:
        c = xs.shape[1]
        _, pixels, sources, count = self._on(xs.device)
        flat = xs.transpose(0, 1).reshape(c, -1)
        buf = torch.zeros(c, count.numel(), device=xs.device, dtype=xs.dtype)
        buf.index_add_(1, pixels, flat[:, sources])
        buf = buf / (count.to(xs.dtype) + 1e-8)
        return buf.view(1, c, *self.pano_hw)

    def coverage(self) -> torch.Tensor:
        """Number of view footprints over each pano pixel: [H, W]."""
        return self.count.view(*self.pano_hw)

    def sync_matrix(self) -> torch.Tensor:
        """Sparse [N s^2, N s^2] matrix S with sync(x) = S x, built from the index lists (no pano buffer)."""
        if self._sync_matrix is None:
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
            n_inst = self.index.numel()
            wanted, inv = torch.unique(self.index.flatten(), return_inverse=True)
            lookup = torch.full((self.count.numel(),), -1, dtype=torch.int32)
            lookup[wanted] = torch.arange(wanted.numel(), dtype=torch.int32)
            row = lookup[self.pixels]
            keep = row >= 0
            vals = 1.0 / (self.count[self.pixels[keep]] + 1e-8)
            g = torch.sparse_coo_tensor(torch.stack([row[keep].long(), self.sources[keep]]), vals,
                                        (wanted.numel(), n_inst)).coalesce()
            pick = torch.sparse_coo_tensor(torch.stack([torch.arange(n_inst), inv]), torch.ones(n_inst),
                                           (n_inst, wanted.numel())).coalesce()
            self._sync_matrix = torch.sparse.mm(pick, g).coalesce()
        return self._sync_matrix

    def sync(self, xs: torch.Tensor, var_type: str = "tweedie") -> torch.Tensor:
        if not self.compact_sync:
            return super().sync(xs, var_type)
        n, c = xs.shape[:2]
        cache = self.__dict__.setdefault("_device_cache", {})
        key = ("sync", str(xs.device))
        if key not in cache:
            cache[key] = self.sync_matrix().to(xs.device)
        s = cache[key]
        flat = xs.transpose(0, 1).reshape(c, -1).T.float()  # [N s^2, C]
        out = torch.sparse.mm(s, flat).T.reshape(c, n, self.size, self.size).transpose(0, 1)
        return out.to(xs.dtype).contiguous()
