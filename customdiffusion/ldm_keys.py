"""diffusers UNet names <-> LDM/CompVis names of the cross-attention layers, derived from the UNet config.

LDM numbers its blocks flat: `input_blocks.0` is conv_in, then per down level `layers_per_block` (res+attn)
blocks and one downsampler; `middle_block.1` is the mid attention; `output_blocks` hold `layers_per_block+1`
blocks per up level. The attention of a block is its module `.1`. Everything after the attention prefix
(`transformer_blocks.0.attn2.to_k.weight`) is spelled the same in both. Works for any SD-1.x/2.x/SDXL-shaped
UNet, not only one size.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.errors import UsageError

LDM_PREFIX = "model.diffusion_model."


def _per_block(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * n


def attention_prefixes(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers attention prefix -> LDM prefix, e.g. 'down_blocks.0.attentions.1' -> '...input_blocks.2.1'."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    layers = _per_block(config["layers_per_block"], len(down))
    table: dict[str, str] = {}
    index = 1  # input_blocks.0 is conv_in
    for i, kind in enumerate(down):
        for j in range(layers[i]):
            if "CrossAttn" in kind:
                table[f"down_blocks.{i}.attentions.{j}"] = f"{LDM_PREFIX}input_blocks.{index}.1"
            index += 1
        index += 1  # the downsampler (absent after the last level, where counting stops anyway)
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") and "CrossAttn" in str(
            config.get("mid_block_type", "UNetMidBlock2DCrossAttn")):
        table["mid_block.attentions.0"] = f"{LDM_PREFIX}middle_block.1"
    index = 0
    for i, kind in enumerate(up):
        for j in range(list(reversed(layers))[i] + 1):
            if "CrossAttn" in kind:
                table[f"up_blocks.{i}.attentions.{j}"] = f"{LDM_PREFIX}output_blocks.{index}.1"
            index += 1
    return table


def _swap(name: str, table: Mapping[str, str], what: str) -> str:
    for src, dst in table.items():
        if name.startswith(src + "."):
            return dst + name[len(src):]
    raise UsageError(f"{what} name {name!r} has no counterpart in this UNet layout; "
                     "check that the checkpoint belongs to this base model")


def to_ldm(name: str, config: Mapping[str, Any]) -> str:
    """'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'
    -> 'model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight'."""
    return _swap(name, attention_prefixes(config), "diffusers")


def from_ldm(name: str, config: Mapping[str, Any]) -> str:
    """The inverse of `to_ldm`."""
    return _swap(name, {v: k for k, v in attention_prefixes(config).items()}, "LDM")
