"""Load any pipeline or model from a preset name, a hub id or a local folder — the one way in.

The diffusers pipeline object is our model bundle; we never wrap it. Hub ids download as usual where the hub
is reachable; where it is not (HF_HUB_OFFLINE=1, or no route as on many cluster nodes) a model missing
from the local cache gives one clear line on how to get it.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from common.errors import UsageError
from common.models.presets import PRESETS, get_preset, is_tiny
from common.models.tiny import build_tiny

FAMILIES = ("sd", "sdxl", "flux", "if", "if-sr")


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def resolve_spec(spec: str) -> str:
    """Preset name -> hub id; hub ids and folders pass through. Tiny names stay as they are."""
    if not spec:
        raise UsageError("no model given: pass a preset (e.g. tiny-sd, sd14), a hub id or a local folder")
    preset = PRESETS.get(spec)
    if preset is not None and preset.hub_id:
        return preset.hub_id
    return spec


def _check_exists(spec: str) -> None:
    if is_tiny(spec) or os.path.isdir(spec):
        return
    if os.path.sep in spec and (spec.startswith((".", os.path.sep, "~")) or os.path.exists(os.path.dirname(spec))):
        raise UsageError(f"model folder '{spec}' does not exist: check the path")
    if "/" not in spec:
        names = ", ".join(sorted(PRESETS))
        raise UsageError(f"unknown model '{spec}': use a preset ({names}), a hub id (owner/name) or a local folder")


def _offline_hint(hub_id: str, err: Exception) -> UsageError:
    return UsageError(
        f"model '{hub_id}' is not in the local Hugging Face cache and cannot be downloaded from here "
        f"({type(err).__name__}); on a machine with internet run `hf download {hub_id}` (accept its licence "
        f"first if gated) and copy the cache (HF_HOME), or pass a local folder"
    )


def _from_pretrained(cls: Any, spec: str, **kwargs: Any) -> Any:
    """cls.from_pretrained from a folder or the hub (the local cache when offline or HF_HUB_OFFLINE=1)."""
    is_folder = os.path.isdir(spec)
    try:
        return cls.from_pretrained(spec, **kwargs)
    except (OSError, ValueError) as err:
        if is_folder:
            raise UsageError(f"cannot load '{spec}' as {cls.__name__}: {str(err).splitlines()[0]}") from err
        raise _offline_hint(spec, err) from err


def _is_toy_folder(spec: str) -> bool:
    """True for the trained toy-world presets' folders (assets/toyworld)."""
    from common.models.presets import TOYWORLD_DIR

    return os.path.abspath(spec).startswith(str(TOYWORLD_DIR))


def _shared_components(folder: str, torch_dtype: torch.dtype | None) -> dict[str, Any]:
    """The components a pipeline folder borrows from a sibling instead of holding a second copy on disk.

    A folder with `shared_components.json` (toy-sdxl: toy-sd's VAE, text encoder, tokenizer, scheduler) names
    the sibling (`base`) and which of its subfolders fill which slots; each is loaded with the class that the
    folder's model_index.json gives, through its own from_pretrained. `text_encoder_2` (a
    CLIPTextModelWithProjection) is the sibling's text tower plus the folder's text_encoder_2/text_projection.
    """
    path = Path(folder) / "shared_components.json"
    if not path.is_file():
        return {}
    from common.io import load_weights

    spec = json.loads(path.read_text())
    index = json.loads((Path(folder) / "model_index.json").read_text())
    base = (Path(folder) / spec["base"]).resolve()
    if not (base / "model_index.json").is_file():
        raise UsageError(f"'{folder}' shares components with '{base}', which holds no pipeline")
    out: dict[str, Any] = {}
    for name, sub in spec.get("components", {}).items():
        cls = getattr(importlib.import_module(index[name][0]), index[name][1])
        kw = {"dtype": torch_dtype} if torch_dtype is not None and issubclass(cls, torch.nn.Module) else {}
        out[name] = cls.from_pretrained(base / sub, **kw)
    if "text_encoder_2" in spec:
        cls = getattr(importlib.import_module(index["text_encoder_2"][0]), index["text_encoder_2"][1])
        model = cls(cls.config_class.from_pretrained(Path(folder) / "text_encoder_2"))
        model.text_model.load_state_dict(load_weights(base / spec["text_encoder_2"] / "model.safetensors"))
        projection = load_weights(Path(folder) / "text_encoder_2" / "text_projection.safetensors")
        model.text_projection.load_state_dict({"weight": projection["text_projection.weight"]})
        out["text_encoder_2"] = model.to(dtype=torch_dtype or torch.float32).eval()
    return out


