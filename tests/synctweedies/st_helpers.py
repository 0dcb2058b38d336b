"""Shared tiny pieces for the SyncTweedies tests: a float64 UNet eps-model and a DDIM scheduler."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DModel


def tiny_unet(channels: int = 3, out_channels: int | None = None, seed: int = 0) -> UNet2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(sample_size=16, in_channels=channels, out_channels=out_channels or channels,
                           block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    return unet.double().eval()


def eps_model(unet):
    @torch.no_grad()
    def denoiser(x, t, step=0):
        return unet(x, t).sample
    return denoiser


def ddim(steps: int = 5, **kw) -> DDIMScheduler:
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1, **kw)
    sched.set_timesteps(steps)
    return sched


def usage_error(argv, capsys) -> str:
    """Run the SyncTweedies CLI on `argv`; assert exit code 2 with one `error:` line; return that line."""
    import pytest

    from common.cli import run
    from synctweedies.main import main

    with pytest.raises(SystemExit) as e:
        run(main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    return err
