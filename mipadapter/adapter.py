"""The "mip_adapter" kind for common.models.adapters: a manifest beside the weights so `--adapters` finds it,
and `apply(pipe, path)` that installs the processors (the per-call entity state comes from mipadapter.pipeline;
without it the layers compute plain text attention, so a generic sampler runs unchanged)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import UsageError
from common.models.adapters import AdapterHandle, read_manifest, register_adapter, write_manifest
from mipadapter.model import MIPAdapter

KIND = "mip_adapter"
WEIGHTS = "mip_adapter.safetensors"  # not model.safetensors: accelerate writes that into checkpoints


def write_mip_manifest(directory: str | Path, *, variant: str, image_encoder: str, scale: float,
                       weights: str = WEIGHTS, info: dict | None = None) -> Path:
    return write_manifest(directory, kind=KIND, base_family="sdxl", weights=weights,
                          options={"image_encoder": image_encoder, "scale": scale},
                          info={"variant": variant, **(info or {})})


def is_mip_adapter(path: Path) -> bool:
    """Only through a manifest: a bare file in this layout is also a valid IP-Adapter file (never raises)."""
    try:
        manifest = read_manifest(path)
    except UsageError:
        return False
    return bool(manifest) and manifest.get("kind") == KIND


def apply_mip_adapter(pipe: Any, path: Path, *, image_encoder: str | None = None, **unused: Any) -> AdapterHandle:
    if unused:
        raise UsageError(f"MIP-Adapters take the options image_encoder and scale, not {', '.join(sorted(unused))}")
    adapter = MIPAdapter.load(pipe.unet, path)
    handle = AdapterHandle(KIND, path, set_scale=adapter.set_scale, remove=adapter.remove,
                           info={"variant": adapter.variant.name, "image_encoder": image_encoder, "adapter": adapter})
    return handle


def register() -> None:
    register_adapter(KIND, is_mip_adapter, apply_mip_adapter)
