"""Tiny random-weight backbones built in code (fixed seed), for tests, smoke runs and benchmarks.

They share every line of metric code with the real backbones (same FeatureExtractor wrapper, same
preprocessing specs); only the network weights are random, so their scores carry no meaning.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from common.eval.aesthetic import AestheticMLP
from common.eval.clip import clip_extractor
from common.eval.extractor import CLIP_224, DINO_256_224, IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor, Preprocess


@contextlib.contextmanager
def _seeded(seed: int):
    """Build under `seed` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_clip(seed: int = 0, width: int = 32, embed_dim: int = 16, device: str = "cpu") -> FeatureExtractor:
    """open_clip CLIP with a 1-layer ViT-B/32-shaped tower (224 px, patch 32) and 1-layer text tower; the real
    open_clip BPE tokenizer (shipped with the package, so offline)."""
    import open_clip
    from open_clip import CLIPTextCfg, CLIPVisionCfg

    with _seeded(seed):
        model = open_clip.CLIP(
            embed_dim,
            CLIPVisionCfg(layers=1, width=width, head_width=16, patch_size=32, image_size=224),
            CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=2, layers=1),
        ).eval()
    return clip_extractor(model.to(device), open_clip.get_tokenizer("ViT-B-32"), f"tiny-clip:{seed}", CLIP_224,
                          device=device)


def tiny_vit(
    seed: int = 0,
    *,
    dim: int = 32,
    depth: int = 1,
    heads: int = 2,
    name: str = "tiny-dino",
    preprocess: Preprocess = DINO_256_224,
    device: str = "cpu",
) -> FeatureExtractor:
    """timm VisionTransformer (patch 16, 224 px, CLS output like DINO). dim=384, depth=12, heads=6 is ViT-S/16."""
    from timm.models.vision_transformer import VisionTransformer

    with _seeded(seed):
        model = VisionTransformer(img_size=224, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                                  num_classes=0).eval()
    model = model.to(device)
    return FeatureExtractor(f"{name}:{seed}:{dim}x{depth}", preprocess, model, device=device, module=model)


class _TinyConv(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, dim, 3, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_inception(seed: int = 0, dim: int = 64, device: str = "cpu") -> FeatureExtractor:
    """A 2-layer conv net standing in for Inception pool3 ([B, dim]) at 75x75 input."""
    with _seeded(seed):
        model = _TinyConv(dim).eval()
    return FeatureExtractor(f"tiny-inception:{seed}", Preprocess((75, 75), None, IMAGENET_MEAN, IMAGENET_STD),
                            model.to(device), device=device, module=model)


def tiny_aesthetic(dim: int = 16, seed: int = 0) -> AestheticMLP:
    """The aesthetic MLP with random weights on `dim`-wide CLIP embeddings."""
    with _seeded(seed):
        return AestheticMLP(dim).eval()
