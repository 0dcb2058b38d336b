"""Plain text-to-image from any preset, hub id or folder: the quickstart and a smoke test of the stack.

Every check that can fail runs before the model loads or, when it needs the model, before sampling: the flags
(`SampleConfig`), the output location (writable, not under a file), the size against the model's spatial
factor and against memory.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from common.cli import ArgumentParser, ModelConfig, SamplingConfig, add_model_args, add_sampling_args, parse_args
from common.cli import positive_int
from common.errors import UsageError

# torch, diffusers and the model code load inside main(): --help and flag mistakes answer in a moment.


@dataclass(frozen=True)
class SampleConfig:
    """Everything one `scripts/sample.py` run needs, validated once at the entry point."""

    model: ModelConfig
    sampling: SamplingConfig
    output: str

    def __post_init__(self) -> None:
        if not self.sampling.prompt:
            raise UsageError("no prompt: pass --prompt \"a photo of a dog\"")
        if not self.output.lower().endswith(".png"):
            raise UsageError(f"--output must be a .png file, got {self.output}")

    @classmethod
    def from_args(cls, ns) -> SampleConfig:
        return cls(ModelConfig.from_args(ns), SamplingConfig.from_args(ns), ns.output)

    def output_paths(self) -> list[str]:
        """One path per image: `--output` itself, or `<stem>_<i>.png` when there are several."""
        if self.sampling.num_images == 1:
            return [self.output]
        stem, ext = os.path.splitext(self.output)
        return [f"{stem}_{i}{ext}" for i in range(self.sampling.num_images)]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Text-to-image with the shared sampling loop (SD, SDXL, FLUX, IF stage I).")
    add_model_args(parser, default="tiny-sd")
    add_sampling_args(parser, num_inference_steps=30, guidance_scale=None)  # None: the pipeline's own default
    parser.add_argument("--num_images", type=positive_int, default=1, help="images per prompt (default: %(default)s)")
    parser.add_argument("--output", default="outputs/sample.png",
                        help="PNG to write; with --num_images > 1, _<i> is added before the extension "
                             "(default: %(default)s)")
    return parser


def model_factor(pipe) -> int:
    """Pixels per step of a valid image size: 8 (SD, SDXL, IF) or 16 (FLUX packs 2x2 latent patches)."""
    from common.models.loading import pipeline_family

    return 16 if pipeline_family(pipe) == "flux" else 8


def main(argv: Sequence[str] | None = None) -> list[str]:
    cfg = SampleConfig.from_args(parse_args(build_parser(), argv))
    from common.io import check_writable

    paths = cfg.output_paths()
    for path in paths:
        check_writable(path)
    return _sample(cfg, paths)


def _sample(cfg: SampleConfig, paths: list[str]) -> list[str]:
    import torch

    from common.io import atomic_save_image
    from common.models.adapters import apply_adapters
    from common.models.loading import load_pipeline
    from common.pipelines.text2image import default_size, generate
    from plainsample.memory import check_fits

    m, s = cfg.model, cfg.sampling
    pipe = load_pipeline(m.pretrained_model_name_or_path, torch_dtype=m.torch_dtype, device=m.device,
                         revision=m.revision, variant=m.variant)
    s.check_size(model_factor(pipe))
    default_h, default_w = default_size(pipe)
    check_fits(pipe, s.height or default_h, s.width or default_w, s.num_images, m.device, m.torch_dtype)
    apply_adapters(pipe, list(m.adapters))
    generator = torch.Generator(device=m.device).manual_seed(s.seed)
    images = generate(pipe, s.prompt, s.negative_prompt or None, num_inference_steps=s.num_inference_steps,
                      guidance_scale=s.guidance_scale, height=s.height, width=s.width, eta=s.eta,
                      generator=generator, num_images_per_prompt=s.num_images, output_type="pil")
    for image, path in zip(images, paths):
        atomic_save_image(image, path)
        print(f"wrote {path} ({image.width}x{image.height})")
    return paths
