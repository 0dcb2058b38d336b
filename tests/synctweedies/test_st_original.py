"""Where we differ from the original SyncTweedies, each flag that gives back the original's behaviour, and the
stage-II condition (the original's by default)."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from st_helpers import eps_model, tiny_unet
from synctweedies.anagram import StackProjection, ViewProjection
from synctweedies.apps.ambiguous_image import apply_as_original, stage2_condition
from synctweedies.config import ambiguous_parser
from synctweedies.sampler import SyncOptions, sync_sample
from synctweedies.steps import SyncStepper
from synctweedies.views import get_views


def _sched(thresholding: bool) -> DDIMScheduler:
    s = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                      thresholding=thresholding, sample_max_value=0.5, dynamic_thresholding_ratio=0.9)
    s.set_timesteps(3)
    return s


def test_x0_thresholding_off_never_thresholds_like_the_original():
    """IF's scheduler config thresholds x0|t; with threshold_x0=False the run equals one on a config without it."""
    unet = tiny_unet()
    proj = ViewProjection(get_views(["identity", "flip"]), 8)
    x_T = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    run = lambda sched, th: sync_sample(eps_model(unet), sched, proj, x_T=x_T, progress=False,
                                        options=SyncOptions(case_num=2, threshold_x0=th)).instances
    plain = run(_sched(False), True)
    assert torch.equal(run(_sched(True), False), plain)
    assert not torch.allclose(run(_sched(True), True), plain)
    big = torch.full((1, 3, 4, 4), 5.0)
    assert torch.equal(SyncStepper(_sched(True), threshold=False).clip_x0(big), big)
    assert SyncStepper(_sched(True)).clip_x0(big).abs().max() <= 1.0  # dynamic thresholding: s >= 1


def test_inverse_warm_start_noise_and_zero():
    """0 Adam steps return the warm start: zeros (ours) or a N(0, I) stack from the generator (original)."""
    views = get_views(["identity", "rotate_cw"])
    x = torch.randn(2, 3, 8, 8)
    zero = StackProjection(views, 8, num_of_zs=3, iterations=0).inverse(x, "latent")
    assert torch.equal(zero, torch.zeros(3, 3, 8, 8))
    noisy = StackProjection(views, 8, num_of_zs=3, iterations=0, warm_start="noise",
                            generator=torch.Generator().manual_seed(5)).inverse(x, "latent")
    assert torch.equal(noisy, torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5)))


def test_inverse_lr_schedule_constant_vs_cosine():
    """Adam's steps have size lr when the gradient sign stays: 2 steps from 0 towards 10 reach 2 lr (constant,
    the original) or lr + lr/2 (cosine-annealed over 2 steps)."""
    views = get_views(["identity"])
    target = torch.full((1, 1, 4, 4), 10.0)
    const = StackProjection(views, 4, num_of_zs=1, iterations=2, lr=0.1, lr_schedule="constant").inverse(target)
    cos = StackProjection(views, 4, num_of_zs=1, iterations=2, lr=0.1).inverse(target)
    assert torch.allclose(const, torch.full_like(const, 0.2), atol=1e-5)
    assert torch.allclose(cos, torch.full_like(cos, 0.15), atol=1e-5)


def test_stack_noise_scale():
    """sqrt_k: members of variance K, their mean (what f sees) unit; one (original): unit members."""
    views = get_views(["identity"])
    k = 16
    ours = StackProjection(views, 32, num_of_zs=k).canonical_noise(3, torch.Generator().manual_seed(0))
    orig = StackProjection(views, 32, num_of_zs=k, noise_scale="one").canonical_noise(
        3, torch.Generator().manual_seed(0))
    assert torch.allclose(ours, orig * k ** 0.5)
    assert 0.9 < orig.std() < 1.1 and 0.9 < ours.mean(0).std() < 1.1
    assert 0.2 < orig.mean(0).std() < 0.3  # 1 / sqrt(16)


def test_as_original_sets_every_listed_flag():
    args = ambiguous_parser().parse_args(["--app", "ambiguous_image", "--tag", "t", "--as_original"])
    apply_as_original(args)
    assert (args.x0_thresholding, args.inverse_warm_start, args.inverse_lr_schedule, args.stack_noise_scale) == \
        ("off", "noise", "constant", "one")
    assert args.stage2_condition == "own_view"  # the default is already the original's
    defaults = ambiguous_parser().parse_args(["--app", "ambiguous_image", "--tag", "t"])
    apply_as_original(defaults)
    assert (defaults.x0_thresholding, defaults.inverse_warm_start) == ("scheduler", "zero")


def test_stage2_condition_own_view_is_each_views_upscaled_stage1_view():
    """own_view: view i's condition depends on stage-I view i only, no noise (so a rotate_cw anagram's two
    conditions are exact 90-degree turns of each other and stay inside the stage-I range); canonical: noised."""
    views = get_views(["identity", "rotate_cw"])
    canon = torch.rand(1, 3, 16, 16) * 2 - 1
    stage1 = ViewProjection(views, 16).forward(canon)
    g = torch.Generator().manual_seed(0)
    cond = stage2_condition(None, stage1, canon, views, 64, 50, g, "own_view")
    assert cond.shape == (2, 3, 64, 64)
    assert torch.allclose(cond[1], torch.rot90(cond[0], -1, (1, 2)), atol=1e-6)
    assert cond.min() >= stage1.min() - 1e-6 and cond.max() <= stage1.max() + 1e-6
    assert torch.allclose(cond[:, :, ::21, ::21], stage1[:, :, ::5, ::5], atol=1e-6)  # corners of the grid
    alone = stage2_condition(None, stage1[:1], canon, views[:1], 64, 50, g, "own_view")
    assert torch.equal(alone[0], cond[0])
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # no noise drawn

    class Noising:
        image_noising_scheduler = __import__("diffusers").DDPMScheduler(num_train_timesteps=1000)

    noised = stage2_condition(Noising(), stage1, canon, views, 64, 50, torch.Generator().manual_seed(0),
                              "canonical")
    assert (noised - cond).abs().mean() > 0.05


@pytest.mark.parametrize("flag", ["--x0_thresholding", "--inverse_warm_start", "--stack_noise_scale",
                                  "--stage2_condition", "--inverse_lr_schedule"])
def test_flags_reject_unknown_values(flag):
    from common.errors import UsageError

    with pytest.raises(UsageError, match=flag.lstrip("-")):
        ambiguous_parser().parse_args(["--app", "ambiguous_image", "--tag", "t", flag, "bogus"])
