"""Released IP-Adapter checkpoints on any SD/SDXL UNet, through diffusers' own processors and projections.

Checkpoint layout (h94/IP-Adapter, spec mipadapter §2.1): {"image_proj": {...}, "ip_adapter": {"{n}.to_k_ip.weight",
"{n}.to_v_ip.weight"}} with n = 1, 3, 5, ... the index of each cross-attention processor in the UNet's
`attn_processors` order (self-attention slots are the even ones). In `.safetensors` the two dicts are flattened
with the prefixes `image_proj.` / `ip_adapter.`. Variants, told apart by the image_proj keys:
* "plain" (`ip-adapter_sdxl.bin`): `proj.weight [T*C, E]` + LayerNorm -> diffusers' `ImageProjection`, fed the
  encoder's pooled projection (E = projection_dim, ViT-bigG/14 for SDXL), T = 4 tokens;
* "plus" (`ip-adapter-plus_sdxl_vit-h.bin`): a Perceiver Resampler (`latents [1, T, W]`, `layers.i.0.to_kv`, ...)
  -> diffusers' `IPAdapterPlusImageProjection`, fed the encoder's penultimate hidden states (ViT-H/14), T = 16.
Key renaming is diffusers' (`_convert_ip_adapter_image_proj_to_diffusers`, `_convert_ip_adapter_attn_to_diffusers`);
what we add: safe loading (weights_only / safetensors), key and shape checks against this UNet with one clear
error, several adapters stacked with per-adapter scale and removal that restores the previous processors
exactly, and image encoding into diffusers' `ip_adapter_image_embeds` layout.

Image embeds reach the UNet as `added_cond_kwargs["image_embeds"]`: a list with one tensor per loaded adapter
(load order), [B, n_images, E] (plain) or [B, n_images, L, W] (plus); under CFG the negative rows come first.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import MultiIPAdapterImageProjection

from common.errors import UsageError
from common.io import check_state_dict, load_weights, save_weights
from common.models.adapters import AdapterHandle, register_adapter
from common.models.image_encoders import ImageEncoder, ImageInput, load_image_encoder

SUBDICTS = ("image_proj", "ip_adapter")
FEATURE_OF_VARIANT = {"plain": "pooled", "plus": "penultimate"}
_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")

IPState = dict[str, dict[str, torch.Tensor]]


# ---------------------------------------------------------------------------------------------- checkpoints


def split_flat(sd: Mapping[str, Any], source: str = "checkpoint") -> IPState:
    """{"image_proj.x": t, "ip_adapter.y": t} (safetensors) or the nested pickle layout -> nested dicts."""
    if all(k in sd and isinstance(sd[k], Mapping) for k in SUBDICTS):
        return {k: dict(sd[k]) for k in SUBDICTS}
    out: IPState = {k: {} for k in SUBDICTS}
    for key, value in sd.items():
        head, _, tail = key.partition(".")
        if head not in out or not tail:
            raise UsageError(f"{source} is not an IP-Adapter checkpoint: key {key!r} is outside "
                             "'image_proj' / 'ip_adapter'")
        out[head][tail] = value
    if not out["image_proj"] or not out["ip_adapter"]:
        raise UsageError(f"{source} is not an IP-Adapter checkpoint: it needs both 'image_proj' and 'ip_adapter' weights")
    return out


def read_ip_adapter(path: str | Path) -> IPState:
    """Load an IP-Adapter file (.bin / .pt with weights_only, or .safetensors) into {"image_proj", "ip_adapter"}."""
    return split_flat(load_weights(path), str(path))


def save_ip_adapter(state: Mapping[str, Mapping[str, torch.Tensor]], path: str | Path) -> Path:
    """Write the original layout: nested in a torch pickle, flattened with prefixes in .safetensors (atomic)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        save_weights({f"{k}.{n}": t for k in SUBDICTS for n, t in state[k].items()}, path)
    else:
        save_weights({k: dict(state[k]) for k in SUBDICTS}, path)
    return path


