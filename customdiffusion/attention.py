"""Trainable cross-attention K/V (or Q/K/V/out) through diffusers' `CustomDiffusionAttnProcessor2_0`.

The processor holds its own copies of the projections (`to_k_custom_diffusion`, ...), initialised from the
base `attn2.to_k/to_v`, so the base UNet stays untouched and the trained weights serialise in diffusers'
`pytorch_custom_diffusion_weights` layout. Only cross-attention (`attn2`) layers get one.

BOS detach: diffusers 0.42's processor already replaces K and V at sequence position 0 by their detached
value in cross-attention (always, not only in train mode): the forward is unchanged and the start-of-text
token -- the same for every prompt -- sends no gradient to W_k, W_v. Tests pin this down.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention, CustomDiffusionAttnProcessor2_0

from common.attention.processors import ProcessorHandle, processors_of, set_processors
from common.errors import UsageError
from common.io import check_state_dict

FREEZE_MODELS = ("crossattn_kv", "crossattn")
PROC_SUFFIX = ".processor"


def normalize_freeze_model(name: str) -> str:
    """'crossattn-kv' (LDM spelling) / 'crossattn_kv' (diffusers) -> 'crossattn_kv'; also 'crossattn'."""
    norm = name.replace("-", "_")
    if norm not in FREEZE_MODELS:
        raise UsageError(f"freeze_model {name!r} is not supported; use crossattn_kv or crossattn")
    return norm


class CustomDiffusionProcessor(CustomDiffusionAttnProcessor2_0):
    """diffusers' processor plus what it lacks: building from an Attention layer with weights copied from it,
    extra call kwargs tolerated, and the residual / output-rescale options of `Attention` honoured."""

    @classmethod
    def from_attention(cls, attn: Attention, train_q_out: bool = False) -> "CustomDiffusionProcessor":
        hidden, cross = attn.to_k.out_features, attn.to_k.in_features
        if attn.to_k.bias is not None or attn.to_v.bias is not None:
            raise UsageError("Custom Diffusion expects bias-free to_k/to_v in cross-attention")
        out_bias = attn.to_out[0].bias is not None
        proc = cls(train_kv=True, train_q_out=train_q_out, hidden_size=hidden, cross_attention_dim=cross,
                   out_bias=out_bias)
        w = attn.to_k.weight
        proc.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            proc.to_k_custom_diffusion.weight.copy_(attn.to_k.weight)
            proc.to_v_custom_diffusion.weight.copy_(attn.to_v.weight)
            if train_q_out:
                if attn.to_q.bias is not None:
                    raise UsageError("Custom Diffusion 'crossattn' expects a bias-free to_q")
                proc.to_q_custom_diffusion.weight.copy_(attn.to_q.weight)
                proc.to_out_custom_diffusion[0].load_state_dict(attn.to_out[0].state_dict())
        return proc

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """hidden_states: [B, N, C]; encoder_hidden_states: [B, L, D] (text features) -> [B, N, C]."""
        if hidden_states.dim() != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
            raise NotImplementedError("CustomDiffusionProcessor handles [B, N, C] inputs without group/spatial norm")
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install(unet: torch.nn.Module, freeze_model: str = "crossattn_kv", self_attention: bool = True) -> ProcessorHandle:
    """Put a trainable CustomDiffusionProcessor on every cross-attention layer; freeze everything else.

    As upstream, self-attention layers get a parameter-free one (`self_attention=True`), which computes the
    same as the default and lets diffusers' `unet.save_attn_procs` work (it needs every processor to be a
    Module). Returns the handle of `common.attention.set_processors` (`.restore()` puts the old ones back).
    Trainable afterwards: to_k/to_v_custom_diffusion (crossattn_kv), plus to_q/to_out (crossattn).
    """
    train_q_out = normalize_freeze_model(freeze_model) == "crossattn"
    unet.requires_grad_(False)

    def make(name: str, attn: Attention) -> CustomDiffusionProcessor | None:
        if name.endswith("attn2"):
            return CustomDiffusionProcessor.from_attention(attn, train_q_out).requires_grad_(True)
        if self_attention and name.endswith("attn1"):
            return CustomDiffusionProcessor(train_kv=False, train_q_out=False)
        return None

    return set_processors(unet, make, where=lambda n: n.endswith(("attn1", "attn2")))


def custom_processors(unet: torch.nn.Module) -> dict[str, CustomDiffusionAttnProcessor2_0]:
    """Layer name -> installed Custom Diffusion processor (with trainable weights)."""
    return {name: p for name, p in processors_of(unet, "attn2").items()
            if isinstance(p, CustomDiffusionAttnProcessor2_0) and p.train_kv}


def trainable_parameters(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Processor parameters by their key in diffusers' `pytorch_custom_diffusion_weights` layout."""
    params = {}
    for layer, proc in custom_processors(unet).items():
        for key, p in proc.named_parameters():
            params[f"{layer}{PROC_SUFFIX}.{key}"] = p
    if not params:
        raise UsageError("no Custom Diffusion processors installed on this UNet; call customdiffusion.attention.install")
    return params


