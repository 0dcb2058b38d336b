"""One seam for trained add-ons: `apply_adapter(pipe, path, **options) -> AdapterHandle` puts any method's
trained concept (a Custom Diffusion delta, a LoRA, an IP-Adapter) onto any pipeline, so every sampler -- a plain
text-to-image call, a SyncTweedies panorama -- can run with a personalised model; handles change its scale
or remove it again, and several stack on one pipeline.

Which kind a path holds is written by its trainer in a small manifest beside the weights (`adapter.json`:
kind, base family, tokens, options). Paths without one (older outputs, released files) are recognised by
sniffing their layout; a path that several kinds claim is refused rather than guessed. Kinds of method
packages register through the `customization_suite.adapters` entry point group (setup.py); common/ discovers
them at run time and never imports a method package. The kinds "lora" (diffusers' `load_lora_weights`) and
"ip_adapter" (common.models.ip_adapter) are built in.
"""
from __future__ import annotations

import contextlib
import json
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Sequence

from common.errors import UsageError
from common.io import (SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, atomic_write_json, check_safetensors, flatten_state_dict,
                       load_weights)

ENTRY_POINT_GROUP = "customization_suite.adapters"
MANIFEST_NAME = "adapter.json"
MANIFEST_FORMAT = "customization-suite-adapter"
MANIFEST_VERSION = 1


# ------------------------------------------------------------------------------------------------ manifest


def write_manifest(directory: str | Path, *, kind: str, base_family: str, tokens: Sequence[str] = (),
                   options: Mapping[str, Any] | None = None, weights: str | None = None,
                   info: Mapping[str, Any] | None = None) -> Path:
    """Write `directory/adapter.json` atomically. `weights` names the file it describes (None: the folder);
    `options` are defaults for `apply_adapter` (JSON values, e.g. {"scale": 0.75, "image_encoder": "..."});
    `info` is descriptive only (how it was trained), never passed on."""
    directory = Path(directory)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "kind": kind, "base_family": base_family,
                "tokens": list(tokens), "options": dict(options or {}), "info": dict(info or {})}
    if weights is not None:
        manifest["weights"] = weights
    path = directory / MANIFEST_NAME
    atomic_write_json(path, manifest)
    return path