def is_ip_adapter_state(sd: Mapping[str, Any]) -> bool:
    """True for the nested or flattened IP-Adapter layout (cheap: keys only)."""
    if all(k in sd for k in SUBDICTS):
        return True
    keys = list(sd)
    return bool(keys) and all(k.startswith(("image_proj.", "ip_adapter.")) for k in keys) \
        and any(k.startswith("ip_adapter.") for k in keys)


def variant_of(state: IPState, source: str = "checkpoint") -> str:
    """'plain' (linear projection) | 'plus' (Resampler); other IP-Adapter kinds (FaceID, full) are refused."""
    proj = state["image_proj"]
    if "proj.weight" in proj:
        return "plain"
    if "latents" in proj and "proj_in.weight" in proj:
        return "plus"
    raise UsageError(f"{source}: unsupported image projection (keys {', '.join(list(proj)[:4])}); "
                     "expected the ip-adapter (proj.weight) or plus (latents, proj_in) layout")


def num_tokens(state: IPState) -> int:
    """Image tokens T per reference image: 4 (plain) or latents.shape[1] (plus)."""
    proj = state["image_proj"]
    return 4 if "proj.weight" in proj else int(proj["latents"].shape[1])


def image_feature_dim(state: IPState) -> int:
    """Size of the encoder feature the projection takes: projection_dim (plain) or hidden size (plus)."""
    proj = state["image_proj"]
    return int(proj["proj.weight"].shape[1] if "proj.weight" in proj else proj["proj_in.weight"].shape[1])


def cross_attention_layers(unet: torch.nn.Module) -> list[tuple[int, str, torch.nn.Module]]:
    """(n, processor name, Attention) for every cross-attention layer, n = its odd checkpoint index."""
    modules = dict(unet.named_modules())
    out = []
    for i, name in enumerate(unet.attn_processors):
        if name.startswith("encoder_hid_proj."):  # a loaded Resampler's own attention, not the UNet's
            continue
        if not name.endswith("attn1.processor") and "motion_modules" not in name:
            out.append((i, name, modules[name[: -len(".processor")]]))
    for k, (i, name, _) in enumerate(out):
        if i != 2 * k + 1:  # the released numbering assumes attn1/attn2 alternate
            raise UsageError(f"this UNet's attention layers do not alternate self/cross ({name} is slot {i}); "
                             "released IP-Adapter key numbering does not apply to it")
    return out


