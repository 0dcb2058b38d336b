"""The released SynCD checkpoint layouts (§4), loaded with a STRICT key check (the original's strict=False
silently loads nothing when a prefix is wrong).

FLUX `pytorch_model.bin`: a flat state dict of the module whose attribute `transformer` is a PEFT
`get_peft_model` wrapper, so LoRA keys read `transformer.base_model.model.<module>.lora_A.default.weight`
(`sample_flux.py` keeps keys containing that prefix and strips it).

SDXL `sdxl_finetuned_20k.ckpt`: a Lightning checkpoint; `main.py`'s CUDACallback keeps only the
`state_dict` keys containing a trainkey (`lora`, `to_k_ip`, `to_v_ip`). The module's attribute `unet`
got its LoRA through diffusers' `unet.add_adapter` (no PEFT wrapper) and its IP-Adapter-Plus through
diffusers' `load_ip_adapter`, each processor then wrapped as `RefAttnProc(attn_op=<processor>)`, so:
  `unet.<module>.lora_A.default.weight`, `unet.<module>.lora_B.default.weight` (module = ...attn1.to_q/k/v/out.0)
  `unet.<attention>.processor.attn_op.to_k_ip.0.weight`, `...to_v_ip.0.weight` (attention = ...attn2)
(`sample.py` keeps keys containing `unet.` and strips it). The image projection (Resampler) is not in the
file: it comes from `ip-adapter-plus_sdxl_vit-h.bin`, loaded before the checkpoint."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from common.errors import UsageError
from common.io import load_weights, save_weights
from common.train.lora import LORA_TARGET_MODULES, add_lora, lora_state_dict

PREFIX = "transformer.base_model.model."
SDXL_PREFIX = "unet."  # the Lightning module attribute; diffusers add_adapter adds no wrapper
SDXL_TARGETS: tuple[str, ...] = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")  # UNet self-attention
RANK = 32
#: Training list (configs/train_flux.yaml) = common's FLUX preset.
TRAIN_TARGETS: tuple[str, ...] = LORA_TARGET_MODULES["flux"]
#: sample_flux.py's list (adds the single blocks' MLP/out projections; absent ones stay a no-op: lora_B = 0).
INFERENCE_TARGETS: tuple[str, ...] = ("to_k", "to_q", "to_v", "add_k_proj", "add_q_proj", "add_v_proj", "to_out.0",
                                      "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                      "ff_context.net.2", "proj_mlp", "proj_out")


def syncd_state_dict(transformer: torch.nn.Module, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """LoRA weights in the released layout: `transformer.base_model.model.<module>.lora_A.default.weight`
    (SDXL: prefix "unet.", i.e. `unet.<module>.lora_A.default.weight`)."""
    state = lora_state_dict(transformer)  # keys "<module>.lora_A.weight"
    out = {}
    for k, v in state.items():
        head, tail = k.rsplit(".lora_", 1)
        ab, rest = tail.split(".", 1)
        out[f"{prefix}{head}.lora_{ab}.default.{rest}"] = v.detach().contiguous()
    return out


def save_syncd_checkpoint(transformer: torch.nn.Module, path: str | os.PathLike, prefix: str = PREFIX) -> Path:
    path = Path(path)
    save_weights(syncd_state_dict(transformer, prefix), path)
    return path


def checkpoint_file(path: str | os.PathLike) -> Path:
    """--finetuned_path as a file: itself, or in a folder its pytorch_model.safetensors (ours) or
    pytorch_model.bin (the released FLUX model)."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = [p for p in (path / "pytorch_model.safetensors", path / "pytorch_model.bin") if p.is_file()]
    if not found:
        raise UsageError(f"--finetuned_path {path} has no pytorch_model.safetensors / pytorch_model.bin")
    return found[0]


