"""MIP-Adapter on an SDXL UNet: variants, processor install, image tokens per object, checkpoints (spec §1.5, §2).

Checkpoint layout = the original's (and IP-Adapter's): {"image_proj": {...original projection keys...},
"ip_adapter": {"{n}.to_k_ip.weight", "{n}.to_v_ip.weight", "{n}.text_to_weight.weight"}} with n = 1, 3, 5, ...
(the cross-attention slots of `unet.attn_processors`); `.safetensors` (default) flattens it with the prefixes
`image_proj.` / `ip_adapter.`, `.bin` is read with weights_only. The image projection is diffusers' own
(`ImageProjection` / `IPAdapterPlusImageProjection`, built by its converter from the original keys) and is not
trained: its original-key state is kept and saved back unchanged, as the original does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from common.attention.processors import ProcessorHandle, set_processors
from common.errors import UsageError
from common.models.ip_adapter import (
    IPState,
    cross_attention_layers,
    num_tokens as ip_num_tokens,
    read_ip_adapter,
    save_ip_adapter,
    variant_of,
)
from mipadapter.processor import MIPAdapterAttnProcessor

GATE = "text_to_weight"
KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip|text_to_weight)\.weight$")


@dataclass(frozen=True)
class Variant:
    """ip: the IP-Adapter projection kind; feature: which image-encoder output feeds it; tokens: T per image."""

    name: str
    ip: str
    feature: str
    tokens: int
    scale: float
    base: str
    image_encoder: str
    tiny_image_encoder: str


VARIANTS = {
    "sdxl": Variant("sdxl", "plain", "pooled", 4, 0.75, "stabilityai/stable-diffusion-xl-base-1.0",
                    "clip-vit-bigg-14", "tiny-clip-vision-g"),
    "sdxl_plus": Variant("sdxl_plus", "plus", "penultimate", 16, 0.65, "SG161222/RealVisXL_V1.0",
                         "clip-vit-h-14", "tiny-clip-vision-h"),
}
VARIANT_OF_IP = {v.ip: v.name for v in VARIANTS.values()}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise UsageError(f"--variant must be one of {', '.join(VARIANTS)}, got {name!r}")
    return VARIANTS[name]


# ------------------------------------------------------------------------------------------------ processors


def install_processors(unet: torch.nn.Module, num_tokens: int, *, scale: float = 1.0, zero_gate: bool = False
                       ) -> ProcessorHandle:
    """MIP processors on every attn2 (attn1 keeps its processor). to_k_ip / to_v_ip start as copies of the layer's
    to_k / to_v (spec §1.5); text_to_weight keeps PyTorch's Linear init as the original (zero_gate: zeros, so
    the untrained adapter is exactly the IP-Adapter it starts from)."""
    param = next(unet.parameters())

    def make(name: str, attn: torch.nn.Module) -> MIPAdapterAttnProcessor:
        proc = MIPAdapterAttnProcessor(attn.inner_dim, attn.cross_attention_dim, num_tokens, scale, name)
        with torch.no_grad():
            proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
            proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
            if zero_gate:
                proc.text_to_weight.weight.zero_()
        return proc.to(device=param.device, dtype=param.dtype)

    handle = set_processors(unet, make, "attn2")
    cross_attention_layers(unet)  # refuses UNets whose self/cross layers do not alternate (released numbering)
    return handle


def mip_layers(unet: torch.nn.Module) -> list[tuple[int, MIPAdapterAttnProcessor]]:
    """(n, processor) per cross-attention layer, n = its odd index in the original checkpoint."""
    out = []
    for n, name, attn in cross_attention_layers(unet):
        if not isinstance(attn.processor, MIPAdapterAttnProcessor):
            raise UsageError(f"{name} has no MIP-Adapter processor; install the adapter first")
        out.append((n, attn.processor))
    return out


def ip_state_dict(unet: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The "ip_adapter" sub-dict in the original key layout (3 keys per cross-attention layer)."""
    out = {}
    for n, proc in mip_layers(unet):
        for part, w in (("to_k_ip", proc.to_k_ip[0].weight), ("to_v_ip", proc.to_v_ip[0].weight),
                        (GATE, proc.text_to_weight.weight)):
            out[f"{n}.{part}.weight"] = w.detach().to("cpu", dtype or w.dtype).clone()
    return out


def load_ip_state(unet: torch.nn.Module, ip: Mapping[str, torch.Tensor], source: str = "checkpoint") -> list[str]:
    """Load an "ip_adapter" sub-dict into the installed processors; returns the missing text_to_weight keys
    (an IP-Adapter checkpoint has none: they keep their init). Unexpected keys, wrong shapes and missing
    to_k_ip / to_v_ip are errors naming the first offender."""
    layers = dict(mip_layers(unet))
    expected: dict[str, torch.nn.Parameter] = {}
    for n, proc in layers.items():
        expected[f"{n}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        expected[f"{n}.to_v_ip.weight"] = proc.to_v_ip[0].weight
        expected[f"{n}.{GATE}.weight"] = proc.text_to_weight.weight
    unexpected = [k for k in ip if k not in expected]
    if unexpected:
        raise UsageError(f"{source}: unexpected key ip_adapter.{unexpected[0]} ({len(unexpected)} in all); "
                         f"it was made for another UNet")
    missing = [k for k in expected if k not in ip]
    not_gate = [k for k in missing if GATE not in k]
    if not_gate:
        raise UsageError(f"{source}: missing key ip_adapter.{not_gate[0]} ({len(not_gate)} in all)")
    for key, value in ip.items():
        param = expected[key]
        if tuple(value.shape) != tuple(param.shape):
            raise UsageError(f"{source}: ip_adapter.{key} has shape {tuple(value.shape)}, this UNet needs "
                             f"{tuple(param.shape)}; check the base model")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
    return missing


# ---------------------------------------------------------------------------------------------- projection


def build_image_proj(unet: torch.nn.Module, image_proj: Mapping[str, torch.Tensor], *,
                     num_tokens: int | None = None) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[str]]:
    """diffusers' projection from the original keys (strict), on the UNet's device/dtype. A plus checkpoint whose
    `latents` do not have `num_tokens` queries loses them (re-drawn like a fresh Resampler's, as the original
    drops a mismatching `latents`): returns (module, original-key state actually used, dropped keys)."""
    state = dict(image_proj)
    dropped: list[str] = []
    if num_tokens is not None and "latents" in state and state["latents"].shape[1] != num_tokens:
        old = state["latents"]
        gen = torch.Generator().manual_seed(0)
        state["latents"] = torch.randn(1, num_tokens, old.shape[2], generator=gen) / old.shape[2] ** 0.5
        dropped.append("latents")
    try:
        module = unet._convert_ip_adapter_image_proj_to_diffusers(state, low_cpu_mem_usage=False)
    except (KeyError, RuntimeError) as err:
        raise UsageError(f"image_proj does not fit the released IP-Adapter layouts: {err}") from None
    param = next(unet.parameters())
    module.to(device=param.device, dtype=param.dtype).requires_grad_(False)
    return module, state, dropped


