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
        assert torch.allclose(stepper.step(eps, t, x)[0], ref, atol=1e-10, rtol=0)
        ref = sched.step(eps, t, x, eta=0.7, variance_noise=noise, return_dict=False)[0]
        ours = SyncStepper(sched, "ddim", eta=0.7).step(eps, t, x, variance_noise=noise)[0]
        assert torch.allclose(ours, ref, atol=1e-10, rtol=0)


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
        assert torch.allclose(ours, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", range(7))
def test_identity_views_reduce_every_case_to_plain_ddim(case):
    unet, sched = tiny_unet(), ddim(4)
    z_T = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    plain = sample(eps_model(unet), sched, z_T, progress=False)
    proj = IdentityProjection(3, 16, 16)
    res = sync_sample(eps_model(unet), sched, proj, options=SyncOptions(case_num=case), z_T=z_T, progress=False)
    assert (res.canonical - plain).abs().max() <= 1e-10
    assert (res.instances - plain).abs().max() <= 1e-10


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
    assert half.synced_steps == [i for i, t in enumerate(sched.timesteps) if t >= 500]


def test_determinism_and_eta():
    unet, sched = tiny_unet(), ddim(3)
    proj = ViewProjection(get_views(["identity", "rotate_180"]), 16)
    run = lambda: sync_sample(eps_model(unet), sched, proj, generator=torch.Generator().manual_seed(0),
                              options=SyncOptions(case_num=5, eta=1.0), channels=3, dtype=torch.float64,
                              progress=False).canonical
    assert torch.equal(run(), run())
