"""DINO (ViT-S/16, v1) and DINOv2 image-alignment backbones.

The CustomConcept101 / Concept101 protocols use `torch.hub facebookresearch/dino:main dino_vits16`: the CLS
token after the final norm, resize 256 (bicubic) -> centre crop 224 -> ImageNet mean/std. timm's
`vit_small_patch16_224.dino` holds the same weights under the same key names and returns the same CLS output,
so we load it through timm (or the official `.pth` file into the timm model, or a cached torch.hub checkout).
DINOv2 (SynCD, MuDI) goes through transformers `AutoModel`; the score is the mean of the same cosine matrix.
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.eval.extractor import DINO_256_224, FeatureExtractor, existing_path, offline_error, weights_tag
from common.eval.similarity import pairwise_mean

TIMM_DINO = "vit_small_patch16_224.dino"
HUB_DINO_DIR = Path(torch.hub.get_dir()) / "facebookresearch_dino_main"


def load_dino(
    spec: str = "dino_vits16",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> FeatureExtractor:
    """DINO ViT-S/16 CLS features. `spec`: "dino_vits16" (timm hub weights or a cached torch.hub checkout) or a
    local `dino_deitsmall16_pretrain.pth` state dict."""
    import timm

    local = existing_path(spec)
    try:
        if local is not None:
            from common.io import load_weights

            model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
            model.load_state_dict(load_weights(local), strict=True)
        elif HUB_DINO_DIR.is_dir():
            model = torch.hub.load(str(HUB_DINO_DIR), "dino_vits16", source="local")
        else:
            model = timm.create_model(TIMM_DINO, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001
        how = (
            f"python -c \"import timm; timm.create_model('{TIMM_DINO}', pretrained=True)\" on a machine with internet, "
            "or pass the official dino_deitsmall16_pretrain.pth file as the DINO model"
        )
        raise offline_error("DINO ViT-S/16", how, e) from None
    model = model.to(device=device, dtype=dtype).eval()
    name = f"dino_vits16:{weights_tag(local) if local else 'pretrained'}"
    return FeatureExtractor(name, DINO_256_224, model, device=device, dtype=dtype, batch_size=batch_size, module=model)


def load_dinov2(
    spec: str = "facebook/dinov2-base",
    pooling: str = "cls",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> FeatureExtractor:
    """DINOv2 (hub id or local folder) via transformers. `pooling`: "cls" (the pooled, layer-normed CLS token,
    SynCD) or "mean" (mean of the last hidden state, MuDI's D&C)."""
    from transformers import AutoModel

    if pooling not in ("cls", "mean"):
        raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
    try:
        model = AutoModel.from_pretrained(spec)
    except Exception as e:  # noqa: BLE001
        how = f"huggingface-cli download {spec} (or pass a local folder saved with save_pretrained)"
        raise offline_error(f"DINOv2 {spec}", how, e) from None
    local = existing_path(spec)
    name = f"dinov2:{weights_tag(local) if local else spec}"
    return dinov2_extractor(model, name, pooling, device=device, dtype=dtype, batch_size=batch_size)


def dinov2_extractor(
    model: torch.nn.Module,
    name: str,
    pooling: str = "cls",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> FeatureExtractor:
    """Wrap a transformers DINOv2 model; [B, 3, 224, 224] -> [B, hidden]."""
    model = model.to(device=device, dtype=dtype).eval()

    def image_fn(x: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=x)
        return out.pooler_output if pooling == "cls" else out.last_hidden_state.mean(dim=1)

    return FeatureExtractor(f"{name}/{pooling}", DINO_256_224, image_fn, device=device, dtype=dtype,
                            batch_size=batch_size, module=model)


def dino_similarity(generated_feats: torch.Tensor, reference_feats: torch.Tensor) -> torch.Tensor:
    """generated: [G, D], references: [R, D] -> [G] mean cosine to all references (DINO image alignment)."""
    return pairwise_mean(generated_feats, reference_feats)
