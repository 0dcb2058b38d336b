"""Set-ups that only real checkpoints exercise: PNDM schedulers, RGB canonical noise, average_rgb start state."""
from __future__ import annotations

import pytest
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from common.cli import parse_args
from common.errors import UsageError
from common.models.tiny import build_tiny
from common.pipelines.text2image import use_ddim
from synctweedies.config import gs_parser


def test_pndm_checkpoints_get_evenly_spaced_ddim_timesteps():
    pipe = build_tiny("tiny-sd")
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.scheduler.set_timesteps(30)
    assert len(pipe.scheduler.timesteps) != len(set(pipe.scheduler.timesteps.tolist()))  # PLMS repeats one
    use_ddim(pipe, keep=(DDPMScheduler,))
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.scheduler.set_timesteps(30)
    ts = pipe.scheduler.timesteps.tolist()
    assert len(ts) == len(set(ts)) == 30 and pipe.scheduler.config.steps_offset == 1
    ddpm = build_tiny("tiny-if")
    before = ddpm.scheduler
    use_ddim(ddpm, keep=(DDPMScheduler,))
    assert ddpm.scheduler is before  # DDPM (IF) stays


@pytest.mark.parametrize("case,ok", [("2", True), ("5", False)])
def test_gs_canonical_cases_need_the_latent_domain(case, ok):
    from synctweedies.apps.gs import validate

    args = parse_args(gs_parser(), ["--app", "gs", "--save_top_dir", "o", "--tag", "t", "--prompt", "p",
                                    "--plyfile", "x.ply", "--source_path", "s", "--case_num", case,
                                    "--canonical_domain", "rgb"])
    if ok:
        validate(args)
    else:
        with pytest.raises(UsageError, match="--canonical_domain latent"):
            validate(args)


def test_average_rgb_with_shared_initial_noise_runs_from_latent_noise(tmp_path, monkeypatch):
    """--average_rgb --initialize_xt_from_zt: X_T comes from latent-pano noise (not a VAE encoding of RGB noise)."""
    from test_st_cli import PANO

    import synctweedies.apps.panorama as pano_app
    from synctweedies.main import main

    seen = {}
    real = pano_app.sample_with_view_attention

    def spy(*args, **kwargs):
        seen["x_T"], seen["init"] = kwargs["x_T"], args[3].initialize_xt_from_zt
        return real(*args, **kwargs)

    monkeypatch.setattr(pano_app, "sample_with_view_attention", spy)
    main([*PANO, "--tag", "avg", "--save_top_dir", str(tmp_path), "--model", "tiny-sd", "--average_rgb",
          "--initialize_xt_from_zt"])
    x_T = seen["x_T"]
    assert not seen["init"] and abs(float(x_T.std()) - 1) < 0.3 and abs(float(x_T.mean())) < 0.3
