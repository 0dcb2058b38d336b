"""Convert a concept between the checkpoint layouts (see formats.py), optionally compressing it.

The reference `convert.py` modes map onto layouts: compvis-to-diffuser (ldm -> delta), diffuser-to-compvis
(delta -> ldm). `--to diffusers` writes the upstream save_attn_procs folder. The input layout is detected.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.cli import ArgumentParser, parse_args
from common.errors import UsageError
from customdiffusion import formats
from customdiffusion.outputs import refuse_existing, same_path

MODES = {"compvis-to-diffuser": "delta", "diffuser-to-compvis": "ldm"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="convert_customdiffusion.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--delta_ckpt", required=True, help="concept checkpoint to convert (any layout; auto-detected)")
    p.add_argument("--ckpt", "--pretrained_model_name_or_path", "--model", dest="ckpt", default=None,
                   help="base model (preset, hub id, folder); needed for LDM key names and for --compress")
    p.add_argument("--mode", default=None, choices=sorted(MODES), help="reference-style mode (sets --to)")
    p.add_argument("--to", default=None, choices=formats.FORMATS, help="output layout")
    p.add_argument("--output", required=True, help="output file (a folder for --to diffusers)")
    p.add_argument("--compress", action="store_true", help="also compress K/V to low rank (needs --ckpt)")
    p.add_argument("--compression_ratio", type=float, default=0.6, help="singular-value mass kept by --compress")
    p.add_argument("--no_safe_serialization", action="store_true",
                   help="diffusers folder: write .bin files instead of .safetensors")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (a diffusers folder loses its old weights and token files)")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(build_parser(), argv)
    to = args.to or MODES.get(args.mode or "")
    if to is None:
        raise UsageError("give --to (diffusers, delta, ldm) or --mode")
    if args.mode and args.to and MODES[args.mode] != args.to:
        raise UsageError(f"--mode {args.mode} writes {MODES[args.mode]}, but --to says {args.to}; give one")
    src, out = Path(args.delta_ckpt), Path(args.output)
    if not src.exists():
        raise UsageError(f"Custom Diffusion checkpoint not found: {src}; check the path")
    if same_path(out, src):
        raise UsageError(f"--output {out} is the input itself; write the converted concept elsewhere")
    refuse_existing(out, args.overwrite, "--output")
    unet = None
    if args.ckpt:
        from common.models.loading import load_model
        from diffusers import UNet2DConditionModel

        unet = _load_unet(args.ckpt, UNet2DConditionModel, load_model)
    elif args.compress:
        raise UsageError("--compress needs the base model (--ckpt) to subtract W0")
    config = None if unet is None else unet.config
    weights = formats.load(args.delta_ckpt, config)
    if args.compress:
        from customdiffusion.compress import compress

        weights = compress(weights, dict(unet.named_parameters()), args.compression_ratio)
    if to == "diffusers" and args.overwrite:
        formats.remove_diffusers_layout(out)  # no stale weights / token files of the old concept stay beside it
    out = formats.save(weights, out, to, config, safe_serialization=not args.no_safe_serialization)
    print(f"wrote {out}")
    return out


def _load_unet(spec: str, cls, load_model):
    """The UNet of a preset / hub id / pipeline folder."""
    from common.models.loading import load_pipeline
    from common.models.presets import is_tiny

    if is_tiny(spec):
        return load_pipeline(spec).unet
    return load_model(spec, cls, subfolder="unet")