def expected_ip_shapes(unet: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """'{n}.to_k_ip.weight' -> (hidden, cross_attention_dim) for this UNet."""
    shapes = {}
    for n, _, attn in cross_attention_layers(unet):
        shape = (attn.inner_dim, attn.cross_attention_dim)
        shapes[f"{n}.to_k_ip.weight"] = shape
        shapes[f"{n}.to_v_ip.weight"] = shape
    return shapes


def check_ip_adapter(state: IPState, unet: torch.nn.Module, source: str = "IP-Adapter",
                     ignore: str | None = r"^\d+\.text_to_weight\.weight$") -> None:
    """Keys and shapes must fit this UNet (keys matching `ignore`, e.g. MIP-Adapter's gates, are skipped)."""
    ip = {k: v for k, v in state["ip_adapter"].items() if not (ignore and re.match(ignore, k))}
    check_state_dict(ip, expect_shapes=expected_ip_shapes(unet), source=f"{source} (ip_adapter)")
    cross = unet.config.cross_attention_dim
    out = int(state["image_proj"]["norm.weight" if variant_of(state, source) == "plain" else "proj_out.weight"].shape[0])
    if out != cross:
        raise UsageError(f"{source}: image tokens have width {out} but this UNet's cross-attention takes {cross}; "
                         "check that the IP-Adapter was made for this base model")


def image_projection(state: IPState, unet: torch.nn.Module) -> torch.nn.Module:
    """diffusers' `ImageProjection` (plain) or `IPAdapterPlusImageProjection` (plus) holding the checkpoint's
    image_proj weights (renamed by diffusers' converter, strict), on the UNet's device and dtype.
    Input [N, E] (plain) or [N, L, E] (plus) -> image tokens [N, T, cross_attention_dim]."""
    param = next(unet.parameters())
    projection = unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
    return projection.to(device=param.device, dtype=param.dtype)


# ---------------------------------------------------------------------------------------------- the stack


@dataclass(eq=False)  # compared by identity (the stack finds its own entry)
class _Entry:
    state: IPState
    projection: torch.nn.Module
    scale: float = 1.0


@dataclass
class _Stack:
    """What was on the UNet before the first adapter, and the adapters loaded since (load order)."""

    base_processors: dict[str, Any]
    base_hid_proj: Any
    base_hid_type: Any
    entries: list[_Entry] = field(default_factory=list)


def _stack(unet: torch.nn.Module) -> _Stack | None:
    return unet.__dict__.get("_ip_adapter_stack")


def _rebuild(unet: torch.nn.Module, stack: _Stack) -> None:
    """Install processors and projections for the current entries (or restore the base when none is left)."""
    unet.encoder_hid_proj = None  # a Resampler's attention layers would join attn_processors (as in diffusers)
    current = dict(unet.attn_processors)
    cross = [name for _, name, _ in cross_attention_layers(unet)]
    if not stack.entries:
        unet.set_attn_processor({**current, **stack.base_processors})
        unet.encoder_hid_proj = stack.base_hid_proj
        unet.config.encoder_hid_dim_type = stack.base_hid_type  # diffusers sets the attribute the same way
        del unet.__dict__["_ip_adapter_stack"]
        return
    built = unet._convert_ip_adapter_attn_to_diffusers([e.state for e in stack.entries], low_cpu_mem_usage=False)
    param = next(unet.parameters())
    for name in cross:
        proc = built[name]
        proc.to(device=param.device, dtype=param.dtype)
        proc.scale = [e.scale for e in stack.entries]
        current[name] = proc
    unet.set_attn_processor(current)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([e.projection for e in stack.entries])
    unet.config.encoder_hid_dim_type = "ip_image_proj"


def ip_adapter_processors(unet: torch.nn.Module) -> dict[str, IPAdapterAttnProcessor2_0]:
    return {k: v for k, v in unet.attn_processors.items() if isinstance(v, IPAdapterAttnProcessor2_0)}


class IPAdapter(AdapterHandle):
    """One loaded IP-Adapter (an AdapterHandle): scale, removal, and image encoding into its `image_embeds` entry."""

    def __init__(self, unet: torch.nn.Module, state: IPState, *, image_encoder: ImageEncoder | str | None = None,
                 scale: float = 1.0, source: str | Path = "IP-Adapter"):
        source = str(source)
        check_ip_adapter(state, unet, source)
        super().__init__("ip_adapter", Path(source), set_scale=self._apply_scale, remove=self._detach,
                         info={"variant": variant_of(state, source)}, scale=float(scale))
        self.unet, self.source = unet, source
        self.variant = variant_of(state, source)
        self.num_tokens = num_tokens(state)
        self._encoder_spec = image_encoder
        self._encoder: ImageEncoder | None = None
        self._entry = _Entry(state, image_projection(state, unet), float(scale))
        stack = _stack(unet)
        if stack is None:
            stack = _Stack({n: unet.attn_processors[n] for _, n, _ in cross_attention_layers(unet)},
                           unet.encoder_hid_proj, unet.config.encoder_hid_dim_type)
            if stack.base_hid_proj is not None:
                raise UsageError(f"{source}: this UNet already projects its encoder states ({stack.base_hid_type}, "
                                 "e.g. an IP-Adapter loaded with diffusers' load_ip_adapter); unload it first")
            unet.__dict__["_ip_adapter_stack"] = stack
        stack.entries.append(self._entry)
        _rebuild(unet, stack)

    @property
    def index(self) -> int:
        """Position of this adapter in `image_embeds` (load order among the adapters still loaded)."""
        stack = _stack(self.unet)
        if stack is None or self._entry not in stack.entries:
            raise UsageError(f"{self.source} was removed")
        return stack.entries.index(self._entry)

    def _apply_scale(self, scale: float) -> None:
        """λ of this adapter in every cross-attention layer (0 skips its branch: the text-only output)."""
        i = self.index
        self._entry.scale = scale
        for proc in ip_adapter_processors(self.unet).values():
            proc.scale[i] = scale

    def _detach(self) -> None:
        """Drop this adapter; with none left, the previous processors and projection come back as they were."""
        stack = _stack(self.unet)
        if stack is not None and self._entry in stack.entries:
            stack.entries.remove(self._entry)
            _rebuild(self.unet, stack)

    # -- images
    @property
    def feature(self) -> str:
        return FEATURE_OF_VARIANT[self.variant]

    @property
    def image_encoder(self) -> ImageEncoder:
        if self._encoder is None:
            spec = self._encoder_spec or default_image_encoder(self._entry.state)
            param = next(self.unet.parameters())
            self._encoder = load_image_encoder(spec, torch_dtype=param.dtype, device=param.device)
            info = self._encoder.model.config
            have = info.projection_dim if self.variant == "plain" else info.hidden_size
            need = image_feature_dim(self._entry.state)
            if have != need:
                raise UsageError(f"{self.source} takes {self.feature} image features of size {need} but the image "
                                 f"encoder gives {have}; pass the encoder it was trained with")
        return self._encoder

    def encode(self, images: ImageInput | Sequence[ImageInput], *, batch_size: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference image(s) -> (positive, negative) image embeds, each [B, n_images, E] (plain) or
        [B, n_images, L, W] (plus), B = batch_size: this adapter's entry of `image_embeds` before CFG batching.

        Several images for one adapter are all attended to (diffusers' multi-image IP-Adapter)."""
        pos = self.image_encoder.encode(images, self.feature)
        neg = self.image_encoder.encode_negative(images, self.feature)
        return (pos[None].expand(batch_size, *pos.shape).contiguous(),
                neg[None].expand(batch_size, *neg.shape).contiguous())


    def image_embeds(self, images: ImageInput | Sequence[ImageInput], *, batch_size: int = 1,
                     do_cfg: bool = True) -> torch.Tensor:
        """This adapter's entry of diffusers' `ip_adapter_image_embeds`: [negative; positive] rows under CFG."""
        pos, neg = self.encode(images, batch_size=batch_size)
        return torch.cat([neg, pos]) if do_cfg else pos


def default_image_encoder(state: IPState) -> str:
    """The released SDXL/SD pairing, from the projection's input size (used when no encoder is given)."""
    dim, plain = image_feature_dim(state), "proj.weight" in state["image_proj"]
    known = {(True, 1280): "clip-vit-bigg-14", (True, 1024): "clip-vit-h-14", (False, 1280): "clip-vit-h-14",
             (False, 1664): "clip-vit-bigg-14"}
    if (plain, dim) not in known:
        raise UsageError(f"no image encoder known for {'pooled' if plain else 'penultimate'} features of size {dim}; "
                         "pass image_encoder=<preset or folder>")
    return known[(plain, dim)]


def load_ip_adapter(pipe_or_unet: Any, source: str | Path | Mapping[str, Any], *,
                    image_encoder: ImageEncoder | str | None = None, scale: float = 1.0) -> IPAdapter:
    """Load an IP-Adapter (file path or state dict in the released layout) onto a pipeline's UNet (or a UNet)."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if isinstance(source, Mapping):
        state, name = split_flat(source), "IP-Adapter"
    else:
        state, name = read_ip_adapter(source), str(source)
    return IPAdapter(unet, state, image_encoder=image_encoder, scale=scale, source=name)


def is_ip_adapter(path: Path) -> bool:
    """A weights file in the IP-Adapter layout (detect for the adapter registry; never raises)."""
    try:
        if path.is_dir():
            return False
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return is_ip_adapter_state(dict.fromkeys(f.keys()))
        return is_ip_adapter_state(load_weights(path))
    except Exception:
        return False


def apply_ip_adapter(pipe: Any, path: Path, *, image_encoder: ImageEncoder | str | None = None,
                     **unused: Any) -> IPAdapter:
    """The "ip_adapter" adapter kind: `apply_adapter(pipe, file, image_encoder=..., scale=...)`."""
    if unused:
        raise UsageError(f"IP-Adapters take the options image_encoder and scale, not {', '.join(sorted(unused))}")
    if isinstance(image_encoder, str) and not Path(image_encoder).is_absolute() \
            and (path.parent / image_encoder).is_dir():
        image_encoder = str(path.parent / image_encoder)  # a manifest's encoder folder, relative to the adapter
    return load_ip_adapter(pipe, path, image_encoder=image_encoder)


def register() -> None:
    register_adapter("ip_adapter", is_ip_adapter, apply_ip_adapter)


def loaded_ip_adapters(unet: torch.nn.Module) -> int:
    """How many IP-Adapters are on `unet` (= the length `image_embeds` must have)."""
    stack = _stack(unet)
    return len(stack.entries) if stack else 0


# ---------------------------------------------------------------------------------------------- stand-ins


def random_ip_adapter_state(unet: torch.nn.Module, variant: str, feature_dim: int, *, tokens: int | None = None,
                            width: int = 64, heads: int = 2, depth: int = 4, ff_mult: int = 4, seed: int = 0) -> IPState:
    """Random weights in the exact released key layout (original names, odd numbering), shaped for `unet`.

    Stands in for `ip-adapter_sdxl.bin` (variant "plain", feature_dim = the encoder's projection_dim) or
    `ip-adapter-plus_sdxl_vit-h.bin` ("plus", feature_dim = its hidden size; a Resampler of `width` with
    `heads` heads of 64 as released) in tests and smoke runs.
    """
    gen = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim

    def lin(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=gen) / inp ** 0.5

    def norm(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 + 0.1 * torch.randn(n, generator=gen), 0.1 * torch.randn(n, generator=gen)

    proj: dict[str, torch.Tensor] = {}
    if variant == "plain":
        t = tokens or 4
        if t != 4:
            raise ValueError("the released linear projection has 4 tokens (diffusers' converter assumes it)")
        proj["proj.weight"], proj["proj.bias"] = lin(t * cross, feature_dim), 0.1 * torch.randn(t * cross, generator=gen)
        proj["norm.weight"], proj["norm.bias"] = norm(cross)
    elif variant == "plus":
        t, inner = tokens or 16, heads * 64
        proj["latents"] = torch.randn(1, t, width, generator=gen) / width ** 0.5
        proj["proj_in.weight"], proj["proj_in.bias"] = lin(width, feature_dim), 0.1 * torch.randn(width, generator=gen)
        for i in range(depth):
            p = f"layers.{i}."
            proj[p + "0.norm1.weight"], proj[p + "0.norm1.bias"] = norm(width)
            proj[p + "0.norm2.weight"], proj[p + "0.norm2.bias"] = norm(width)
            proj[p + "0.to_q.weight"] = lin(inner, width)
            proj[p + "0.to_kv.weight"] = lin(2 * inner, width)
            proj[p + "0.to_out.weight"] = lin(width, inner)
            proj[p + "1.0.weight"], proj[p + "1.0.bias"] = norm(width)
            proj[p + "1.1.weight"] = lin(width * ff_mult, width)
            proj[p + "1.3.weight"] = lin(width, width * ff_mult)
        proj["proj_out.weight"], proj["proj_out.bias"] = lin(cross, width), 0.1 * torch.randn(cross, generator=gen)
        proj["norm_out.weight"], proj["norm_out.bias"] = norm(cross)
    else:
        raise ValueError(f"variant must be 'plain' or 'plus', got {variant!r}")
    ip = {k: lin(*shape) for k, shape in expected_ip_shapes(unet).items()}
    return {"image_proj": proj, "ip_adapter": ip}
