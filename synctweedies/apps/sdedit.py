"""SDEdit start shared by the panorama and mesh apps: encode the given views, noise them to the start step.

--sdedit_timestep s picks the start index round(s * S) of the S-step schedule (capped at the last step):
0 = start at the first timestep (the views noised to t_1 ~ T, i.e. a full generation), 1 = only the last
step runs, from the views noised to the last timestep (close to no change).
"""
from __future__ import annotations

import torch

from common.pipelines.latents import encode_images
from synctweedies.cases import get_case


def sdedit_start(pipe, views: torch.Tensor, latent_proj, setup, generator, *, sdedit_timestep: float,
                 max_batch_size: int, initialize_xt_from_zt: bool, case_num: int):
    """views [N, 3, S, S] in [-1, 1] -> (timesteps to run, x_t [N, C, h, w], z_t or None for instance cases).

    The noise is setup.x_T, or with --initialize_xt_from_zt the projection of canonical noise (over x_T where the
    canonical does not reach)."""
    views = views.to(setup.x_T.device, setup.x_T.dtype)
    with torch.no_grad():
        x0 = torch.cat([encode_images(pipe.vae, v, generator) for v in views.split(max_batch_size)])
    start = min(int(round(sdedit_timestep * len(setup.timesteps))), len(setup.timesteps) - 1)
    timesteps = setup.timesteps[start:]
    noise = setup.x_T
    if initialize_xt_from_zt:
        z = latent_proj.canonical_noise(x0.shape[1], generator, x0.device, x0.dtype)
        noise = latent_proj.forward(z, bg=setup.x_T)
    x_t = pipe.scheduler.add_noise(x0, noise, timesteps[0].reshape(1))
    z_t = latent_proj.inverse(x_t, "latent") if get_case(case_num).canonical else None
    return timesteps, x_t, z_t
