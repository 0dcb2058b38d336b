"""The released SynCD FLUX checkpoint layout (§4): a flat state dict whose LoRA keys start with
`transformer.base_model.model.`; loaded with a STRICT key check (the original's strict=False silently
loads nothing when the prefix is wrong)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from common.errors import UsageError
from common.io import load_weights, save_weights
from common.train.lora import LORA_TARGET_MODULES, add_lora, lora_state_dict

PREFIX = "transformer.base_model.model."
SDXL_PREFIX = "unet.base_model.model."
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
    (SDXL: prefix "unet.base_model.model.")."""
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


def load_syncd_checkpoint(transformer: torch.nn.Module, path: str | os.PathLike, *, rank: int | None = None,
                          alpha: float | None = None, target_modules=INFERENCE_TARGETS, prefix: str = PREFIX) -> int:
    """Add the LoRA ("default"; rank from the file unless given, alpha = rank unless our manifest says
    otherwise; the released model: r = alpha = 32) and load `path`; returns the number of LoRA tensors loaded.

    Errors (one line): no key with the prefix, a LoRA key the model does not have, a shape mismatch."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in (path / "pytorch_model.bin", path / "pytorch_model.safetensors") if p.is_file()]
        if not found:
            raise UsageError(f"--finetuned_path {path} has no pytorch_model.bin / pytorch_model.safetensors")
        path = found[0]
    sd = load_weights(path)
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

#: Where the IP-Adapter weights may sit inside the Lightning `state_dict` (§4 names no exact prefix): the released
#: file's own sub-dict names, or the IP-Adapter training code's module names (`image_proj_model`,
#: `adapter_modules.{n}` with n the processor slot, the released numbering).
IP_PREFIXES: dict[str, str] = {"image_proj.": "image_proj", "image_proj_model.": "image_proj",
                               "ip_adapter.": "ip_adapter", "adapter_modules.": "ip_adapter"}


def read_sdxl_lightning_checkpoint(path: str | os.PathLike, prefix: str = SDXL_PREFIX
                                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]] | None]:
    """`sdxl_finetuned_20k.ckpt` ({"state_dict": {...}, ...}, torch.load weights_only=True) -> (LoRA keys with
    `prefix`, IP-Adapter {"image_proj", "ip_adapter"} or None). Strict: every key must be one of the two kinds."""
    from common.io import safe_torch_load

    path = Path(path)
    try:
        ckpt = safe_torch_load(path)
    except UsageError as e:
        if "pickled Python objects" not in str(e):
            raise
        raise UsageError(f"{path} holds pickled Python objects that weights_only loading refuses; convert once: re-save only its "
                         "'state_dict' (a dict of tensors) as .safetensors or a tensors-only .ckpt with the tool "
                         "that wrote it, then pass that file") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UsageError(f"{path} is not a Lightning checkpoint (no 'state_dict' dict)")
    lora: dict[str, torch.Tensor] = {}
    ip: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in ckpt["state_dict"].items():
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        if key.startswith(prefix) and ".lora_" in key:
            lora[key] = value
            continue
        head = next((p for p in IP_PREFIXES if key.startswith(p)), None)
        if head is None:
            raise UsageError(f"{path}: state_dict key {key!r} is neither UNet LoRA ({prefix}...lora_A/B) nor "
                             f"IP-Adapter ({', '.join(IP_PREFIXES)})")
        ip[IP_PREFIXES[head]][key[len(head):]] = value
    if not lora:
        raise UsageError(f"{path}: no UNet LoRA keys ({prefix}...lora_A/B) in its state_dict")
    if bool(ip["image_proj"]) != bool(ip["ip_adapter"]):
        raise UsageError(f"{path}: IP-Adapter weights need both the image projection and to_k_ip/to_v_ip")
    return lora, (ip if ip["ip_adapter"] else None)


def load_sdxl_lightning_checkpoint(unet: torch.nn.Module, path: str | os.PathLike, *,
                                   image_encoder=None, ip_adapter_scale: float = 0.6):
    """Load the UNet LoRA (strict, as `load_syncd_checkpoint`) and, when present, the IP-Adapter-Plus weights
    (strict key/shape check against this UNet). Returns (number of LoRA tensors, IPAdapter handle or None)."""
    import tempfile

    from common.models.ip_adapter import load_ip_adapter

    lora, ip = read_sdxl_lightning_checkpoint(path)
    with tempfile.TemporaryDirectory() as tmp:  # reuse the strict LoRA loader on the extracted keys
        flat = Path(tmp) / "pytorch_model.safetensors"
        save_weights({k: v.contiguous() for k, v in lora.items()}, flat)
        n = load_syncd_checkpoint(unet, flat, target_modules=SDXL_TARGETS, prefix=SDXL_PREFIX)
    handle = None if ip is None else load_ip_adapter(unet, ip, image_encoder=image_encoder, scale=ip_adapter_scale)
    return n, handle
