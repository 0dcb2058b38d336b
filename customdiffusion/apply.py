"""Put a trained concept onto a pipeline: add its modifier tokens, write its weights into the UNet.

Weights go straight into the base `attn2` Linear layers (no processor needed at inference), so every sampler
-- plain text-to-image, a SyncTweedies panorama, shared attention -- runs the personalised model unchanged.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.errors import UsageError
from common.io import check_state_dict
from common.models.tokens import add_tokens_to_pipeline
from customdiffusion.attention import trained_param_names
from customdiffusion.formats import CustomDiffusionWeights, load


def expected_shapes(unet: torch.nn.Module, freeze_model: str) -> dict[str, tuple[int, ...]]:
    params = dict(unet.named_parameters())
    return {n: tuple(params[n].shape) for n in trained_param_names(unet, freeze_model)}


def check_against_unet(weights: CustomDiffusionWeights, unet: torch.nn.Module, source: str = "concept") -> None:
    """Keys must be exactly the trained parameters of this UNet, shapes equal (compressed: u/v compatible)."""
    shapes = expected_shapes(unet, weights.freeze_model)
    full = {k: v for k, v in weights.unet.items() if not isinstance(v, Mapping)}
    check_state_dict({**full, **{k: None for k in weights.unet if k not in full}}, expect_keys=list(shapes),
                     source=source)
    check_state_dict(full, expect_shapes={k: s for k, s in shapes.items() if k in full}, source=source)
    for name, value in weights.unet.items():
        if isinstance(value, Mapping):
            u, v = value.get("u"), value.get("v")
            out, inp = shapes[name]
            if u is None or v is None or u.dim() != 2 or v.dim() != 2 or u.shape[0] != out or v.shape[1] != inp \
                    or u.shape[1] != v.shape[0]:
                raise UsageError(f"{source}: compressed {name} does not fit a [{out}, {inp}] weight as u @ v; "
                                 "check that it was made for this base model")


def materialize(weights: CustomDiffusionWeights, unet: torch.nn.Module) -> CustomDiffusionWeights:
    """Full weights: compressed entries become W0 + u @ v with W0 this UNet's current weight."""
    params = dict(unet.named_parameters())
    unet_sd = {}
    for name, value in weights.unet.items():
        if isinstance(value, Mapping):
            w0 = params[name].detach()
            unet_sd[name] = (w0.double() + value["u"].double().to(w0.device) @ value["v"].double().to(w0.device)
                             ).to(w0.dtype)
        else:
            unet_sd[name] = value
    return CustomDiffusionWeights(unet_sd, dict(weights.tokens))


def apply_weights(pipe: Any, weights: CustomDiffusionWeights, compress: bool | None = None,
                  source: str = "concept") -> list[str]:
    """Add the modifier tokens and write the UNet weights into `pipe` (in place). Returns the tokens added.

    Compressed entries are always read as W0 + u @ v (the file says which it is); `compress=True` on a
    full-weight file only warns, since adding full weights to W0 would be wrong (spec §6).
    """
    unet = pipe.unet
    check_against_unet(weights, unet, source)
    if compress and not weights.compressed:
        warnings.warn(f"{source} holds full weights, not a compressed delta: copying them (--compress ignored)",
                      stacklevel=2)
    full = materialize(weights, unet)
    tokens = list(full.tokens)
    if tokens:
        n_enc = {len(v) for v in full.tokens.values()}
        if len(n_enc) != 1:
            raise UsageError(f"{source}: modifier tokens have embeddings for different numbers of text encoders")
        per_encoder = [torch.stack([full.tokens[t][i] for t in tokens]) for i in range(n_enc.pop())]
        add_tokens_to_pipeline(pipe, tokens, per_encoder)
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in full.unet.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
    return tokens


def apply_customdiffusion(pipe: Any, path: str | Path | CustomDiffusionWeights, compress: bool | None = None) -> list[str]:
    """Load a concept from `path` (any layout, auto-detected) onto `pipe`; returns its modifier tokens."""
    weights = path if isinstance(path, CustomDiffusionWeights) else load(path, pipe.unet.config)
    return apply_weights(pipe, weights, compress, source=str(path) if not isinstance(path, CustomDiffusionWeights)
                         else "concept")
