"""MuDI's losses (spec §1.2): the Seg-Mix-masked diffusion MSE and DCO against the same network with its LoRA off.

    L_model = mean(M ⊙ (eps_theta - target)^2)      over ALL elements (mask [B, 1, h, w] broadcast over channels)
    L_ref   = mean(M ⊙ (eps_ref   - target)^2)      eps_ref: LoRA disabled, no gradient
    DCO     = -log sigmoid(-beta (L_model - L_ref)) = softplus(beta (L_model - L_ref))

As the released code, the difference is taken between batch means (one sigmoid per micro-batch). At LoRA
init (B = 0) L_model = L_ref, the loss is log 2 and the gradient (beta / 2) dL_model/dtheta.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean(mask * (pred - target)^2) over every element; pred/target [B, C, h, w], mask [B, 1, h, w] or None."""
    err = (pred.float() - target.float()) ** 2
    if mask is not None:
        err = err * mask.to(err)
    return err.mean()


def dco_loss(model_loss: torch.Tensor, ref_loss: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(-beta (L_model - L_ref)) written as the original (= softplus(beta diff), which rounds
    differently in the last bit); the reference term carries no gradient."""
    diff = model_loss - ref_loss.detach()
    return -1 * F.logsigmoid(-1 * beta * diff)
