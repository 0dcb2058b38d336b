"""The synchronized sampler: steps equal diffusers', identity views reduce every case to plain DDIM, case 2
keeps the instance state, mvd_end switches synchronisation off, and runs are deterministic."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).parent))
from st_helpers import ddim, eps_model, tiny_unet  # noqa: E402

from common.pipelines.loop import sample  # noqa: E402
from synctweedies.projection import IdentityProjection  # noqa: E402
from synctweedies.sampler import SyncOptions, sync_sample  # noqa: E402
from synctweedies.steps import SyncStepper  # noqa: E402
from synctweedies.anagram import ViewProjection
from synctweedies.views import get_views  # noqa: E402


def test_ddim_step_equals_diffusers_for_every_t_and_eta():
    sched = ddim(10)
    stepper = SyncStepper(sched, "ddim")
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        x, eps, noise = (torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
        ref = sched.step(eps, t, x, return_dict=False)[0]
        # float32 coefficients in the original's (xt_coeff, x0_coeff) form: equal to diffusers up to their rounding
        # (exact equality with the original's formula: test_st_original_loop.py)
        assert torch.allclose(stepper.step(eps, t, x)[0], ref, atol=1e-5, rtol=0)
        ref = sched.step(eps, t, x, eta=0.7, variance_noise=noise, return_dict=False)[0]
        ours = SyncStepper(sched, "ddim", eta=0.7).step(eps, t, x, variance_noise=noise)[0]
        assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_step_equals_diffusers(variance_type):
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type=variance_type, clip_sample=False)
    sched.set_timesteps(10)
    stepper = SyncStepper(sched, "ddpm")
    for t in sched.timesteps:
        x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(int(t)))
        out = torch.randn(1, 6 if variance_type == "learned_range" else 3, 8, 8, dtype=torch.float64)
        out[:, 3:] = out[:, 3:].clamp(-1, 1)
        ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(1), return_dict=False)[0]
        ours = stepper.step(out, t, x, generator=torch.Generator().manual_seed(1))[0]
        # the original takes fixed_small's std as exp(0.5 log var) (fixed_small_log): equal up to float32 rounding
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", range(7))
def test_identity_views_reduce_every_case_to_plain_ddim(case):
    unet, sched = tiny_unet(), ddim(4)
    z_T = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    plain = sample(eps_model(unet), sched, z_T, progress=False)
    proj = IdentityProjection(3, 16, 16)
    res = sync_sample(eps_model(unet), sched, proj, options=SyncOptions(case_num=case), z_T=z_T, progress=False)
    # diffusers' DDIM vs the original's (xt_coeff, x0_coeff) form: float32 coefficient rounding only
    assert (res.canonical - plain).abs().max() <= 1e-5
    assert (res.instances - plain).abs().max() <= 1e-5


def test_permutation_equivalence_of_cases_1_to_5():
    unet, sched = tiny_unet(), ddim(4)
    rot = lambda x: torch.rot90(x, -1, (-2, -1))
    unrot = lambda x: torch.rot90(x, 1, (-2, -1))
    base = eps_model(unet)

    def equivariant(x, t, step=0):  # view 2 runs R eps(R^-1 x), so all cases agree
        return torch.cat([base(x[:1], t), rot(base(unrot(x[1:]), t))])

    proj = ViewProjection(get_views(["identity", "rotate_cw"]), 16)
    z_T = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    outs = [sync_sample(equivariant, sched, proj, options=SyncOptions(case_num=c), z_T=z_T, progress=False).canonical
            for c in (1, 2, 3, 4, 5)]
    for o in outs[1:]:
        assert (o - outs[0]).abs().max() <= 1e-6


def test_case2_keeps_instance_state():
    from synctweedies.wide import WindowProjection

    unet, sched = tiny_unet(), ddim(4)
    proj = WindowProjection(16, 24, window=16, stride=8)  # 2 windows; columns 0-7 only in window 0
    stepper = SyncStepper(sched)
    t = sched.timesteps[1]
    x_t = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    den = eps_model(unet)

    def one_step(x):
        return sample(den, stepper, x, [t], hooks=[_case_hook(proj, stepper)], progress=False, need_x0=True)

    out = one_step(x_t)
    from common.pipelines.tweedie import to_x0
    x0 = to_x0(sched, den(x_t, t), x_t, t, 0)
    ref = stepper.step_x0(x_t, proj.sync(x0), t)
    assert (out - ref).abs().max() <= 1e-10
    assert (out - stepper.step_x0(proj.sync(x_t, "latent"), proj.sync(x0), t)).abs().max() > 1e-3
    # instance 1's state is its own: bumping x_t^1 in the overlap moves x_{t'}^1 by c_x * bump there, not half
    bumped = x_t.clone()
    bumped[1, :, :, :8] += 1e-3
    c = stepper.coefficients(t, x_t)
    c_x = ((1 - c.abar_prev) / (1 - c.abar_t)).sqrt()
    x0b = to_x0(sched, den(bumped, t), bumped, t, 0)
    moved = one_step(bumped)[1] - stepper.step_x0(x_t[1:], proj.sync(x0b)[1:], t)[0]
    assert torch.allclose(moved[:, :, :8], torch.full_like(moved[:, :, :8], 1e-3) * c_x, atol=1e-10)


def _case_hook(proj, stepper, case=2, mvd_end=1.0):
    from synctweedies.cases import get_case
    from synctweedies.sampler import SyncHook
    return SyncHook(proj, get_case(case), stepper, mvd_end)


def test_mvd_end_switch():
    unet, sched = tiny_unet(), ddim(4)
    proj = ViewProjection(get_views(["identity", "flip"]), 16)
    x_T = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    none = sync_sample(eps_model(unet), sched, proj, options=SyncOptions(case_num=2, mvd_end=0.0), x_T=x_T,
                       progress=False)
    plain = sync_sample(eps_model(unet), sched, proj, options=SyncOptions(case_num=0), x_T=x_T, progress=False)
    assert none.synced_steps == [] and torch.equal(none.instances, plain.instances)
    full = sync_sample(eps_model(unet), sched, proj, options=SyncOptions(case_num=2, mvd_end=1.0), x_T=x_T,
                       progress=False)
    assert full.synced_steps == [0, 1, 2, 3]
    half = sync_sample(eps_model(unet), sched, proj, options=SyncOptions(case_num=2, mvd_end=0.5), x_T=x_T,
                       progress=False)
    assert half.synced_steps == [i for i, t in enumerate(sched.timesteps) if t > 500]


def test_determinism_and_eta():
    """Same seed -> same output; eta = 0 draws no noise (any generator gives the same result), eta = 1 draws it
    from the generator (another seed changes the result) and moves away from the eta = 0 path."""
    unet, sched = tiny_unet(), ddim(3)
    proj = ViewProjection(get_views(["identity", "rotate_180"]), 16)
    z_T = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def run(eta, seed):
        return sync_sample(eps_model(unet), sched, proj, generator=torch.Generator().manual_seed(seed),
                           options=SyncOptions(case_num=5, eta=eta), z_T=z_T, progress=False).canonical

    assert torch.equal(run(1.0, 0), run(1.0, 0))
    assert torch.equal(run(0.0, 0), run(0.0, 1))
    assert not torch.allclose(run(1.0, 0), run(1.0, 1))
    assert (run(1.0, 0) - run(0.0, 0)).abs().mean() > 1e-3


def test_cfg_scale_one_is_the_conditional_branch_and_order_is_negative_positive():
    """Spec 20 on tiny-sd: guidance 1 gives the conditional prediction alone; guidance s gives
    u + s (c - u) with u from the negative prompt and c from the positive one (chunk order [negative, positive])."""
    from common.models.loading import load_pipeline
    from common.pipelines.text2image import prepare

    pipe = load_pipeline("tiny-sd", torch_dtype=torch.float32, device="cpu")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)

    def branch(prompt):
        emb = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        return pipe.unet(x, t, encoder_hidden_states=emb).sample

    cond, uncond = branch("a red cube"), branch("blurry")
    one = prepare(pipe, ["a red cube"], ["blurry"], num_inference_steps=2, guidance_scale=1.0)
    assert torch.allclose(one.denoiser(x, t, 0), cond, atol=1e-5)
    four = prepare(pipe, ["a red cube"], ["blurry"], num_inference_steps=2, guidance_scale=4.0)
    assert torch.allclose(four.denoiser(x, t, 0), uncond + 4.0 * (cond - uncond), atol=1e-4)
    assert not torch.allclose(cond, uncond, atol=1e-4)


class _Upsample2(IdentityProjection):
    """Spec 21's toy 1-to-n map: canonical 8x8 -> one 16x16 instance by nearest x2; g = 2x2 average."""

    def __init__(self):
        super().__init__(1, 8, 8)

    def instance_shape(self, channels):
        return (1, channels, 16, 16)

    def _forward(self, z):
        return torch.nn.functional.interpolate(z, scale_factor=2, mode="nearest")

    def _inverse(self, xs, var_type):
        return torch.nn.functional.avg_pool2d(xs, 2)


