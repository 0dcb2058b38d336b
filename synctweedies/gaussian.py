"""3D Gaussian texturing as a SyncTweedies projection: canonical = per-Gaussian colours, instances = renders.

Several Gaussians blend into one pixel, so the projection is n-to-1 and has no closed-form inverse: g fits the
colours to the instances by Adam (geometry fixed), warm-started per quantity (`var_type`) with
--color_assign_method previous. This is the case where only Tweedie averaging (case 2) stays in distribution.
Canonical domain "latent": 4-channel features rendered straight into latent views; "rgb": colour logits
rendered through a sigmoid at RGB size, over the background colour, and VAE-encoded.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from common.pipelines.latents import decode_latents, encode_images
from common.render.cameras import Cameras
from common.render.gaussians import Gaussians, fit_colors, render_gaussians
from synctweedies.projection import Projection


def square_cameras(cameras: Cameras, size: int) -> Cameras:
    """The same cameras rendering size x size images (intrinsics scaled per axis)."""
    sx, sy = size / cameras.width, size / cameras.height
    return replace(cameras, fx=cameras.fx * sx, fy=cameras.fy * sy, cx=cameras.cx * sx, cy=cameras.cy * sy,
                   width=size, height=size)


class GaussianProjection(Projection):
    """Features z [G, C] (C = 3 rgb logits or the latent channels) <-> views [N, C_lat, s, s].

    latent_cameras / rgb_cameras: the dataset cameras at the latent and RGB view sizes; background_rgb [3] in
    [0, 1]; background_latent [C_lat] (the latent of a solid background image, spatial mean).
    """

    def __init__(self, gaussians: Gaussians, latent_cameras: Cameras, rgb_cameras: Cameras, *, domain: str = "rgb",
                 vae=None, background_rgb=(1.0, 1.0, 1.0), background_latent: torch.Tensor | None = None,
                 iterations: int = 1000, lr: float = 0.025, color_assign_method: str = "previous",
                 antialiased: bool = True, views_per_step: int = 1, force_clean_composition: bool = False,
                 generator: torch.Generator | None = None, chunk: int = 8):
        self.g, self.lat_cams, self.rgb_cams, self.domain, self.vae = gaussians, latent_cameras, rgb_cameras, domain, vae
        self.num_instances = len(latent_cameras)
        self.view_size = latent_cameras.width
        self.bg_rgb = torch.as_tensor(background_rgb, dtype=torch.float32)
        self.bg_latent = background_latent
        self.iterations, self.lr, self.assign = iterations, lr, color_assign_method
        self.antialiased, self.views_per_step, self.clean = antialiased, views_per_step, force_clean_composition
        self.generator, self.chunk = generator, chunk
        self.warm: dict[str, torch.Tensor] = {}  # var_type -> last fit (color_assign_method "previous")
        with torch.no_grad():
            self.alpha_rgb = self._render(rgb_cameras, torch.zeros(len(gaussians), 1), None)[1]  # [N, 1, S, S]
            self.alpha_lat = self._render(latent_cameras, torch.zeros(len(gaussians), 1), None)[1]

    def _render(self, cams: Cameras, feats: torch.Tensor, background):
        return render_gaussians(self.g, cams, feats.to(self.g.means), background, antialiased=self.antialiased)

    def canonical_shape(self, channels: int) -> tuple[int, ...]:
        return (len(self.g), 3 if self.domain == "rgb" else channels)

    def instance_shape(self, channels: int) -> tuple[int, ...]:
        return (self.num_instances, channels, self.view_size, self.view_size)

    def instance_init(self, channels: int) -> torch.Tensor:
        """color_assign_method "instance": the PLY's own colours (rgb domain, as logits); zeros for latents."""
        if self.domain == "rgb":
            return torch.logit(self.g.rgb.detach().clamp(1e-3, 1 - 1e-3))
        return torch.zeros(len(self.g), channels, device=self.g.means.device)

    def render_rgb(self, logits: torch.Tensor) -> torch.Tensor:
        """RGB logits [G, 3] -> views [N, 3, S, S] in [0, 1] over the background colour."""
        return self._render(self.rgb_cams, torch.sigmoid(logits.float()), self.bg_rgb)[0]

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.domain == "latent":
            bg = None if self.bg_latent is None else self.bg_latent.float()
            return self._render(self.lat_cams, z.float(), bg)[0].to(z.dtype)
        rgb = self.render_rgb(z) * 2 - 1
        vae = self.vae
        lat = torch.cat([encode_images(vae, v, sample=False) for v in rgb.to(vae.device, vae.dtype).split(self.chunk)])
        return lat.to(z.dtype)

    def targets(self, xs: torch.Tensor) -> tuple[torch.Tensor, Cameras, torch.Tensor, torch.Tensor | None]:
        """Instances -> (fit targets, cameras, alpha, background) in the canonical domain."""
        if self.domain == "latent":
            return xs.float(), self.lat_cams, self.alpha_lat, self.bg_latent
        with torch.no_grad():
            rgb = torch.cat([decode_latents(self.vae, x) for x in xs.split(self.chunk)]).float()
        return (rgb / 2 + 0.5).clamp(0.001, 0.999), self.rgb_cams, self.alpha_rgb, self.bg_rgb

    def fit(self, targets: torch.Tensor, cams: Cameras, alpha: torch.Tensor, background, iterations: int,
            init: torch.Tensor | None, activation: str) -> torch.Tensor:
        """Adam on the colour features against targets [N, C, H, W] (pixels the Gaussians cover)."""
        targets = targets.to(self.g.means.device)
        alpha = alpha.to(targets)
        if self.clean and background is not None:  # exact background where the render shows background
            targets = alpha * targets + (1 - alpha) * torch.as_tensor(background).to(targets).view(1, -1, 1, 1)
        with torch.enable_grad():
            return fit_colors(self.g, cams, targets, (alpha > 0.01).float(), iterations=iterations, lr=self.lr,
                              init=init, views_per_step=self.views_per_step, activation=activation,
                              background=None if background is None else torch.as_tensor(background).tolist(),
                              generator=self.generator, antialiased=self.antialiased)

    def _inverse(self, xs: torch.Tensor, var_type: str) -> torch.Tensor:
        targets, cams, alpha, bg = self.targets(xs)
        channels = targets.shape[1]
        init = None
        if self.assign == "previous":
            init = self.warm.get(var_type)
        elif self.assign == "instance":
            init = self.instance_init(channels)
        feats = self.fit(targets, cams, alpha, bg, self.iterations, init,
                         "sigmoid" if self.domain == "rgb" else "none")
        self.warm[var_type] = feats
        return feats.to(xs.dtype)