def _manifest_path(path: Path) -> Path | None:
    if path.is_dir():
        return path / MANIFEST_NAME
    if path.name == MANIFEST_NAME:
        return path
    return path.parent / MANIFEST_NAME


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest describing `path` (a folder with adapter.json, the manifest itself, or the weights file its
    folder's manifest names in `weights`), or None when there is none. A broken manifest is a UsageError."""
    path = Path(path)
    mpath = _manifest_path(path)
    if mpath is None or not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{mpath} is not a readable adapter manifest: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not manifest.get("kind"):
        raise UsageError(f"{mpath} is not an adapter manifest (needs format '{MANIFEST_FORMAT}' and a kind)")
    if not path.is_dir() and path.name != MANIFEST_NAME and manifest.get("weights") != path.name:
        return None  # the folder's manifest describes the folder or another file, not this one
    if manifest.get("version", 0) > MANIFEST_VERSION:
        raise UsageError(f"{mpath} has manifest version {manifest['version']}; this code reads up to "
                         f"{MANIFEST_VERSION} (update the code)")
    return manifest


def weights_path(path: str | Path, manifest: Mapping[str, Any] | None) -> Path:
    """The file or folder a kind should load: the manifest's `weights` inside a folder, else `path`."""
    path = Path(path)
    if path.name == MANIFEST_NAME:
        path = path.parent
    if manifest and manifest.get("weights") and path.is_dir():
        return path / manifest["weights"]
    return path


# -------------------------------------------------------------------------------------------------- handles


class AdapterHandle:
    """An adapter on a pipeline. `set_scale(s)`: 0 gives the output without it, 1 the trained strength;
    `remove()` restores the pipeline exactly as it was before (idempotent). Kinds pass the two callbacks."""

    def __init__(self, kind: str, path: Path | None, *, set_scale: Callable[[float], None] | None = None,
                 remove: Callable[[], None] | None = None, manifest: Mapping[str, Any] | None = None,
                 info: Mapping[str, Any] | None = None, scale: float = 1.0):
        self.kind, self.path = kind, path
        self.manifest = dict(manifest) if manifest else None
        self.info = dict(info or {})
        self._set_scale, self._remove = set_scale, remove
        self.scale = scale
        self.removed = False

    def set_scale(self, scale: float) -> None:
        if self.removed:
            raise UsageError(f"{self.kind} adapter {self.path} was removed; apply it again to use it")
        if self._set_scale is None:
            raise UsageError(f"{self.kind} adapters have no scale")
        self._set_scale(float(scale))
        self.scale = float(scale)

    def remove(self) -> None:
        if self.removed:
            return
        if self._remove is None:
            raise UsageError(f"{self.kind} adapters cannot be removed; reload the pipeline")
        self._remove()
        self.removed = True

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"scale={self.scale:g}"
        return f"AdapterHandle({self.kind!r}, {str(self.path)!r}, {state})"


# ------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class AdapterKind:
    """`detect(path) -> bool` must be cheap and never raise; `apply(pipe, path, **options)` changes `pipe` in
    place and returns an AdapterHandle (anything else is wrapped in one that cannot be removed)."""

    name: str
    detect: Callable[[Path], bool]
    apply: Callable[..., Any]


_KINDS: dict[str, AdapterKind] = {}
_discovered = False


def register_adapter(name: str, detect: Callable[[Path], bool], apply: Callable[..., Any]) -> None:
    _KINDS[name] = AdapterKind(name, detect, apply)


def adapter_kinds() -> dict[str, AdapterKind]:
    """Registered kinds, after loading the built-in ones and every installed plugin once."""
    global _discovered
    if not _discovered:
        _discovered = True
        from common.models import ip_adapter

        register_adapter("lora", is_lora, apply_lora)
        ip_adapter.register()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            ep.load()()  # each plugin's register() calls register_adapter
    return dict(_KINDS)


def _known(kinds: Mapping[str, AdapterKind]) -> str:
    return ", ".join(sorted(kinds)) or "none installed (pip install -e .)"


def detect_adapter(path: str | Path) -> AdapterKind:
    """The kind of `path`: its manifest's, else the one kind whose layout it has."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"adapter {path} does not exist")
    kinds = adapter_kinds()
    manifest = read_manifest(path)
    if manifest is not None:
        if manifest["kind"] not in kinds:
            raise UsageError(f"{path} is a '{manifest['kind']}' adapter, a kind not installed here ({_known(kinds)})")
        return kinds[manifest["kind"]]
    found = [kind for kind in kinds.values() if kind.detect(path)]
    if len(found) > 1:
        names = ", ".join(k.name for k in found)
        raise UsageError(f"{path} fits several adapter kinds ({names}); write an {MANIFEST_NAME} beside it "
                         "(common.models.adapters.write_manifest) or pass kind=")
    if not found:
        raise UsageError(f"{path} is not a trained adapter of a known kind ({_known(kinds)})")
    return found[0]


def _check_family(pipe: Any, manifest: Mapping[str, Any] | None, path: Path) -> None:
    family = manifest.get("base_family") if manifest else None
    if not family:
        return
    from common.models.loading import pipeline_family

    have = pipeline_family(pipe)
    if have != family:
        raise UsageError(f"{path} was trained for a {family} model but the pipeline is {have}; "
                         f"load a {family} base model")


def apply_adapter(pipe: Any, path: str | Path, *, kind: str | None = None, **options: Any) -> AdapterHandle:
    """Put the adapter at `path` onto `pipe`. `kind` overrides detection; `options` override the manifest's
    (e.g. scale=0.6, image_encoder=... for an IP-Adapter, adapter_name=... for a LoRA)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"adapter {path} does not exist")
    kinds = adapter_kinds()
    if kind is not None and kind not in kinds:
        raise UsageError(f"unknown adapter kind {kind!r} ({_known(kinds)})")
    found = kinds[kind] if kind is not None else detect_adapter(path)
    manifest = read_manifest(path)
    _check_family(pipe, manifest, path)
    merged = {**(manifest.get("options", {}) if manifest else {}), **options}
    scale = merged.pop("scale", None)
    result = found.apply(pipe, weights_path(path, manifest), **merged)
    handle = result if isinstance(result, AdapterHandle) else AdapterHandle(found.name, path, info={"result": result})
    handle.manifest = dict(manifest) if manifest else None
    if scale is not None and float(scale) != handle.scale:
        handle.set_scale(float(scale))
    return handle