def load_pipeline(spec: str, pipeline_cls: type | None = None, *, torch_dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, **kwargs: Any) -> DiffusionPipeline:
    """A diffusers pipeline from a preset (`tiny-sd`, `sd14`, ...), a hub id or a local folder.

    `pipeline_cls` picks the pipeline class (e.g. StableDiffusionControlNetPipeline); extra components
    (controlnet=...) go in kwargs. Tiny presets are built in code and converted with `from_pipe`.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    spec = resolve_spec(spec)
    _check_exists(spec)
    if is_tiny(spec):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("revision", "variant")}
        if PRESETS[spec].family == "controlnet":
            raise UsageError(f"'{spec}' is a ControlNet, not a pipeline: load it with load_controlnet")
        pipe = build_tiny(spec)
        if kwargs or (pipeline_cls is not None and not isinstance(pipe, pipeline_cls)):
            with _quiet_diffusers():  # from_pipe re-casts to the same dtype and warns about it
                pipe = (pipeline_cls or type(pipe)).from_pipe(pipe, **kwargs)
        if torch_dtype is not None and torch_dtype != pipe.dtype:
            pipe = pipe.to(dtype=torch_dtype)
    else:
        cls = pipeline_cls or DiffusionPipeline
        if torch_dtype is None and _is_toy_folder(spec):
            torch_dtype = torch.float32  # toy weights are stored in fp16 (to stay small) but run in fp32
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        kwargs = {**_shared_components(spec, torch_dtype), **kwargs}  # toy-sdxl: toy-sd's VAE, text encoder, ...
        pipe = _from_pretrained(cls, spec, **kwargs)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def load_model(spec: str, model_cls: type, *, torch_dtype: torch.dtype | None = None, **kwargs: Any) -> Any:
    """One model (e.g. a ControlNetModel or a UNet subfolder) from a preset, a hub id or a folder."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    spec = resolve_spec(spec)
    _check_exists(spec)
    if is_tiny(spec):
        model = build_tiny(spec)
        if not isinstance(model, model_cls):
            raise UsageError(f"preset '{spec}' is a {type(model).__name__}, not a {model_cls.__name__}")
        return model.to(dtype=torch_dtype) if torch_dtype not in (None, model.dtype) else model
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    return _from_pretrained(model_cls, spec, **kwargs)


def load_controlnet(spec: str, **kwargs: Any):
    """A ControlNetModel from `tiny-controlnet`, a preset such as `controlnet-depth-sd15`, a hub id or folder."""
    from diffusers import ControlNetModel

    return load_model(spec, ControlNetModel, **kwargs)


def pipeline_family(pipe: DiffusionPipeline) -> str:
    """Which prompt encoding / denoiser a pipeline needs: sd | sdxl | flux | if | if-sr."""
    name = type(pipe).__name__
    if name.startswith("IF"):
        return "if-sr" if "SuperResolution" in name else "if"
    if getattr(pipe, "transformer", None) is not None and name.startswith("Flux"):
        return "flux"
    if getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "unet", None) is not None:
        return "sdxl"
    if getattr(pipe, "unet", None) is not None:
        return "sd"
    raise UsageError(f"unsupported pipeline class {name}: expected an SD, SDXL, FLUX or DeepFloyd IF pipeline")


def preset_family(spec: str) -> str | None:
    """The family of a preset or known hub id, without loading anything (None when unknown)."""
    preset = get_preset(spec)
    return preset.family if preset else None
