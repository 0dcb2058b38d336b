"""LoRA through peft, with the target-module presets and the file format of diffusers' LoRA examples.

`add_lora` injects adapters (diffusers' / transformers' `add_adapter`, which freezes everything but the
adapters) and returns the trainable parameters in float32; `lora_disabled` gives the frozen base model
for a reference pass (MuDI's DCO: the same network with the LoRA off); `save_lora_weights` writes
`pytorch_lora_weights.safetensors` (with peft config metadata) that `pipe.load_lora_weights(directory)`
reads, plus our adapter manifest.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

#: Per-family target modules (peft suffix match on module names), as diffusers' LoRA examples use them.
LORA_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    # UNet attention, self and cross (train_dreambooth_lora_sdxl.py; MuDI)
    "sd": ("to_q", "to_k", "to_v", "to_out.0"),
    "sdxl": ("to_q", "to_k", "to_v", "to_out.0"),
    # FLUX transformer (train_dreambooth_lora_flux.py's default --lora_layers; SynCD's list): joint blocks'
    # image and text attention and feed-forwards; the single blocks' attention matches "attn.to_q/k/v".
    "flux": (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    ),
}
#: CLIP text encoder attention (--train_text_encoder in the diffusers examples and MuDI).
TEXT_ENCODER_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
#: Which pipeline class writes a family's LoRA file, and the keyword of its denoiser's layers.
_SAVERS = {"sd": ("StableDiffusionPipeline", "unet"), "sdxl": ("StableDiffusionXLPipeline", "unet"),
           "flux": ("FluxPipeline", "transformer")}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (`.module`) or torch.compile (`._orig_mod`)."""
    while True:
        inner = next((m for m in (getattr(model, "module", None), getattr(model, "_orig_mod", None))
                      if isinstance(m, torch.nn.Module)), None)
        if inner is None:
            return model
        model = inner


def add_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] | str | None = None,
    family: str | None = None,
    adapter_name: str = "default",
    *,
    init_lora_weights: bool | str = "gaussian",
    dropout: float = 0.0,
    use_dora: bool = False,
    trainable_dtype: torch.dtype | None = torch.float32,
) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter to `model` and return its trainable parameters (cast to `trainable_dtype`).

    `target_modules` defaults to `LORA_TARGET_MODULES[family]`; `alpha` defaults to `rank` (scale 1, as MuDI,
    SynCD and the diffusers examples); "gaussian" init draws A ~ N(0, 1/rank) and sets B = 0, so the adapted
    model starts equal to the base. peft freezes every non-adapter parameter of `model`: unfreeze others
    (e.g. new token embeddings) after this call.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if target_modules is None:
        if family not in LORA_TARGET_MODULES:
            raise ValueError(f"no LoRA target-module preset for family {family!r}; "
                             f"pass target_modules or one of {', '.join(LORA_TARGET_MODULES)}")
        target_modules = LORA_TARGET_MODULES[family]
    config = LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights=init_lora_weights,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        lora_dropout=dropout, use_dora=use_dora,
    )
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):  # diffusers' integration keeps `peft_config` (saved as metadata)
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        # Text encoders: transformers' add_adapter demands peft >= 0.22 (we pin 0.21.2), so inject directly.
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
        model.__dict__.setdefault("_lora_configs", {})[adapter_name] = config
    params = [p for n, p in model.named_parameters() if p.requires_grad and f".{adapter_name}." in n and "lora_" in n]
    if trainable_dtype is not None:
        for p in params:
            p.data = p.data.to(trainable_dtype)
    return params