def get_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights, detached, in diffusers' layout
    (`<layer>.processor.to_k_custom_diffusion.weight`: [hidden, cross_dim], ...)."""
    return {k: p.detach().clone() for k, p in trainable_parameters(unet).items()}


def set_state(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (diffusers layout) into the installed processors; keys and shapes must match exactly."""
    params = trainable_parameters(unet)
    check_state_dict(state, expect_shapes={k: tuple(p.shape) for k, p in params.items()},
                     source="Custom Diffusion processor weights")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


# ------------------------------------------------------------------------- processor keys <-> UNet param names

_PROC_TO_PARAM = {
    "to_k_custom_diffusion.weight": "to_k.weight",
    "to_v_custom_diffusion.weight": "to_v.weight",
    "to_q_custom_diffusion.weight": "to_q.weight",
    "to_out_custom_diffusion.0.weight": "to_out.0.weight",
    "to_out_custom_diffusion.0.bias": "to_out.0.bias",
}
_PARAM_TO_PROC = {v: k for k, v in _PROC_TO_PARAM.items()}


def proc_key_to_param(key: str) -> str:
    """'<layer>.processor.to_k_custom_diffusion.weight' -> '<layer>.to_k.weight' (UNet parameter name)."""
    for tail, param in _PROC_TO_PARAM.items():
        suffix = f"{PROC_SUFFIX}.{tail}"
        if key.endswith(suffix):
            return key[: -len(suffix)] + "." + param
    raise UsageError(f"{key!r} is not a Custom Diffusion processor key (expected ...processor.to_k_custom_diffusion.weight)")


def param_to_proc_key(name: str) -> str:
    """'<layer>.to_k.weight' -> '<layer>.processor.to_k_custom_diffusion.weight'."""
    for param, tail in _PARAM_TO_PROC.items():
        if name.endswith("." + param):
            return name[: -len(param) - 1] + PROC_SUFFIX + "." + tail
    raise UsageError(f"{name!r} is not a cross-attention projection of Custom Diffusion")


def is_kv(name: str) -> bool:
    """True for 'attn2.to_k.weight' / 'attn2.to_v.weight' style names (UNet or LDM naming)."""
    return name.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))


def trained_param_names(unet: torch.nn.Module, freeze_model: str = "crossattn_kv") -> list[str]:
    """UNet parameter names Custom Diffusion trains: attn2 to_k/to_v (+ to_q, to_out.0 for 'crossattn')."""
    mode = normalize_freeze_model(freeze_model)
    names = []
    for name, _ in unet.named_parameters():
        if ".attn2." not in name or PROC_SUFFIX + "." in name:
            continue
        if is_kv(name) or (mode == "crossattn" and name.endswith(("attn2.to_q.weight", "attn2.to_out.0.weight",
                                                                     "attn2.to_out.0.bias"))):
            names.append(name)
    return names