AdapterSpec = str | Path | tuple[str | Path, Mapping[str, Any]]


def apply_adapters(pipe: Any, paths: Sequence[AdapterSpec] | None) -> list[AdapterHandle]:
    """Apply each adapter in order (a path, or (path, options)); returns their handles. If one fails, the
    ones already applied are removed again, so the pipeline is left as it was."""
    handles: list[AdapterHandle] = []
    try:
        for item in paths or ():
            path, options = (item[0], dict(item[1])) if isinstance(item, tuple) else (item, {})
            handles.append(apply_adapter(pipe, path, **options))
    except BaseException:
        for handle in reversed(handles):
            try:
                handle.remove()
            except UsageError:
                pass
        raise
    return handles


# ----------------------------------------------------------------------------------------------- kind: lora

LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
LORA_KEY_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up")


def _weight_keys(path: Path) -> list[str]:
    """Keys of a weights file without loading tensors where the format allows (safetensors)."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    if suffix in TORCH_SUFFIXES:
        return list(flatten_state_dict(load_weights(path)))
    return []


def is_lora(path: Path) -> bool:
    """A diffusers LoRA folder (pytorch_lora_weights.*) or a weights file with LoRA keys."""
    try:
        if path.is_dir():
            return any((path / name).is_file() for name in LORA_FILES)
        return any(m in k for k in _weight_keys(path) for m in LORA_KEY_MARKERS)
    except Exception:  # detect never raises: a file it cannot read is simply not a LoRA
        return False


_LORA_SCALES: "weakref.WeakKeyDictionary[Any, dict[str, float]]" = weakref.WeakKeyDictionary()


def _lora_scales(pipe: Any) -> dict[str, float]:
    return _LORA_SCALES.setdefault(pipe, {})


@contextlib.contextmanager
def _quiet_loading():
    """diffusers/peft chatter that is expected here: no text-encoder LoRA keys, a second adapter on one model."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        dlog.set_verbosity(level)


def apply_lora(pipe: Any, path: Path, *, adapter_name: str | None = None, **unused: Any) -> AdapterHandle:
    """diffusers' `load_lora_weights` under its own adapter name; the scale is the adapter weight of
    `set_adapters`; removal deletes the adapter (and unloads the LoRA layers once none is left)."""
    if unused:
        raise UsageError(f"LoRA adapters take no option(s) {', '.join(sorted(unused))}")
    if not hasattr(pipe, "load_lora_weights"):
        raise UsageError(f"{type(pipe).__name__} cannot load LoRA weights")
    scales = _lora_scales(pipe)
    existing = set(scales) | {n for names in pipe.get_list_adapters().values() for n in names}
    name = adapter_name or path.stem.replace(".", "_") or "lora"
    if adapter_name is None:
        base, i = name, 1
        while name in existing:
            i += 1
            name = f"{base}_{i}"
    elif name in existing:
        raise UsageError(f"a LoRA adapter named {name!r} is already loaded; pass another adapter_name")
    file = next((path / n for n in LORA_FILES if (path / n).is_file()), None) if path.is_dir() else path
    if file is None:
        raise UsageError(f"{path} holds no {' or '.join(LORA_FILES)}")
    with _quiet_loading():
        if file.suffix.lower() == ".safetensors":  # diffusers reads safetensors itself (keeps rank/alpha metadata)
            check_safetensors(file)
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        else:  # torch pickles only through weights_only loading
            pipe.load_lora_weights(load_weights(file), adapter_name=name)
    scales[name] = 1.0
    pipe.set_adapters(list(scales), list(scales.values()))

    def set_scale(s: float) -> None:
        scales[name] = s
        pipe.set_adapters(list(scales), list(scales.values()))

    def remove() -> None:
        scales.pop(name, None)
        pipe.delete_adapters(name)
        if scales:
            pipe.set_adapters(list(scales), list(scales.values()))
        elif not any(pipe.get_list_adapters().values()):
            pipe.unload_lora_weights()  # back to the plain Linear layers

    return AdapterHandle("lora", path, set_scale=set_scale, remove=remove, info={"adapter_name": name})
