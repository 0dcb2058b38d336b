"""Short model names -> hub ids used by the seed papers, and the `tiny-*` presets built in code."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: trained toy-world weights shipped in the repo (common/toyworld, scripts/train_toyworld.py); the toy presets'
#: "hub id" is this local folder
TOYWORLD_DIR = Path(__file__).resolve().parents[2] / "assets" / "toyworld"


@dataclass(frozen=True)
class Preset:
    """A named model. `family` picks prompt encoding and the denoiser: sd | sdxl | flux | if | if-sr | controlnet."""

    name: str
    family: str
    hub_id: str | None = None  # None for tiny presets (built by common.models.tiny)
    note: str = ""
    subfolder: str | None = None  # where in the hub repo the model lives (image encoders inside h94/IP-Adapter)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("sd14", "sd", "CompVis/stable-diffusion-v1-4", "Custom Diffusion's base model"),
        Preset("sd15", "sd", "stable-diffusion-v1-5/stable-diffusion-v1-5", "SyncTweedies panorama/mesh/3DGS base (was runwayml/...)"),
        Preset("sd2-base", "sd", "stabilityai/stable-diffusion-2-base", "SyncTweedies wide images"),
        Preset("sd21-base", "sd", "stabilityai/stable-diffusion-2-1-base"),
        Preset("sdxl", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "MuDI, SynCD, MIP-Adapter (SDXL)"),
        Preset("flux-dev", "flux", "black-forest-labs/FLUX.1-dev", "SynCD (FLUX)"),
        Preset("if-I-M", "if", "DeepFloyd/IF-I-M-v1.0", "SyncTweedies ambiguous images, stage I"),
        Preset("if-I-L", "if", "DeepFloyd/IF-I-L-v1.0"),
        Preset("if-I-XL", "if", "DeepFloyd/IF-I-XL-v1.0"),
        Preset("if-II-M", "if-sr", "DeepFloyd/IF-II-M-v1.0", "SyncTweedies ambiguous images, stage II"),
        Preset("if-II-L", "if-sr", "DeepFloyd/IF-II-L-v1.0"),
        Preset("controlnet-depth-sd15", "controlnet", "lllyasviel/control_v11f1p_sd15_depth", "SyncTweedies panorama/mesh/3DGS"),
        Preset("controlnet-depth-sd2", "controlnet", "thibaud/controlnet-sd21-depth-diffusers"),
        Preset("controlnet-depth-sdxl", "controlnet", "diffusers/controlnet-depth-sdxl-1.0"),
        Preset("tiny-sd", "sd", note="random weights, SD-1.x layout, 64x64 images"),
        Preset("tiny-sdxl", "sdxl", note="random weights, SDXL layout (two text encoders, time ids)"),
        Preset("tiny-flux", "flux", note="random weights, FLUX layout (CLIP tokenizer in the T5 slot)"),
        Preset("tiny-if", "if", note="random weights, DeepFloyd IF stage I layout (pixels, 6-channel output)"),
        Preset("tiny-if-sr", "if-sr", note="random weights, DeepFloyd IF stage II layout"),
        Preset("tiny-controlnet", "controlnet", note="random weights, ControlNet for tiny-sd"),
        Preset("toy-sd", "sd", str(TOYWORLD_DIR / "toy-sd"),
               "trained toy world (assets/toyworld): 32x32 shape scenes, samples on a CPU in seconds"),
        Preset("toy-sdxl", "sdxl", str(TOYWORLD_DIR / "toy-sdxl"),
               "trained toy world in SDXL layout (toy-sd converted + fine-tuned; shares toy-sd's VAE and text tower)"),
        Preset("toy-clip", "clip", str(TOYWORLD_DIR / "toy-clip"),
               "toy world CLIPModel (32x32 scenes): the judge of the toy-world effect tests"),
        Preset("clip-vit-h-14", "image-encoder", "h94/IP-Adapter", "OpenCLIP ViT-H/14 (IP-Adapter plus, MIP sdxl_plus)",
               subfolder="models/image_encoder"),
        Preset("clip-vit-bigg-14", "image-encoder", "h94/IP-Adapter", "OpenCLIP ViT-bigG/14 (IP-Adapter SDXL, MIP sdxl)",
               subfolder="sdxl_models/image_encoder"),
        Preset("tiny-clip-vision-h", "image-encoder", note="random weights, stands in for ViT-H/14"),
        Preset("tiny-clip-vision-g", "image-encoder", note="random weights, stands in for ViT-bigG/14"),
    ]
}

HUB_TO_PRESET = {p.hub_id: p for p in PRESETS.values() if p.hub_id and not p.subfolder}


def get_preset(name: str) -> Preset | None:
    """The preset called `name` (or whose hub id is `name`), else None."""
    return PRESETS.get(name) or HUB_TO_PRESET.get(name)


def is_tiny(name: str) -> bool:
    return name in PRESETS and PRESETS[name].hub_id is None
