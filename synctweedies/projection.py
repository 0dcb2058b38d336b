"""The projection interface every SyncTweedies application implements, and the simplest projections.

A projection links one canonical variable z (a wide image, a panorama, an anagram's true image; later a
UV texture or per-Gaussian colours) to N instance images the diffusion model can denoise:
  forward  f_i: z [K, C, *canonical] -> x [N, C, h, w]
  inverse  g  : x [N, C, h, w] -> z, a weighted average of per-instance back-projections
The sampler only ever calls `forward`, `inverse`, `sync` (= f(g(x)) with uncovered pixels kept),
`canonical_noise` and `begin_step`, so a mesh renderer or a Gaussian rasteriser fits without touching it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from diffusers.utils.torch_utils import randn_tensor

VAR_TYPES = ("latent", "eps", "tweedie", "variance")


class Projection(ABC):
    """Canonical <-> instance maps. Subclasses implement `_forward` and `_inverse`.

    `instance_mask()` says which instance pixels the canonical space covers ([N, 1, h, w] bool, or None when
    it covers all of them, e.g. crops and panoramas). Uncovered pixels (a mesh's background) keep the
    instance's own value when `forward` is given `bg`.
    """

    num_instances: int

    @abstractmethod
    def canonical_shape(self, channels: int) -> tuple[int, ...]:
        """Shape of z for `channels` channels, e.g. (1, C, H, W); (K, C, H, W) for an n-to-1 stack."""

    @abstractmethod
    def instance_shape(self, channels: int) -> tuple[int, ...]:
        """Shape of the stacked instances, (N, C, h, w)."""

    @abstractmethod
    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        """z -> [N, C, h, w] (uncovered pixels may hold anything; `forward` composites them)."""

    @abstractmethod
    def _inverse(self, xs: torch.Tensor, var_type: str) -> torch.Tensor:
        """[N, C, h, w] -> z (weighted average of the back-projections; uncovered canonical elements 0)."""

    def instance_mask(self) -> torch.Tensor | None:
        return None

    def begin_step(self, i: int, t: torch.Tensor, num_steps: int) -> None:
        """Called before every sampling step (a mesh projection changes its background colour here)."""

    def forward(self, z: torch.Tensor, bg: torch.Tensor | None = None) -> torch.Tensor:
        """f(z): [N, C, h, w]; where the canonical does not reach, the pixels of `bg` are kept."""
        x = self._forward(z)
        mask = self.instance_mask()
        if bg is None or mask is None:
            return x
        return torch.where(mask.to(x.device), x, bg)

    def inverse(self, xs: torch.Tensor, var_type: str = "tweedie") -> torch.Tensor:
        """g(x). `var_type` (latent | eps | tweedie | variance) lets an optimisation inverse keep warm starts."""
        if var_type not in VAR_TYPES:
            raise ValueError(f"var_type must be one of {VAR_TYPES}, got {var_type!r}")
        return self._inverse(xs, var_type)

    def sync(self, xs: torch.Tensor, var_type: str = "tweedie") -> torch.Tensor:
        """The synchronise operator f(g(x)) of the paper; pixels outside the canonical keep `xs`."""
        return self.forward(self.inverse(xs, var_type), bg=xs)

    def canonical_noise(self, channels: int, generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """z_T whose projections are unit Gaussians per pixel (N(0, I) in canonical space by default)."""
        return randn_tensor(self.canonical_shape(channels), generator=generator, device=torch.device(device),
                            dtype=dtype)


class IdentityProjection(Projection):
    """N copies of one image: f_i = id, g = mean. Every case reduces to plain sampling (a test oracle)."""

    def __init__(self, num_instances: int, height: int, width: int):
        self.num_instances, self.height, self.width = num_instances, height, width

    def canonical_shape(self, channels: int) -> tuple[int, ...]:
        return (1, channels, self.height, self.width)

    def instance_shape(self, channels: int) -> tuple[int, ...]:
        return (self.num_instances, channels, self.height, self.width)

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.expand(self.num_instances, *z.shape[1:]).clone()

    def _inverse(self, xs: torch.Tensor, var_type: str) -> torch.Tensor:
        return xs.mean(0, keepdim=True)


class GatherProjection(Projection):
    """A projection whose forward picks canonical elements: x_i[p] = z[index[i, p]] (crops, nearest sampling).

    Its inverse is the count-weighted average of every instance pixel that picked a canonical element
    (MultiDiffusion's window average); elements nobody picked stay 0. index: [N, h*w] into z.flatten(-2).
    """

    def __init__(self, index: torch.Tensor, canonical_hw: tuple[int, int], instance_hw: tuple[int, int]):
        self.index = index.long()
        self.num_instances = index.shape[0]
        self.canonical_hw, self.instance_hw = canonical_hw, instance_hw
        numel = canonical_hw[0] * canonical_hw[1]
        self.count = torch.zeros(numel).index_add_(0, self.index.flatten(), torch.ones(self.index.numel()))

    def canonical_shape(self, channels: int) -> tuple[int, ...]:
        return (1, channels, *self.canonical_hw)

    def instance_shape(self, channels: int) -> tuple[int, ...]:
        return (self.num_instances, channels, *self.instance_hw)

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = z[0].flatten(-2)  # [C, H*W]
        picked = flat[:, self.index.to(z.device).flatten()]  # [C, N*h*w]
        c = z.shape[1]
        return picked.view(c, self.num_instances, *self.instance_hw).transpose(0, 1).contiguous()

    def _inverse(self, xs: torch.Tensor, var_type: str) -> torch.Tensor:
        c = xs.shape[1]
        acc = torch.float64 if xs.device.type == "cpu" or xs.dtype != torch.float64 else xs.dtype
        # accumulating in float64 makes g(f(z)) == z exactly for float32/16 (k copies of x sum exactly)
        src = xs.transpose(0, 1).reshape(c, -1).to(acc)  # [C, N*h*w]
        buf = torch.zeros(c, self.count.numel(), device=xs.device, dtype=acc)
        buf.index_add_(1, self.index.to(xs.device).flatten(), src)
        count = self.count.to(xs.device, acc)
        buf = torch.where(count > 0, buf / count.clamp(min=1), buf)
        return buf.to(xs.dtype).view(1, c, *self.canonical_hw)
