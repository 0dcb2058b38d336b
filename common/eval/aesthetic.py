"""LAION aesthetic score: an MLP on L2-normalised CLIP ViT-L/14 image embeddings (improved-aesthetic-predictor).

The released `sac+logos+ava1-l14-linearMSE.pth` keys are `layers.{0,2,4,6,7}.{weight,bias}` of
Linear(768,1024)-Drop-Linear(1024,128)-Drop-Linear(128,64)-Drop-Linear(64,16)-Linear(16,1); the older linear
predictor (`sa_0_4_vit_l_14_linear.pth`, keys `weight`/`bias`) loads too. SynCD reports it for data quality.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UsageError
from common.eval.extractor import FeatureExtractor, ImageLike, existing_path
from common.io import load_weights


class AestheticMLP(nn.Module):
    """[N, dim] normalised CLIP embeddings -> [N] scores (roughly 1..10)."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def load_aesthetic_head(path: str) -> nn.Module:
    """The MLP (or the older linear head) from a local `.pth`/`.safetensors` file."""
    local = existing_path(path)
    if local is None:
        raise UsageError(
            f"aesthetic predictor {path} not found; download sac+logos+ava1-l14-linearMSE.pth from "
            "https://github.com/christophschuhmann/improved-aesthetic-predictor and pass its path"
        )
    sd = load_weights(local)
    if set(sd) == {"weight", "bias"}:
        head: nn.Module = nn.Linear(sd["weight"].shape[1], 1)
        head.load_state_dict(sd)
        return _Squeeze(head).eval()
    head = AestheticMLP(sd["layers.0.weight"].shape[1] if "layers.0.weight" in sd else 768)
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UsageError(f"{path} is not a LAION aesthetic predictor: {' '.join(str(e).split())[:200]}") from None
    return head.eval()


class _Squeeze(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).squeeze(-1)


@torch.inference_mode()
def aesthetic_from_features(head: nn.Module, clip_feats: torch.Tensor) -> torch.Tensor:
    """clip_feats: [N, D] raw CLIP image embeddings -> [N] scores (embeddings L2-normalised first)."""
    p = next(head.parameters())
    return head(F.normalize(clip_feats.to(p.device, p.dtype), dim=-1)).float().cpu()


def aesthetic_score(
    head: nn.Module, clip_l14: FeatureExtractor, images: Sequence[ImageLike], *, progress: bool = False
) -> torch.Tensor:
    """N images -> [N] LAION aesthetic scores (clip_l14: open_clip ViT-L-14/openai, see `load_clip`)."""
    return aesthetic_from_features(head, clip_l14.encode_images(images, progress=progress, desc="aesthetic"))
