"""Put a trained concept onto a pipeline: add its modifier tokens, write its weights into the UNet.

Weights go straight into the base `attn2` Linear layers (no processor needed at inference), so every sampler
-- plain text-to-image, a SyncTweedies panorama, shared attention -- runs the personalised model unchanged.
"""
from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.errors import UsageError
from common.io import check_state_dict
from common.models.adapters import AdapterHandle
from common.models.tokens import add_tokens, add_tokens_to_pipeline
from customdiffusion.attention import trained_param_names
from customdiffusion.formats import CustomDiffusionWeights, load


class _BaseParams:
    """A UNet's parameters under their plain names: a LoRA (peft) wraps `to_k` so its weight becomes
    `to_k.base_layer.weight`; a concept writes that base weight, and the LoRA keeps adding on top."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet

    def named_parameters(self):
        for name, param in self.unet.named_parameters():
            if ".lora_" not in name:
                yield name.replace(".base_layer.", "."), param


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
    unet = _BaseParams(pipe.unet)
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


# ------------------------------------------------------------------------------------- as a removable adapter


_CD_STACKS: "weakref.WeakKeyDictionary[Any, list[AdapterHandle]]" = weakref.WeakKeyDictionary()


def _token_pairs(pipe: Any) -> list[tuple[str, str]]:
    """(tokenizer attribute, text encoder attribute) of every pair the pipeline has."""
    return [(f"tokenizer{s}", f"text_encoder{s}") for s in ("", "_2")
            if getattr(pipe, f"tokenizer{s}", None) is not None and getattr(pipe, f"text_encoder{s}", None) is not None]


def _remove_tokens(pipe: Any, tokens: list[str], snapshots: list[tuple[Any, int]]) -> None:
    """Give each pair back its tokenizer and embedding rows from before `tokens` were added; tokens another
    adapter added since are added again (same vectors), so removal order does not matter."""
    for (tok_attr, enc_attr), (tok_before, rows_before) in zip(_token_pairs(pipe), snapshots):
        tok, enc = getattr(pipe, tok_attr), getattr(pipe, enc_attr)
        ours = [tok.convert_tokens_to_ids(t) for t in tokens]
        later = sorted((i, t) for t, i in tok.get_added_vocab().items() if i > max(ours) and t not in tokens)
        rows = enc.get_input_embeddings().weight.detach()[[i for i, _ in later]].clone() if later else None
        restored = copy.deepcopy(tok_before)
        enc.resize_token_embeddings(rows_before, mean_resizing=False)
        if later:
            add_tokens(restored, enc, [t for _, t in later], rows)
        setattr(pipe, tok_attr, restored)


def apply_customdiffusion_adapter(pipe: Any, path: str | Path, compress: bool | None = None) -> AdapterHandle:
    """`apply_customdiffusion` with a handle: `set_scale(s)` sets W0 + s (W - W0) on the trained weights
    (0: the base model, 1: the concept; the modifier tokens stay), `remove()` restores W0 and the tokenizers."""
    stack = _CD_STACKS.setdefault(pipe, [])
    weights = load(path, pipe.unet.config)
    if stack:
        warnings.warn(f"{path} overwrites the cross-attention weights of {stack[-1].path} (only its modifier tokens "
                      "stay); merge concepts with customdiffusion.merge to use several at once", stacklevel=2)
    params = dict(_BaseParams(pipe.unet).named_parameters())
    names = list(weights.unet)
    missing = [n for n in names if n not in params]
    if missing:  # the full key check (and its message) is apply_weights'; this only guards the snapshot
        check_against_unet(weights, _BaseParams(pipe.unet), str(path))
    base = {n: params[n].detach().clone() for n in names}
    snapshots = [(copy.deepcopy(getattr(pipe, t)), getattr(pipe, e).get_input_embeddings().weight.shape[0])
                 for t, e in _token_pairs(pipe)]
    tokens = apply_weights(pipe, weights, compress, source=str(path))
    trained = {n: params[n].detach().clone() for n in names}

    def set_scale(s: float) -> None:
        if stack and stack[-1] is not handle:
            raise UsageError(f"{stack[-1].path} was applied after {path} over the same weights; set its scale instead")
        with torch.no_grad():
            for n in names:
                w0, w1 = base[n], trained[n]
                value = w1 if s == 1.0 else (w0.double() + s * (w1.double() - w0.double())).to(w0.dtype)
                params[n].copy_(value)

    def remove() -> None:
        if stack and stack[-1] is not handle:
            raise UsageError(f"remove {stack[-1].path} first: it was applied after {path} and wrote over the same "
                             "weights")
        with torch.no_grad():
            for n in names:
                params[n].copy_(base[n])
        if tokens:
            _remove_tokens(pipe, tokens, snapshots)
        stack.remove(handle)

    handle = AdapterHandle("customdiffusion", Path(path), set_scale=set_scale, remove=remove, info={"tokens": tokens})
    stack.append(handle)
    return handle
