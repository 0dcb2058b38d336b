"""Every Custom Diffusion checkpoint layout, read and written through one in-memory form.

Layouts (spec §2):
* "diffusers" -- upstream diffusers: a folder with `pytorch_custom_diffusion_weights.{safetensors,bin}`
  (`<layer>.processor.to_k_custom_diffusion.weight`, ...) and one textual-inversion file per modifier
  token, `<new1>.{safetensors,bin}` = {"<new1>": [D]} (SDXL: {"clip_l": [1, D1], "clip_g": [1, D2]}).
* "delta" -- the reference repo's diffusers path, `delta.bin` = {"unet": {<UNet param>: W}, "modifier_token":
  {"<new1>": [D]}} (SDXL: a list of one vector per text encoder); compressed K/V are {"u": [out, r], "v": [r, in]}.
  As `.safetensors` the nesting is flattened with dots ("unet.<param>[.u|.v]", "modifier_token.<tok>[.<i>]").
* "ldm" -- CompVis/LDM `delta_*.ckpt` = {"state_dict": {"model.diffusion_model.<...>.attn2.to_k.weight": W,
  "embed": [N, D]}}; the embed rows are `<new1>..<newN>` in order. Flat keys in `.safetensors`.

"delta" files hold full fine-tuned weights (not differences); only compressed entries are low-rank differences.
Writing defaults to `.safetensors`; reading auto-detects the layout and never unpickles code (common.io).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import UsageError
from common.io import atomic_write, load_weights, save_weights
from customdiffusion.attention import param_to_proc_key, proc_key_to_param
from customdiffusion.ldm_keys import LDM_PREFIX, from_ldm, to_ldm

FORMATS = ("diffusers", "delta", "ldm")
PROCS_NAME = "pytorch_custom_diffusion_weights"
SDXL_TI_KEYS = ("clip_l", "clip_g")
_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth")

Entry = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class CustomDiffusionWeights:
    """A trained concept (or a merge of several).

    unet: UNet parameter name ('down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight') -> full
    weight [out, in] (bias [out]), or for a compressed K/V {"u": [out, r], "v": [r, in]} (W = W0 + u @ v).
    tokens: modifier token -> one embedding [D_i] per text encoder (SD: 1, SDXL: 2), in token order.
    """

    unet: dict[str, Entry]
    tokens: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def compressed(self) -> bool:
        return any(isinstance(v, Mapping) for v in self.unet.values())

    @property
    def freeze_model(self) -> str:
        return "crossattn" if any(".attn2.to_q." in k or ".attn2.to_out." in k for k in self.unet) else "crossattn_kv"


# ----------------------------------------------------------------------------------------------- helpers


def _natural(s: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save atomically; for nested layouts with lists (SDXL delta.bin) that save_weights does not take."""
    def compact(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return o.detach().clone().contiguous()
        if isinstance(o, Mapping):
            return {k: compact(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [compact(v) for v in o]
        raise TypeError(f"cannot save {type(o).__name__} in a weights file")
    with atomic_write(path) as tmp:
        torch.save(compact(obj), tmp)


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors"


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in _SUFFIXES:
        raise UsageError(f"unknown weights extension for {path}; use .safetensors, .bin or .ckpt")


# --------------------------------------------------------------------------------------- diffusers (upstream)


def _embedding_file_tokens(sd: Mapping[str, Any], stem: str) -> tuple[str, list[torch.Tensor]] | None:
    """One textual-inversion file -> (token, vectors per encoder), or None if it is not one.

    SD files name the token by their key ({"<new1>": [D]}); SDXL files ({"clip_l", "clip_g"}) by file stem.
    """
    if all(k in sd for k in SDXL_TI_KEYS):
        return stem, [sd[k].reshape(-1) for k in SDXL_TI_KEYS]
    if len(sd) == 1:
        ((token, value),) = sd.items()
        if isinstance(value, torch.Tensor) and value.dim() in (1, 2) and (value.dim() == 1 or value.shape[0] == 1):
            return token, [value.reshape(-1)]
    return None


def _procs_file(folder: Path) -> Path | None:
    for suffix in (".safetensors", ".bin"):
        if (folder / f"{PROCS_NAME}{suffix}").is_file():
            return folder / f"{PROCS_NAME}{suffix}"
    return None


def load_diffusers(path: str | Path) -> CustomDiffusionWeights:
    """A `save_attn_procs` folder (or its weights file) plus the `<token>.{bin,safetensors}` files beside it."""
    path = Path(path)
    weights_file = path if path.is_file() else _procs_file(path)
    if weights_file is None:
        raise UsageError(f"{path} has no {PROCS_NAME}.safetensors or .bin; is it a Custom Diffusion output folder?")
    sd = load_weights(weights_file)
    unet = {}
    for key, value in sd.items():
        if isinstance(value, Mapping) and not value:
            continue  # parameter-free self-attention processors that save_attn_procs records as {}
        if "custom_diffusion" not in key or not isinstance(value, torch.Tensor):
            raise UsageError(f"{weights_file}: unexpected key {key!r}; expected only ..._custom_diffusion weights")
        unet[proc_key_to_param(key)] = value
    tokens: dict[str, list[torch.Tensor]] = {}
    for file in sorted(weights_file.parent.iterdir(), key=lambda p: _natural(p.name)):
        if file == weights_file or file.name.startswith(".") or file.suffix.lower() not in (".safetensors", ".bin"):
            continue
        if file.stem == PROCS_NAME:
            continue
        found = _embedding_file_tokens(load_weights(file), file.stem)
        if found is not None:
            if found[0] in tokens:
                raise UsageError(f"{weights_file.parent} holds two embedding files for {found[0]!r}; keep one")
            tokens[found[0]] = found[1]
    return CustomDiffusionWeights(unet, tokens)


def remove_diffusers_layout(folder: str | Path) -> None:
    """Delete the files `load_diffusers` would read from `folder` (weights files of both suffixes, embedding
    files), so a concept written over another never mixes with its leftovers (e.g. a stale `<new2>` file)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for file in folder.iterdir():
        if not file.is_file() or file.name.startswith(".") or file.suffix.lower() not in (".safetensors", ".bin"):
            continue
        if file.stem == PROCS_NAME:
            file.unlink()
            continue
        try:
            found = _embedding_file_tokens(load_weights(file), file.stem)
        except UsageError:
            continue
        if found is not None:
            file.unlink()


def save_diffusers(weights: CustomDiffusionWeights, folder: str | Path, safe_serialization: bool = True) -> Path:
    """Write the upstream layout into `folder`; returns the weights file path."""
    if weights.compressed:
        raise UsageError("compressed deltas have no upstream diffusers layout; save them as 'delta' or 'ldm'")
    folder = Path(folder)
    if folder.suffix.lower() in _SUFFIXES:
        raise UsageError(f"the diffusers layout is a folder; pass a folder, not the file name {folder.name}")
    ext = ".safetensors" if safe_serialization else ".bin"
    state = {param_to_proc_key(k): v for k, v in weights.unet.items()}
    if not safe_serialization:  # diffusers' .bin loader needs every attention layer: attn1 ones as {} entries
        for key in list(state):
            layer = key.split(".processor.")[0]
            if layer.endswith(".attn2"):
                state.setdefault(layer[: -len("attn2")] + "attn1.processor", {})
    out = folder / f"{PROCS_NAME}{ext}"
    save_weights(state, out, metadata={"format": "pt"} if safe_serialization else None)
    for token, vectors in weights.tokens.items():
        if "/" in token or token.startswith("."):
            raise UsageError(f"modifier token {token!r} cannot be a file name")
        if len(vectors) == 1:
            emb = {token: vectors[0]}
        else:
            emb = {k: v.reshape(1, -1) for k, v in zip(SDXL_TI_KEYS, vectors)}
        save_weights(emb, folder / f"{token}{ext}")
    return out


# ----------------------------------------------------------------------------------------- delta.bin (reference)


def _unflatten_entry(flat: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.endswith((".u", ".v")):
            out.setdefault(name[:-2], {})[name[-1]] = value  # type: ignore[index]
        else:
            out[name] = value
    return out


def _tokens_from_delta(raw: Mapping[str, Any]) -> dict[str, list[torch.Tensor]]:
    tokens = {}
    for tok, value in raw.items():
        vectors = list(value) if isinstance(value, (list, tuple)) else [value]
        tokens[tok] = [v.reshape(-1) for v in vectors]
    return tokens


def delta_from_dict(sd: Mapping[str, Any], source: str = "delta") -> CustomDiffusionWeights:
    """Parse the reference `delta.bin` dict, nested (torch) or flattened (safetensors)."""
    if "text_encoder" in sd:
        raise UsageError(f"{source} holds a full text encoder (save_text_encoder=True), which is not supported")
    if "unet" in sd and isinstance(sd["unet"], Mapping):
        return CustomDiffusionWeights(dict(sd["unet"]), _tokens_from_delta(sd.get("modifier_token", {})))
    unet = _unflatten_entry(sd, "unet.")
    tokens: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith("modifier_token."):
            name = key[len("modifier_token."):]
            head, _, tail = name.rpartition(".")
            tok, idx = (head, int(tail)) if head and tail.isdigit() else (name, 0)
            tokens.setdefault(tok, {})[idx] = value.reshape(-1)
        elif not key.startswith("unet."):
            raise UsageError(f"{source}: unexpected key {key!r} in a delta file (expected unet.* and modifier_token.*)")
    return CustomDiffusionWeights(unet, {t: [v[i] for i in sorted(v)] for t, v in tokens.items()})


def save_delta(weights: CustomDiffusionWeights, path: str | Path) -> Path:
    """The reference `delta.bin` layout; `.safetensors` (flattened) or a torch pickle by extension."""
    path = Path(path)
    _check_suffix(path)
    if _is_safetensors(path):
        flat: dict[str, torch.Tensor] = {}
        for name, value in weights.unet.items():
            if isinstance(value, Mapping):
                flat[f"unet.{name}.u"], flat[f"unet.{name}.v"] = value["u"], value["v"]
            else:
                flat[f"unet.{name}"] = value
        for tok, vectors in weights.tokens.items():
            if len(vectors) == 1:
                flat[f"modifier_token.{tok}"] = vectors[0]
            else:
                flat.update({f"modifier_token.{tok}.{i}": v for i, v in enumerate(vectors)})
        save_weights(flat, path)
        return path
    tokens = {t: (v[0] if len(v) == 1 else list(v)) for t, v in weights.tokens.items()}
    _torch_save({"unet": dict(weights.unet), "modifier_token": tokens}, path)
    return path


# ------------------------------------------------------------------------------------------------ LDM / CompVis


def ldm_from_dict(sd: Mapping[str, Any], unet_config: Mapping[str, Any] | None,
                  source: str = "ldm delta") -> CustomDiffusionWeights:
    """Parse {"state_dict": {...}} (or its flat safetensors form); names go through `ldm_keys.from_ldm`."""
    if unet_config is None:
        raise UsageError(f"{source} uses LDM key names; mapping them needs the base UNet (pass the base model)")
    state = sd["state_dict"] if isinstance(sd.get("state_dict"), Mapping) else sd
    embed = state.get("embed")
    entries = _unflatten_entry({k: v for k, v in state.items() if k != "embed" and not isinstance(v, Mapping)}, "")
    entries.update({k: dict(v) for k, v in state.items() if isinstance(v, Mapping)})
    unet = {}
    for name, value in entries.items():
        if not name.startswith(LDM_PREFIX):
            raise UsageError(f"{source}: unexpected key {name!r} (expected {LDM_PREFIX}... or embed)")
        unet[from_ldm(name, unet_config)] = value
    tokens = {}
    if embed is not None:
        embed = embed.reshape(-1, embed.shape[-1])
        tokens = {f"<new{i + 1}>": [embed[i]] for i in range(embed.shape[0])}
    return CustomDiffusionWeights(unet, tokens)


def save_ldm(weights: CustomDiffusionWeights, path: str | Path, unet_config: Mapping[str, Any]) -> Path:
    """`delta_*.ckpt` = {"state_dict": {LDM name: W, "embed": [N, D]}}; flat keys in `.safetensors`."""
    path = Path(path)
    _check_suffix(path)
    if any(len(v) != 1 for v in weights.tokens.values()):
        raise UsageError("the LDM layout stores one text encoder's embeddings; SDXL concepts need 'delta' or 'diffusers'")
    expected = [f"<new{i + 1}>" for i in range(len(weights.tokens))]
    if list(weights.tokens) != expected:
        raise UsageError(f"the LDM layout names modifier tokens by position ({'+'.join(expected)}); "
                         f"got {'+'.join(weights.tokens)}")
    state: dict[str, Any] = {to_ldm(k, unet_config): v for k, v in weights.unet.items()}
    if weights.tokens:
        state["embed"] = torch.stack([v[0] for v in weights.tokens.values()])
    if _is_safetensors(path):
        flat = {}
        for k, v in state.items():
            if isinstance(v, Mapping):
                flat[f"{k}.u"], flat[f"{k}.v"] = v["u"], v["v"]
            else:
                flat[k] = v
        save_weights(flat, path)
    else:
        save_weights({"state_dict": state}, path)
    return path


# ------------------------------------------------------------------------------------------- detect, load, save


def detect_format(path: str | Path, sd: Mapping[str, Any] | None = None) -> str:
    """'diffusers' | 'delta' | 'ldm', from a folder or the keys of a loaded file."""
    path = Path(path)
    if path.is_dir():
        if _procs_file(path) is not None:
            return "diffusers"
        raise UsageError(f"{path} is a folder without {PROCS_NAME}.*; pass the delta file or the output folder")
    keys = list(sd) if sd is not None else []
    if any("custom_diffusion" in k for k in keys):
        return "diffusers"
    if "unet" in keys or any(k.startswith(("unet.", "modifier_token.")) for k in keys):
        return "delta"
    if "state_dict" in keys or "embed" in keys or any(k.startswith(LDM_PREFIX) for k in keys):
        return "ldm"
    shown = ", ".join(keys[:5]) or "nothing"
    raise UsageError(f"{path} is not a Custom Diffusion checkpoint (found keys {shown}); expected "
                     f"{PROCS_NAME}.*, a delta.bin ('unet', 'modifier_token') or an LDM delta ('state_dict')")


def check_finite(weights: CustomDiffusionWeights, source: str = "concept") -> None:
    """Refuse NaN/inf anywhere in a concept: it would sample black images without a word."""
    named: list[tuple[str, torch.Tensor]] = []
    for name, value in weights.unet.items():
        named += [(f"{name}.{k}", v) for k, v in value.items()] if isinstance(value, Mapping) else [(name, value)]
    for token, vectors in weights.tokens.items():
        named += [(f"embedding of {token}", v) for v in vectors]
    bad = [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UsageError(f"{source} holds NaN/inf values in {len(bad)} tensor(s) (e.g. {bad[0]}); the training "
                         "diverged -- retrain with a lower --learning_rate or without fp16")


def _load(path: Path, unet_config: Mapping[str, Any] | None) -> CustomDiffusionWeights:
    if path.is_dir():
        detect_format(path)
        return load_diffusers(path)
    sd = load_weights(path)
    fmt = detect_format(path, sd)
    if fmt == "diffusers":
        return load_diffusers(path)
    if fmt == "delta":
        return delta_from_dict(sd, str(path))
    return ldm_from_dict(sd, unet_config, str(path))


def load(path: str | Path, unet_config: Mapping[str, Any] | None = None) -> CustomDiffusionWeights:
    """Any layout above, auto-detected, every value finite. LDM files need `unet_config` (e.g.
    `pipe.unet.config`) for key names."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"Custom Diffusion checkpoint not found: {path}; check the path")
    weights = _load(path, unet_config)
    check_finite(weights, str(path))
    return weights


def save(weights: CustomDiffusionWeights, path: str | Path, fmt: str = "delta",
         unet_config: Mapping[str, Any] | None = None, safe_serialization: bool = True) -> Path:
    """Write `weights` in layout `fmt`. 'diffusers' takes a folder; the others a file whose extension picks
    safetensors or a torch pickle (`safe_serialization` only matters for the folder layout)."""
    if fmt == "diffusers":
        return save_diffusers(weights, path, safe_serialization)
    if fmt == "delta":
        return save_delta(weights, path)
    if fmt == "ldm":
        if unet_config is None:
            raise UsageError("writing LDM key names needs the base UNet's config")
        return save_ldm(weights, path, unet_config)
    raise UsageError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
