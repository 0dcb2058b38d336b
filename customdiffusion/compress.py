"""Low-rank compression of a concept's K/V (spec §1.9): store ΔW = W - W0 as u @ v, keeping the top singular
directions that carry `ratio` of the singular-value *sum* (not energy), as the reference `compress.py`.

The kept rank is the index i at which the cumulative normalised sum first exceeds `ratio` -- the crossing
value itself is excluded, as in the reference (so a rank-1 ΔW compresses to rank 0 at ratio 0.6). `ratio >= 1`
keeps every direction (exact). Output name: the input path with 'delta' -> 'compressed_delta'.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from common.cli import ArgumentParser, parse_args
from common.errors import UsageError
from customdiffusion.attention import is_kv
from customdiffusion.formats import CustomDiffusionWeights
from customdiffusion.outputs import refuse_existing, same_path

DEFAULT_RATIO = 0.6


def kept_rank(s: torch.Tensor, ratio: float) -> int:
    """s: singular values [k], descending -> number of directions kept (reference off-by-one)."""
    if ratio >= 1.0 or s.numel() == 0:
        return int(s.numel())
    total = s.sum()
    if total <= 0:
        return 0
    cum = torch.cumsum(s / total, 0)
    above = torch.nonzero(cum > ratio)
    return int(above[0]) if above.numel() else int(s.numel()) - 1


def compress_weight(w: torch.Tensor, w0: torch.Tensor, ratio: float = DEFAULT_RATIO) -> dict[str, torch.Tensor]:
    """w, w0: [out, in] -> {"u": U_i diag(s_i) [out, i], "v": V^T_i [i, in]} with w ≈ w0 + u @ v (float64 SVD)."""
    if w.shape != w0.shape:
        raise UsageError(f"cannot compress a {tuple(w.shape)} weight against a {tuple(w0.shape)} base weight")
    delta = w.double() - w0.double().to(w.device)
    u, s, vt = torch.linalg.svd(delta, full_matrices=False)
    i = kept_rank(s, ratio)
    return {"u": (u[:, :i] * s[:i]).to(w.dtype).contiguous(), "v": vt[:i].to(w.dtype).contiguous()}


def compress(weights: CustomDiffusionWeights, base: Mapping[str, torch.Tensor],
             ratio: float = DEFAULT_RATIO) -> CustomDiffusionWeights:
    """Compress every K/V entry of `weights` against `base` (UNet param name -> W0); others copied."""
    if weights.compressed:
        raise UsageError("this delta is already compressed")
    out = {}
    for name, w in weights.unet.items():
        if is_kv(name):
            if name not in base:
                raise UsageError(f"the base model has no parameter {name}; is it the model the concept was trained on?")
            out[name] = compress_weight(w, base[name].detach(), ratio)
        else:
            out[name] = w
    return CustomDiffusionWeights(out, dict(weights.tokens))


def compressed_path(path: str | Path) -> Path:
    """'.../delta.bin' -> '.../compressed_delta.bin' (the reference naming); other names get a prefix."""
    path = Path(path)
    name = path.name.replace("delta", "compressed_delta") if "delta" in path.name else f"compressed_{path.name}"
    return path.with_name(name)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="compress_customdiffusion.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--delta_ckpt", required=True, help="concept to compress (any layout)")
    p.add_argument("--ckpt", "--pretrained_model_name_or_path", dest="ckpt", required=True,
                   help="base model it was trained from (preset, hub id or folder)")
    p.add_argument("--diffuser", action="store_true",
                   help="kept for the original CLI; the input layout is detected and kept")
    p.add_argument("--compression_ratio", type=float, default=DEFAULT_RATIO,
                   help="fraction of the singular-value sum to keep")
    p.add_argument("--output", default=None, help="output file (default: input name with delta -> compressed_delta)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (never the input itself)")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    from common.models.loading import load_pipeline
    from customdiffusion import formats

    args = parse_args(build_parser(), argv)
    if not 0.0 < args.compression_ratio <= 1.0:
        raise UsageError(f"--compression_ratio must be in (0, 1], got {args.compression_ratio}")
    src = Path(args.delta_ckpt)
    if not src.exists():
        raise UsageError(f"Custom Diffusion checkpoint not found: {src}; check the path")
    out = Path(args.output) if args.output else compressed_path(src if src.is_file() else src / "delta.safetensors")
    if same_path(out, src) or (src.is_dir() and out.parent.resolve() == src.resolve()
                               and out.stem == formats.PROCS_NAME):
        raise UsageError(f"--output {out} is the input itself; the lossy compressed delta would replace the full "
                         "one -- write it elsewhere (default: compressed_<name>)")
    refuse_existing(out, args.overwrite, "--output")
    pipe = load_pipeline(args.ckpt)
    weights = formats.load(src, pipe.unet.config)
    small = compress(weights, dict(pipe.unet.named_parameters()), args.compression_ratio)
    fmt = formats.detect_format(src, None if src.is_dir() else formats.load_weights(src))
    if fmt == "diffusers":
        fmt = "delta"  # no compressed upstream layout: write the reference delta layout
    formats.save(small, out, fmt, pipe.unet.config)
    print(f"wrote {out}")
    return out
