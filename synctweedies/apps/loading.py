"""The one Stable Diffusion loader of the SD-based apps (wide image, panorama, mesh, Gaussians).

Each app used to carry its own copy: resolve the model flag, load the pipeline (with a ControlNet when the
app conditions on geometry), check the family, apply --adapters and switch to DDIM timesteps.
"""
from __future__ import annotations

import argparse

from diffusers import DDPMScheduler

from common.errors import UsageError
from common.models.adapters import apply_adapters
from common.models.loading import load_controlnet, load_pipeline, pipeline_family
from common.models.presets import is_tiny
from common.pipelines.text2image import use_ddim


def load_sd(args: argparse.Namespace, device, dtype, *, original: str, controlnet: str | None = None,
            what: str = "this app"):
    """(pipe, controlnet or None). `original`: the --model value that means "use --sd_path" (sd / controlnet);
    `controlnet`: a ControlNet spec to load (tiny presets pair with tiny-controlnet), None for plain SD."""
    spec = args.sd_path if args.model == original else args.model
    net = None
    if controlnet is not None:
        from diffusers import StableDiffusionControlNetPipeline

        net = load_controlnet("tiny-controlnet" if is_tiny(spec) else controlnet, torch_dtype=dtype).to(device)
        pipe = load_pipeline(spec, StableDiffusionControlNetPipeline, torch_dtype=dtype, device=device,
                             controlnet=net)
    else:
        pipe = load_pipeline(spec, torch_dtype=dtype, device=device)
    if pipeline_family(pipe) != "sd":
        raise UsageError(f"{what} needs a Stable Diffusion 1.x/2.x model, got {spec}")
    apply_adapters(pipe, args.adapters)
    use_ddim(pipe, keep=(DDPMScheduler,))  # DDIM timesteps for the synchronised steps
    return pipe, net
