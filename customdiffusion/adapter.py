"""Custom Diffusion concepts as adapters: registered with common.models.adapters (entry point in setup.py),
applied as removable handles, described by the manifest train.py writes beside its weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import UsageError
from common.io import flatten_state_dict, load_weights
from common.models.adapters import LORA_KEY_MARKERS, AdapterHandle, register_adapter, write_manifest

_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth")
_FOREIGN = (*LORA_KEY_MARKERS, "to_k_ip", "image_proj")  # LoRA / IP-Adapter keys


def is_customdiffusion(path: Path) -> bool:
    """A Custom Diffusion output folder or delta file (by layout, not by name). A LoRA file flattened with a
    "unet." prefix looks like a delta by its first key; its LoRA keys say it is not one."""
    from customdiffusion.formats import detect_format

    try:
        if path.is_dir():
            return detect_format(path) == "diffusers"
        if path.suffix.lower() not in _SUFFIXES:
            return False
        sd = load_weights(path)
        if any(m in k for k in flatten_state_dict(sd) for m in _FOREIGN):
            return False
        return detect_format(path, sd) in ("diffusers", "delta", "ldm")
    except (UsageError, ValueError):
        return False


def apply(pipe, path: Path, *, compress: bool | None = None) -> AdapterHandle:
    """The "customdiffusion" adapter kind: the concept written into the UNet, as a removable handle."""
    from customdiffusion.apply import apply_customdiffusion_adapter

    return apply_customdiffusion_adapter(pipe, path, compress=compress)


def weights_file_name(fmt: str, safe_serialization: bool) -> str | None:
    """The file `train.py --save_format fmt` writes in its output folder (None: the diffusers folder layout)."""
    if fmt == "diffusers":
        return None
    return ("delta" if fmt == "delta" else "delta_model") + (".safetensors" if safe_serialization else ".bin")


def write_concept_manifest(pipe: Any, directory: str | Path, weights: Any, fmt: str,
                           safe_serialization: bool = True) -> Path:
    """adapter.json beside a trained concept: kind, base family, its modifier tokens, how it was trained."""
    from common.models.loading import pipeline_family

    return write_manifest(directory, kind="customdiffusion", base_family=pipeline_family(pipe),
                          tokens=list(weights.tokens), weights=weights_file_name(fmt, safe_serialization),
                          info={"freeze_model": weights.freeze_model, "save_format": fmt})


def register() -> None:
    register_adapter("customdiffusion", is_customdiffusion, apply)
