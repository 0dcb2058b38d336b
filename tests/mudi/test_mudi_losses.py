"""MuDI losses (spec §5 tests 10, 11, 13, 14): DCO against the LoRA-free network, masked MSE."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.train.lora import add_lora, lora_disabled
from mudi.losses import dco_loss, masked_mean_mse
from mudi.segmix import loss_mask_map
from mudi.train import MUDI_TARGET_MODULES


@pytest.fixture(scope="module")
def lora_unet():
    """tiny-sdxl's UNet with a fresh MuDI LoRA, plus one fixed input."""
    from common.models.tiny import build_tiny

    unet = build_tiny("tiny-sdxl").unet
    torch.manual_seed(0)
    params = add_lora(unet, 4, target_modules=MUDI_TARGET_MODULES)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(sample=torch.randn(2, 4, 8, 8, generator=gen), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 77, 64, generator=gen),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=gen),
                                     "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2).float()})
    target = torch.randn(2, 4, 8, 8, generator=gen)
    mask = torch.rand(2, 1, 8, 8, generator=gen)
    return unet, params, inputs, target, mask


def _losses(unet, inputs, target, mask):
    pred = unet(**inputs).sample
    with torch.no_grad(), lora_disabled(unet):
        ref = unet(**inputs).sample
    return pred, ref, masked_mean_mse(pred, target, mask), masked_mean_mse(ref, target, mask)


def test_dco_at_init_is_log2(lora_unet):
    """(10) B = 0: eps_theta equals the LoRA-off eps_ref, loss = log 2."""
    unet, _, inputs, target, mask = lora_unet
    pred, ref, lm, lr = _losses(unet, inputs, target, mask)
    assert (pred - ref).abs().max() < 1e-6
    assert dco_loss(lm, lr, 1000.0).item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("beta", [1000.0, 5.0])
def test_dco_gradient(lora_unet, beta):
    """(11) dDCO/dtheta = beta sigmoid(beta (L - L_ref)) dL/dtheta; at init the factor is beta / 2."""
    unet, params, inputs, target, mask = lora_unet
    with torch.no_grad():
        saved = [p.clone() for p in params]
        if beta != 1000.0:  # move away from init so L != L_ref
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    try:
        _, _, lm, lr = _losses(unet, inputs, target, mask)
        g_dco = torch.autograd.grad(dco_loss(lm, lr, beta), params)
        _, _, lm2, _ = _losses(unet, inputs, target, mask)
        g_mse = torch.autograd.grad(lm2, params)
        factor = beta * torch.sigmoid(beta * (lm - lr)).item()
        if beta == 1000.0:
            assert factor == pytest.approx(beta / 2)
        else:
            assert abs(lm.item() - lr.item()) > 1e-4
        for a, b in zip(g_dco, g_mse):
            want = factor * b
            torch.testing.assert_close(a, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def test_masked_mse_is_the_plain_mean():
    """(13) mean over all elements of mask * (pred - target)^2 (the mask broadcast over channels)."""
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    mask = torch.rand(3, 1, 8, 8, generator=gen)
    expected = (mask.expand(3, 4, 8, 8) * (pred - target) ** 2).sum() / (3 * 4 * 8 * 8)
    assert masked_mean_mse(pred, target, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    assert masked_mean_mse(pred, target).item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-6)


def test_hard_mask_ignores_background():
    """(14) soft_alpha 0: changing the target in background cells leaves the loss unchanged."""
    merged = np.zeros((64, 64), bool)
    merged[8:40, 16:48] = True
    mask = loss_mask_map(merged, 8, 0.0)[None]
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    perturbed = target.clone()
    background = (mask == 0).expand_as(target)
    assert background.any()
    perturbed[background] += 5.0
    assert masked_mean_mse(pred, perturbed, mask) == masked_mean_mse(pred, target, mask)
    assert masked_mean_mse(pred, perturbed, loss_mask_map(merged, 8, 0.3)[None]) != masked_mean_mse(pred, target, mask)
