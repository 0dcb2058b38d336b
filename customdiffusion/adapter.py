"""Registers Custom Diffusion concepts with common.models.adapters (entry point in setup.py)."""
from __future__ import annotations

from pathlib import Path

from common.errors import UsageError
from common.io import load_weights
from common.models.adapters import register_adapter

_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth")


def is_customdiffusion(path: Path) -> bool:
    """A Custom Diffusion output folder or delta file (by layout, not by name)."""
    from customdiffusion.formats import detect_format

    try:
        if path.is_dir():
            return detect_format(path) == "diffusers"
        if path.suffix.lower() not in _SUFFIXES:
            return False
        return detect_format(path, load_weights(path)) in ("diffusers", "delta", "ldm")
    except UsageError:
        return False


def apply(pipe, path: Path) -> None:
    from customdiffusion.apply import apply_customdiffusion

    apply_customdiffusion(pipe, path)


def register() -> None:
    register_adapter("customdiffusion", is_customdiffusion, apply)