def object_tokens(image_proj: torch.nn.Module, features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per object its images' features ([n_k, E] pooled or [n_k, L, W] penultimate) -> tokens [K, T, D], each
    object's image tokens averaged over its images (spec §1.3, multiple images per object)."""
    param = next(image_proj.parameters())
    return torch.stack([image_proj(f.to(param.device, param.dtype)).mean(0) for f in features])


# ------------------------------------------------------------------------------------------------- adapter


class MIPAdapter:
    """A MIP-Adapter on a UNet: installed processors, the image projection, the variant and its image encoder."""

    def __init__(self, unet: torch.nn.Module, state: IPState, *, source: str = "checkpoint",
                 variant: str | None = None, scale: float = 1.0, require_gate: bool = True,
                 zero_gate: bool = False, num_tokens: int | None = None):
        found = VARIANT_OF_IP[variant_of(state, source)]
        if variant is not None and variant != found:
            raise UsageError(f"{source} is a {found} checkpoint, not {variant} "
                             f"({'--is_plus True' if found == 'sdxl_plus' else 'drop --is_plus'} / --variant {found})")
        self.unet, self.source, self.variant = unet, source, get_variant(found)
        self.image_proj, self.image_proj_state, self.dropped = build_image_proj(
            unet, state["image_proj"], num_tokens=num_tokens)
        tokens = num_tokens or ip_num_tokens(state)
        self.handle = install_processors(unet, tokens, scale=scale, zero_gate=zero_gate)
        try:
            self.missing = load_ip_state(unet, state["ip_adapter"], source)
        except UsageError:
            self.handle.restore()
            raise
        if self.missing and require_gate:
            self.handle.restore()
            raise UsageError(f"{source} has no text_to_weight gates ({len(self.missing)} missing, e.g. "
                             f"ip_adapter.{self.missing[0]}): it is a plain IP-Adapter, not a trained MIP-Adapter")
        self.num_tokens = tokens

    @classmethod
    def load(cls, unet: torch.nn.Module, path: str | Path, **kw: Any) -> "MIPAdapter":
        return cls(unet, read_ip_adapter(path), source=str(path), **kw)

    def set_scale(self, scale: float) -> None:
        for _, proc in mip_layers(self.unet):
            proc.scale = [float(scale)]

    def remove(self) -> None:
        self.handle.restore()

    def state(self, dtype: torch.dtype | None = None) -> IPState:
        """The original checkpoint layout (image_proj as loaded, processors' current weights)."""
        proj = {k: v.detach().to("cpu", dtype or v.dtype).clone() for k, v in self.image_proj_state.items()}
        return {"image_proj": proj, "ip_adapter": ip_state_dict(self.unet, dtype)}

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """`.safetensors` (flattened) or `.bin` (nested pickle, loads in the original code); atomic."""
        return save_ip_adapter(self.state(dtype), path)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Exactly to_k_ip, to_v_ip and text_to_weight of every cross-attention layer (spec §1.5)."""
        return [p for _, proc in mip_layers(self.unet) for p in proc.parameters()]


# ---------------------------------------------------------------------------------------------- stand-ins

#: Feature sizes of the tiny image encoders (common.models.tiny): pooled projection of tiny-clip-vision-g,
#: hidden size of tiny-clip-vision-h.
TINY_FEATURE_DIM = {"sdxl": 24, "sdxl_plus": 32}


def random_mip_state(unet: torch.nn.Module, variant: str, *, feature_dim: int | None = None, gates: bool = True,
                     seed: int = 0) -> IPState:
    """Random weights in the exact released MIP-Adapter layout (`model_sdxl.bin` / `model_sdxl_plus.bin`), shaped
    for `unet`; gates=False gives the IP-Adapter layout it starts from. Stands in for released files in tests."""
    from common.models.ip_adapter import random_ip_adapter_state

    v = get_variant(variant)
    state = random_ip_adapter_state(unet, v.ip, feature_dim or TINY_FEATURE_DIM[variant], seed=seed)
    if gates:
        gen = torch.Generator().manual_seed(seed + 1)
        for key in [k for k in state["ip_adapter"] if k.endswith("to_k_ip.weight")]:
            n = key.split(".")[0]
            hidden = state["ip_adapter"][key].shape[0]
            state["ip_adapter"][f"{n}.{GATE}.weight"] = torch.randn(1, hidden, generator=gen) / hidden ** 0.5
    return state
