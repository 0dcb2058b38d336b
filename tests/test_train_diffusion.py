"""The shared denoising objective: targets per parameterisation, masked loss, and a tiny-sd UNet learns."""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from common.models.tiny import build_tiny
from common.train.diffusion import masked_mse, noise_latents


def test_epsilon_and_v_targets_reconstruct_x0():
    x0 = torch.randn(3, 4, 8, 8)
    for kind in ["epsilon", "v_prediction"]:
        sched = DDPMScheduler(prediction_type=kind)
        nb = noise_latents(sched, x0, torch.Generator().manual_seed(0))
        abar = sched.alphas_cumprod[nb.t].view(-1, 1, 1, 1)
        assert torch.allclose(nb.x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * nb.noise, atol=1e-5)
        if kind == "v_prediction":
            assert torch.allclose(abar.sqrt() * nb.x_t - (1 - abar).sqrt() * nb.target, x0, atol=1e-4)
        else:
            assert torch.equal(nb.target, nb.noise)


def test_flow_matching_target_is_velocity():
    x0 = torch.randn(2, 4, 8, 8)
    nb = noise_latents(FlowMatchEulerDiscreteScheduler(), x0, torch.Generator().manual_seed(0))
    s = (nb.t / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(nb.x_t - s * nb.target, x0, atol=1e-5)


def test_masked_mse_ignores_masked_cells_per_sample():
    pred, target = torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    target[0, :, 0, 0] = 100.0  # error only where sample 0 is masked out
    target[1] = 1.0
    mask = torch.ones(2, 1, 4, 4)
    mask[0, :, 0, 0] = 0
    mask[1, :, 2:, :] = 0
    assert torch.isclose(masked_mse(pred, target, mask), torch.tensor(0.5))  # (0 + 1) / 2
    assert torch.isclose(masked_mse(pred, target), ((pred - target) ** 2).mean())


def test_a_few_steps_lower_the_loss_of_a_tiny_unet_on_a_fixed_batch():
    pipe = build_tiny("tiny-sd")
    unet, sched = pipe.unet.train(), DDPMScheduler.from_config(pipe.scheduler.config)
    latents, ctx = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 77, 32)
    params = [p for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]
    unet.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-2)

    def loss_at(seed):
        nb = noise_latents(sched, latents, torch.Generator().manual_seed(seed))
        return masked_mse(unet(nb.x_t, nb.t, ctx).sample, nb.target)

    with torch.no_grad():
        before = loss_at(0).item()
    for _ in range(10):
        opt.zero_grad()
        loss_at(0).backward()
        opt.step()
    with torch.no_grad():
        assert loss_at(0).item() < before
