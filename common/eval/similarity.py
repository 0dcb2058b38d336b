"""Cosine-similarity reductions shared by CLIP-I, DINO and CLIP-T."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: [N, D], b: [M, D] -> [N, M] cosine similarities (float64 for stable means)."""
    a = F.normalize(a.double(), dim=-1)
    b = F.normalize(b.double(), dim=-1)
    return a @ b.T


def pairwise_mean(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """generated: [G, D], references: [R, D] -> [G]: each generated image's mean cosine to all references.

    The mean of these rows is the mean of the full G x R matrix (all rows have R entries), the CLIP-I / DINO
    image-alignment number of Custom Diffusion's and MIP-Adapter's evaluation code.
    """
    if generated.shape[0] == 0 or references.shape[0] == 0:
        raise ValueError(f"need at least one generated and one reference row, got {generated.shape[0]} and {references.shape[0]}")
    return cosine_matrix(generated, references).mean(dim=1)


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b: [N, D] -> [N] row-wise cosine (image i with text i)."""
    if a.shape != b.shape:
        raise ValueError(f"paired rows need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (F.normalize(a.double(), dim=-1) * F.normalize(b.double(), dim=-1)).sum(-1)
