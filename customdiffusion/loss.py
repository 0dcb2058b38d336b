"""Custom Diffusion's training loss: the masked instance loss plus the weighted prior-preservation loss.

Two normalisations of the instance term (`--loss_normalization`), both masked means over the latent cells
the augmentation kept (mask = 1):
* "paper" (default): sum(M * err^2) / (C * sum(M)) -- a mean over kept cells *and* channels, the same
  per-element scale as the prior term (a plain MSE), so `--prior_loss_weight 1` is the paper's 1:1 balance of
  instance and regularisation images (the LDM code mixes both kinds in one batch under one formula);
* "diffusers": sum(M * err^2) / sum(M) with the one-channel mask M, as diffusers' `train_custom_diffusion.py`
  writes it -- C (= 4 latent channels) times the paper value, so there the prior weighs 4x less.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import UsageError
from common.train.diffusion import masked_mse

LOSS_NORMALIZATIONS = ("paper", "diffusers")


def instance_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                  normalization: str = "paper") -> torch.Tensor:
    """pred, target: [B, C, h, w]; mask: [B, 1, h, w] of 0/1 -> per-sample masked mean, averaged over the batch."""
    if normalization == "paper":
        return masked_mse(pred, target, mask)
    if normalization == "diffusers":
        err = (pred.float() - target.float()) ** 2
        m = mask.to(err.dtype)
        return ((err * m).sum((1, 2, 3)) / m.sum((1, 2, 3)).clamp_min(1)).mean()
    raise UsageError(f"--loss_normalization must be one of {', '.join(LOSS_NORMALIZATIONS)}, got {normalization!r}")


def custom_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, num_instance: int, *,
                          prior_loss_weight: float = 1.0, with_prior: bool = False,
                          normalization: str = "paper") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch is [instances; class images] (class rows only `with_prior`); pred/target [B, C, h, w], mask
    [B, 1, h, w]. Returns (instance + prior_loss_weight * MSE(class rows), {"instance", "prior"} parts)."""
    n = num_instance
    inst = instance_loss(pred[:n], target[:n], mask[:n], normalization)
    if not with_prior:
        return inst, {}
    prior = F.mse_loss(pred[n:].float(), target[n:].float())
    return inst + prior_loss_weight * prior, {"instance": inst.detach(), "prior": prior.detach()}
