"""One seam for trained add-ons: `apply_adapters(pipe, paths)` puts any method's trained concept (a Custom
Diffusion delta, later a MuDI LoRA or an IP-Adapter) onto any pipeline, so every sampler — a plain
text-to-image call, a SyncTweedies panorama — can run with a personalised model.

Method packages register their kinds through the `customization_suite.adapters` entry point group
(setup.py); common/ discovers them at run time and never imports a method package itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Sequence

from common.errors import UsageError

ENTRY_POINT_GROUP = "customization_suite.adapters"


@dataclass(frozen=True)
class AdapterKind:
    """`detect(path) -> bool` must be cheap and never raise; `apply(pipe, path)` changes `pipe` in place."""

    name: str
    detect: Callable[[Path], bool]
    apply: Callable[[Any, Path], Any]


_KINDS: dict[str, AdapterKind] = {}
_discovered = False


def register_adapter(name: str, detect: Callable[[Path], bool], apply: Callable[[Any, Path], Any]) -> None:
    _KINDS[name] = AdapterKind(name, detect, apply)


def adapter_kinds() -> dict[str, AdapterKind]:
    """Registered kinds, after loading every installed plugin once."""
    global _discovered
    if not _discovered:
        _discovered = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            ep.load()()  # each plugin's register() calls register_adapter
    return dict(_KINDS)


def detect_adapter(path: str | Path) -> AdapterKind:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"adapter {path} does not exist")
    kinds = adapter_kinds()
    for kind in kinds.values():
        if kind.detect(path):
            return kind
    known = ", ".join(sorted(kinds)) or "none installed (pip install -e .)"
    raise UsageError(f"{path} is not a trained adapter of a known kind ({known})")


def apply_adapters(pipe: Any, paths: Sequence[str | Path] | None) -> list[str]:
    """Apply each adapter in order; returns the kind names applied."""
    applied = []
    for path in paths or ():
        kind = detect_adapter(path)
        kind.apply(pipe, Path(path))
        applied.append(kind.name)
    return applied