def _tuner_layers(model: torch.nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def lora_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run `model` as its base (every LoRA layer bypassed, outputs exactly the base model's) inside the block.

    Restores each layer's previous on/off state and every adapter parameter's `requires_grad` afterwards
    (peft's toggle would otherwise mark adapters trainable). Use under `torch.no_grad()` for a reference pass.
    """
    layers = _tuner_layers(_unwrap(model))
    if not layers:
        raise ValueError(f"{type(_unwrap(model)).__name__} has no LoRA layers to disable")
    states = [(layer, layer.disable_adapters, [(p, p.requires_grad) for p in layer.parameters()]) for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, was_disabled, grads in states:
            layer.enable_adapters(not was_disabled)
            for p, requires_grad in grads:
                p.requires_grad_(requires_grad)


def lora_state_dict(model: torch.nn.Module, prefix: str = "", adapter_name: str = "default", *,
                    diffusers_format: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's weights {prefix + peft key: tensor} (keys like `...to_q.lora_A.weight`).

    `diffusers_format=True` converts to the `lora.down/up` names the SD/SDXL examples save.
    """
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(_unwrap(model), adapter_name=adapter_name)
    if diffusers_format:
        from diffusers.utils import convert_state_dict_to_diffusers

        state = convert_state_dict_to_diffusers(state)
    return {f"{prefix}{k}": v for k, v in state.items()}


def _adapter_metadata(model: torch.nn.Module, adapter_name: str) -> dict[str, Any] | None:
    model = _unwrap(model)
    configs = getattr(model, "peft_config", None) or model.__dict__.get("_lora_configs", {})
    config = configs.get(adapter_name)
    return config.to_dict() if config is not None else None


def save_lora_weights(
    directory: str | os.PathLike,
    *,
    family: str,
    unet: torch.nn.Module | None = None,
    transformer: torch.nn.Module | None = None,
    text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
    adapter_name: str = "default",
    tokens: Sequence[str] = (),
    manifest_options: dict[str, Any] | None = None,
) -> Path:
    """Write `directory/pytorch_lora_weights.safetensors` in the layout `pipe.load_lora_weights` reads.

    The pipeline class of `family` writes the file (SD/SDXL in diffusers key names, FLUX in peft names, as
    the diffusers examples do), with each model's peft config as metadata so rank and alpha load back; the
    file is written beside and renamed into place, then a manifest (kind "lora") is added.
    """
    import diffusers

    if family not in _SAVERS:
        raise ValueError(f"cannot save a LoRA for family {family!r}; expected one of {', '.join(_SAVERS)}")
    pipeline_name, denoiser_key = _SAVERS[family]
    denoiser = unet if denoiser_key == "unet" else transformer
    other = transformer if denoiser_key == "unet" else unet
    if other is not None:
        raise ValueError(f"a {family} LoRA has a {denoiser_key}, not a {'transformer' if other is transformer else 'unet'}")
    if text_encoder_2 is not None and family != "sdxl":
        raise ValueError(f"a {family} pipeline has no text_encoder_2 LoRA slot")
    convert = family != "flux"
    models = {denoiser_key: denoiser, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    kwargs: dict[str, Any] = {}
    for key, model in models.items():
        if model is not None:
            kwargs[f"{key}_lora_layers"] = lora_state_dict(model, adapter_name=adapter_name, diffusers_format=convert)
            kwargs[f"{key}_lora_adapter_metadata"] = _adapter_metadata(model, adapter_name)
    if not kwargs:
        raise ValueError("save_lora_weights: pass at least one model with a LoRA adapter")

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=directory))
    try:
        getattr(diffusers, pipeline_name).save_lora_weights(staging, safe_serialization=True, **kwargs)
        os.replace(staging / LORA_WEIGHTS_NAME, directory / LORA_WEIGHTS_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_manifest(directory, family, tokens, manifest_options)
    return directory / LORA_WEIGHTS_NAME


def _write_manifest(directory: Path, family: str, tokens: Sequence[str], options: dict[str, Any] | None) -> None:
    """Our adapter manifest (kind "lora", applied by `common.models.adapters.apply_adapter`) beside the weights."""
    from common.models.adapters import write_manifest

    write_manifest(directory, kind="lora", base_family=family, tokens=tuple(tokens), options=options or {},
                   weights=LORA_WEIGHTS_NAME)
