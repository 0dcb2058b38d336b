"""CLIP metrics: CLIP-T (CLIPScore and raw cosine) and CLIP-I (mean generated x reference cosine).

Both protocols here (Custom Diffusion's CustomConcept101 `evaluate.py`, MIP-Adapter's Concept101 script) use
OpenAI CLIP ViT-B/32 with resize 224 (bicubic, shorter side) -> centre crop 224 -> CLIP mean/std; CLIPScore
is `w * max(cos, 0)` with w = 2.5 (Hessel et al.). We load the same weights through open_clip
(`ViT-B-32`, pretrained `openai`); the LAION aesthetic predictor needs `ViT-L-14` / `openai`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from common.eval.extractor import (
    CLIP_224, FeatureExtractor, ImageLike, Preprocess, existing_path, offline_error, quiet_root_logger, weights_tag,
)
from common.eval.similarity import paired_cosine, pairwise_mean

CLIPSCORE_W = 2.5


def load_clip(
    model_name: str = "ViT-B-32",
    pretrained: str = "openai",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> FeatureExtractor:
    """An open_clip model as a FeatureExtractor with image and text encoders.

    `pretrained` is an open_clip tag (resolved from the local Hugging Face cache when offline) or a local
    weights file. A missing model raises one UsageError saying what to download. `model_name="toy-clip"` gives
    the toy world's trained CLIP (assets/toyworld/toy-clip, or the folder `pretrained` names).
    """
    if model_name == "toy-clip":
        from common.toyworld.judge import toy_clip_extractor

        folder = pretrained if existing_path(pretrained) else None
        return toy_clip_extractor(folder, device=device, dtype=dtype, batch_size=batch_size)
    import open_clip

    try:
        with quiet_root_logger():
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as e:  # noqa: BLE001 - hub, file and config errors all mean "not available"
        how = (
            f"python -c \"import open_clip; open_clip.create_model_and_transforms('{model_name}', "
            f"pretrained='{pretrained}')\" on a machine with internet (it lands in ~/.cache/huggingface), "
            "or pass a local weights file as the pretrained value"
        )
        raise offline_error(f"open_clip {model_name}/{pretrained}", how, e) from None
    model = model.to(device=device, dtype=dtype).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = tuple(getattr(model.visual, "image_mean", None) or CLIP_224.mean)
    std = tuple(getattr(model.visual, "image_std", None) or CLIP_224.std)
    local = existing_path(pretrained)
    tag = weights_tag(local) if local else pretrained
    return clip_extractor(model, tokenizer, f"open_clip:{model_name}/{tag}", Preprocess(size, size, mean, std),
                          device=device, dtype=dtype, batch_size=batch_size)


def clip_extractor(
    model: torch.nn.Module,
    tokenizer,
    name: str,
    preprocess: Preprocess = CLIP_224,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> FeatureExtractor:
    """Wrap any open_clip-style model (`encode_image`, `encode_text`) and its tokenizer."""
    dev = torch.device(device)

    def text_fn(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(dev))

    return FeatureExtractor(name, preprocess, model.encode_image, text_fn, device=dev, dtype=dtype,
                            batch_size=batch_size, module=model)


def clip_score(image_feats: torch.Tensor, text_feats: torch.Tensor, w: float = CLIPSCORE_W) -> torch.Tensor:
    """image_feats, text_feats: [N, D] paired rows -> [N] CLIPScore `w * max(cos, 0)`."""
    return w * paired_cosine(image_feats, text_feats).clamp(min=0)


def clip_t(
    extractor: FeatureExtractor, images: Sequence[ImageLike], prompts: Sequence[str], *, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Text alignment of N images with their N prompts: {"clipscore": [N], "cosine": [N]}."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; CLIP-T pairs them one to one")
    img = extractor.encode_images(images, progress=progress, desc="CLIP-T images")
    txt = extractor.encode_texts(prompts)
    cos = paired_cosine(img, txt)
    return {"clipscore": CLIPSCORE_W * cos.clamp(min=0), "cosine": cos}


def clip_i(generated_feats: torch.Tensor, reference_feats: torch.Tensor) -> torch.Tensor:
    """generated: [G, D], references: [R, D] -> [G] mean cosine of each generated image to all references.

    Its mean is the mean of the full G x R cosine matrix (no 2.5 factor).
    """
    return pairwise_mean(generated_feats, reference_feats)
