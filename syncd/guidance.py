"""SynCD's guidance (§3.3): plain true CFG, or the normalised image/text guidance whose base is the
image-conditional prediction e_i and whose two directions are clipped to the smaller norm (per sample)."""
from __future__ import annotations

import torch


def true_cfg(e_u: torch.Tensor, e_c: torch.Tensor, scale: float) -> torch.Tensor:
    return e_u + scale * (e_c - e_u)


def normalized_guidance(e_u: torch.Tensor, e_i: torch.Tensor, e_c: torch.Tensor, s_txt: float, s_img: float
                        ) -> torch.Tensor:
    """e_i + s_img d_img + s_txt d_txt with d_img = e_i - e_u, d_txt = e_c - e_i, each scaled down to
    r = min(||d_img||, ||d_txt||) (L2 over all but the batch axis). Tensors [B, ...]."""
    d_img, d_txt = e_i - e_u, e_c - e_i
    norm = lambda d: d.norm(p=2, dim=list(range(1, d.ndim)), keepdim=True)  # pipeline.py: dim=[-1, -2] of [B, L, C]
    n_img, n_txt = norm(d_img), norm(d_txt)
    r = torch.minimum(n_img, n_txt)
    scale = lambda n: torch.where(n > 0, torch.clamp(r / n.clamp_min(1e-30), max=1.0), torch.ones_like(n))
    d_txt, d_img = d_txt * scale(n_txt), d_img * scale(n_img)  # the original's operation order, bit for bit
    return e_i + s_img * d_img + s_txt * d_txt


def image_guidance_scale_at(t: float, s0: float, s_adapt: float) -> float:
    """SDXL sampler's time-varying image scale s_img(t) = s0 + s_adapt (1000 - t) / 1000."""
    return s0 + s_adapt * (1000.0 - float(t)) / 1000.0