def load_syncd_checkpoint(transformer: torch.nn.Module, path: str | os.PathLike, *, rank: int | None = None,
                          alpha: float | None = None, target_modules=INFERENCE_TARGETS, prefix: str = PREFIX) -> int:
    """Add the LoRA ("default"; rank from the file unless given, alpha = rank unless our manifest says
    otherwise; the released model: r = alpha = 32) and load `path`; returns the number of LoRA tensors loaded.

    Errors (one line): no key with the prefix, a LoRA key the model does not have, a shape mismatch."""
    path = checkpoint_file(path)
    sd = load_weights(path)
    ip = next((k for k in sd if ".to_k_ip." in k or ".to_v_ip." in k), None)
    if ip is not None:
        raise UsageError(f"{path} also holds IP-Adapter weights ({ip!r}); load it as an SDXL checkpoint "
                         "(load_sdxl_checkpoint, with --ip_adapter_path) so they are not dropped")
    lora = {k: v for k, v in sd.items() if "lora_" in k}
    if not lora:
        raise UsageError(f"{path} holds no LoRA weights (keys with lora_A/lora_B)")
    matched = {k[len(prefix):]: v for k, v in lora.items() if k.startswith(prefix)}
    if not matched:
        first = next(iter(lora))
        raise UsageError(f"{path}: 0 of {len(lora)} LoRA keys start with {prefix!r} (first key: {first!r}); "
                         "not a SynCD checkpoint for this loader")
    if len(matched) != len(lora):
        stray = next(k for k in lora if not k.startswith(prefix))
        raise UsageError(f"{path}: LoRA key {stray!r} lacks the prefix {prefix!r}")
    if rank is None:  # the file's own rank (lora_A is [r, in]); alpha from our manifest, else = rank (scale 1)
        rank = int(next(v for k, v in matched.items() if ".lora_A." in k).shape[0])
    if alpha is None:
        from common.models.adapters import read_manifest

        alpha = float(((read_manifest(path.parent) or {}).get("info") or {}).get("lora_alpha") or rank)
    if not any(".lora_" in n for n, _ in transformer.named_parameters()):
        add_lora(transformer, rank, alpha=alpha, target_modules=list(target_modules), trainable_dtype=None)
    own = transformer.state_dict()
    unknown = [k for k in matched if k not in own]
    if unknown:
        raise UsageError(f"{path}: {len(unknown)} LoRA key(s) match no module of this transformer "
                         f"(first: {unknown[0]!r}); wrong base model or target list")
    bad = [k for k, v in matched.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise UsageError(f"{path}: shape mismatch for {bad[0]}: got {tuple(matched[bad[0]].shape)}, "
                         f"expected {tuple(own[bad[0]].shape)} (LoRA rank {rank}?)")
    dtype = next(transformer.parameters()).dtype
    transformer.load_state_dict({k: v.to(dtype) for k, v in matched.items()}, strict=False)
    return len(matched)


# ---------------------------------------------------------------------------------------------- SDXL (Lightning)

#: `unet.<attention>.processor.attn_op.to_k_ip.<adapter>.weight`: the trained IP-Adapter key/value projections.
_IP_KEY = re.compile(r"^(?P<attn>.+)\.processor\.attn_op\.(?P<kind>to_k_ip|to_v_ip)\.(?P<i>\d+)\.weight$")
_LORA_KEY = re.compile(r"\.lora_[AB]\.default\.weight$")


def sdxl_ip_state_dict(unet: torch.nn.Module, prefix: str = SDXL_PREFIX) -> dict[str, torch.Tensor]:
    """The loaded IP-Adapter's to_k_ip/to_v_ip in the Lightning layout
    (`unet.<attention>.processor.attn_op.to_k_ip.0.weight`); {} when no IP-Adapter is on `unet`."""
    from common.models.ip_adapter import ip_adapter_processors

    out = {}
    for name, proc in ip_adapter_processors(unet).items():
        attn = name[: -len(".processor")]
        for kind in ("to_k_ip", "to_v_ip"):
            for i, layer in enumerate(getattr(proc, kind)):
                out[f"{prefix}{attn}.processor.attn_op.{kind}.{i}.weight"] = layer.weight.detach().contiguous()
    return out


def sdxl_state_dict(unet: torch.nn.Module, *, ip: bool = True) -> dict[str, torch.Tensor]:
    """What the original's SDXL checkpoint `state_dict` holds: UNet LoRA (+ to_k_ip/to_v_ip when `ip`)."""
    out = syncd_state_dict(unet, SDXL_PREFIX)
    if ip:
        out.update(sdxl_ip_state_dict(unet))
    return out


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A Lightning `.ckpt` ({"state_dict": ...}, weights_only) or a flat file (ours: .safetensors)."""
    from common.io import safe_torch_load

    if path.suffix.lower() not in (".ckpt", ".pt", ".pth", ".bin"):
        return load_weights(path)
    try:
        ckpt = safe_torch_load(path)
    except UsageError as e:
        if "pickled Python objects" not in str(e):
            raise
        raise UsageError(f"{path} holds pickled Python objects that weights_only loading refuses; convert once: re-save only its "
                         "'state_dict' (a dict of tensors) as .safetensors or a tensors-only .ckpt with the tool "
                         "that wrote it, then pass that file") from None
    if path.suffix.lower() == ".ckpt":
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise UsageError(f"{path} is not a Lightning checkpoint (no 'state_dict' dict)")
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} does not hold a state dict")
    return ckpt


def read_sdxl_lightning_checkpoint(path: str | os.PathLike, prefix: str = SDXL_PREFIX
                                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """`sdxl_finetuned_20k.ckpt` (or our flat `pytorch_model.safetensors` with the same keys, or its folder) ->
    (LoRA keys `unet.<module>.lora_A/B.default.weight`, IP keys `unet.<attention>.processor.attn_op.to_k_ip/
    to_v_ip.0.weight` or None). Strict: every key must be one of the two kinds."""
    path = checkpoint_file(path)
    lora: dict[str, torch.Tensor] = {}
    ip: dict[str, torch.Tensor] = {}
    for key, value in _read_state(path).items():
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        rest = key[len(prefix):] if key.startswith(prefix) else None
        if rest is not None and _LORA_KEY.search(rest):
            lora[key] = value
        elif rest is not None and _IP_KEY.match(rest):
            ip[key] = value
        else:
            raise UsageError(f"{path}: state_dict key {key!r} is neither UNet LoRA ({prefix}<module>.lora_A.default."
                             f"weight) nor IP-Adapter ({prefix}<attention>.processor.attn_op.to_k_ip.0.weight)")
    if not lora:
        raise UsageError(f"{path}: no UNet LoRA keys ({prefix}<module>.lora_A/B.default.weight) in its state_dict")
    return lora, (ip or None)


def ip_state_from_checkpoint(unet: torch.nn.Module, ip: dict[str, torch.Tensor], base: dict,
                             source: str = "checkpoint", prefix: str = SDXL_PREFIX) -> dict:
    """The base IP-Adapter state ({"image_proj", "ip_adapter"}, released numbering) with its to_k_ip/to_v_ip
    replaced by the checkpoint's. Strict: one adapter (index 0), every cross-attention layer of `unet` given
    both projections, no key for a layer `unet` lacks (shapes are checked when it loads)."""
    from common.models.ip_adapter import cross_attention_layers

    slot = {name[: -len(".processor")]: n for n, name, _ in cross_attention_layers(unet)}
    mapped: dict[str, torch.Tensor] = {}
    for key, value in ip.items():
        m = _IP_KEY.match(key[len(prefix):])
        if m["i"] != "0":
            raise UsageError(f"{source}: {key!r} belongs to IP-Adapter {m['i']}; SynCD has one (index 0)")
        if m["attn"] not in slot:
            raise UsageError(f"{source}: {key!r} names no cross-attention layer of this UNet (wrong base model?)")
        mapped[f"{slot[m['attn']]}.{m['kind']}.weight"] = value
    missing = [f"{prefix}{a}.processor.attn_op.{k}.0.weight" for a, n in slot.items() for k in ("to_k_ip", "to_v_ip")
               if f"{n}.{k}.weight" not in mapped]
    if missing:
        raise UsageError(f"{source}: {len(missing)} to_k_ip/to_v_ip weight(s) missing (first: {missing[0]!r})")
    return {"image_proj": dict(base["image_proj"]), "ip_adapter": mapped}


def load_sdxl_checkpoint(unet: torch.nn.Module, path: str | os.PathLike, *, ip_adapter_path: str | os.PathLike | None = None,
                         image_encoder=None, ip_adapter_scale: float = 0.6):
    """Load a SynCD SDXL checkpoint (the Lightning `.ckpt`, or our `pytorch_model.safetensors` / its folder):
    the UNet LoRA (strict, as `load_syncd_checkpoint`) and, with `ip_adapter_path` (ip-adapter-plus_sdxl_vit-h.bin,
    whose image projection the checkpoint does not hold), the IP-Adapter with the checkpoint's fine-tuned
    to_k_ip/to_v_ip. Returns (number of LoRA tensors, IPAdapter handle or None)."""
    import tempfile

    from common.models.ip_adapter import load_ip_adapter, read_ip_adapter

    lora, ip = read_sdxl_lightning_checkpoint(path)
    if ip is not None and ip_adapter_path is None:
        raise UsageError(f"{path} holds fine-tuned IP-Adapter to_k_ip/to_v_ip but not the image projection: pass "
                         "--ip_adapter_path ip-adapter-plus_sdxl_vit-h.bin (the IP-Adapter it was trained from)")
    with tempfile.TemporaryDirectory() as tmp:  # reuse the strict LoRA loader on the extracted keys
        flat = Path(tmp) / "pytorch_model.safetensors"
        save_weights({k: v.contiguous() for k, v in lora.items()}, flat)
        alpha = None
        if Path(path).is_dir() or Path(path).suffix == ".safetensors":  # ours: alpha from the manifest
            from common.models.adapters import read_manifest

            folder = Path(path) if Path(path).is_dir() else Path(path).parent
            alpha = ((read_manifest(folder) or {}).get("info") or {}).get("lora_alpha")
        n = load_syncd_checkpoint(unet, flat, target_modules=SDXL_TARGETS, prefix=SDXL_PREFIX,
                                  alpha=None if alpha is None else float(alpha))
    if ip_adapter_path is None:
        return n, None
    base = read_ip_adapter(ip_adapter_path)
    state = base if ip is None else ip_state_from_checkpoint(unet, ip, base, str(path))
    return n, load_ip_adapter(unet, state, image_encoder=image_encoder, scale=ip_adapter_scale)


def load_sdxl_lightning_checkpoint(unet: torch.nn.Module, path: str | os.PathLike, *, image_encoder=None,
                                   ip_adapter_scale: float = 0.6, ip_adapter_path: str | os.PathLike | None = None):
    """`load_sdxl_checkpoint` under its earlier name."""
    return load_sdxl_checkpoint(unet, path, ip_adapter_path=ip_adapter_path, image_encoder=image_encoder,
                                ip_adapter_scale=ip_adapter_scale)