def test_spec21_variance_claim_measured_on_the_toy_1_to_n_map():
    """Spec 21 expects the canonical cases' z_0 to vary less over seeds than case 2's (ratio < 0.9). On its toy
    (nearest x2 up, 2x2 average, eps Tweedie-consistent with x0 ~ N(0, I): eps = sigma_t x_t) it does not hold:
    a pointwise denoiser gives the duplicated pixels of f(z_t) identical predictions, so g loses nothing in the
    canonical cases (z_0 std ~0.88 over 24 seeds, 20 steps) while case 2's readout g(X_0) averages four
    independent instance pixels (std ~0.45): measured ratio 1.95. With X_T = f(z_T) case 2 keeps the duplicates
    equal and matches case 5 exactly. The shrinkage the paper describes needs a network with spatial context."""
    sched = ddim(10)

    def eps(x, t, step=0):
        return (1 - sched.alphas_cumprod[int(t)].double()).sqrt() * x

    def spread(case, from_z=False):
        outs = []
        for seed in range(12):
            g = torch.Generator().manual_seed(seed)
            x_T = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=g)
            outs.append(sync_sample(eps, sched, _Upsample2(), x_T=x_T, generator=g, progress=False,
                                    dtype=torch.float64, options=SyncOptions(case_num=case,
                                                                             initialize_xt_from_zt=from_z)).canonical)
        return torch.stack(outs)

    two, four, five = spread(2), spread(4), spread(5)
    ratio = five.std(0).mean() / two.std(0).mean()
    assert ratio > 1.5  # the opposite of the spec's < 0.9
    assert torch.allclose(four, five)  # eps and x0 averaging agree when duplicates are identical
    assert torch.allclose(spread(2, from_z=True), five, atol=1e-10)
