"""Detect-and-Compare (D&C), MuDI's multi-subject fidelity metric (spec §2).

For a generated image G and N reference sets R_1..R_N:
  detect boxes (OWLv2, all N queries, labels ignored) -> crop each, pad to a square with white -> embed;
  S[m, n]  = mean_{r in R_n} cos(D_m, r)                       (M detections x N references)
  GT[i, j] = mean_{r in R_i, r' in R_j} cos(r, r')            (self pairs r = r' included on the diagonal)
  M != N -> score 0; else greedy matching in reference order (each reference takes the unused detection most
  similar to it): S*[n] = S[m_n], and
  D&C = 1 - ||S* - GT||_2,
where ||.||_2 is the SPECTRAL norm (largest singular value; numpy's `norm(A, ord=2)` on a matrix, as the
original demo). `norm="fro"` gives the Frobenius alternative (always >= the spectral norm, so lower scores).
The score is not clipped: very bad images can go below 0.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from common.eval.extractor import FeatureExtractor
from common.eval.similarity import cosine_matrix
from mudi.detect import Box, Detector

NORMS = {"spectral": 2, "fro": "fro"}


def pad_to_square(image: Image.Image, fill=(255, 255, 255)) -> Image.Image:
    """Centre `image` on a white square of its long side."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image.convert("RGB"), ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def crop_detections(image: Image.Image, boxes: Sequence[Box]) -> list[Image.Image]:
    """Each box (x0, y0, x1, y1) cropped and padded to a white square. As the original: coordinates rounded to
    2 decimals, then PIL's crop rounds them to pixels (half to even), so 11.4951 -> 11.5 -> 12."""
    return [pad_to_square(image.crop(tuple(int(round(round(float(v), 2))) for v in box))) for box in boxes]


def similarity_matrix(detections: torch.Tensor, references: Sequence[torch.Tensor]) -> torch.Tensor:
    """detections [M, D], references: N tensors [R_n, D] -> S [M, N] (mean cosine to each reference set)."""
    return torch.stack([cosine_matrix(detections, r).mean(dim=1) for r in references], dim=1)


def gt_matrix(references: Sequence[torch.Tensor]) -> torch.Tensor:
    """N reference sets [R_n, D] -> GT [N, N]: mean cosine over all pairs, self pairs included."""
    n = len(references)
    return torch.tensor([[cosine_matrix(references[i], references[j]).mean().item() for j in range(n)]
                         for i in range(n)], dtype=torch.float64)


def greedy_match(s: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """S [N, N] -> (S* [N, N], assignment): reference n = 0..N-1 takes the unused detection of largest S[m, n]."""
    used: list[int] = []
    for n in range(s.shape[1]):
        column = s[:, n].clone()
        if used:
            column[used] = float("-inf")
        used.append(int(column.argmax()))
    return s[used], used


def matrix_norm(a: torch.Tensor, norm: str = "spectral") -> float:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return float(torch.linalg.matrix_norm(a.double(), ord=NORMS[norm]))


def dnc_from_matrices(s: torch.Tensor, gt: torch.Tensor, norm: str = "spectral") -> float:
    """The score from S [M, N] and GT [N, N]; 0 when the detection count M differs from N."""
    if s.shape[0] != gt.shape[0]:
        return 0.0
    matched, _ = greedy_match(s.double())
    return 1.0 - matrix_norm(matched - gt.double(), norm)


@dataclass
class DnCResult:
    score: float
    boxes: list[Box]
    s: torch.Tensor | None = None
    assignment: list[int] = field(default_factory=list)


class DetectAndCompare:
    """D&C with a detector (OWLv2 or a stub) and an image embedder (DINOv2 / DreamSim / a stub)."""

    def __init__(self, detector: Detector, embedder: FeatureExtractor, references: Sequence[Sequence[Image.Image]],
                 queries: Sequence[str], norm: str = "spectral") -> None:
        if len(references) != len(queries):
            raise ValueError("one query per reference set")
        self.detector, self.embedder, self.queries, self.norm = detector, embedder, list(queries), norm
        self.references = [embedder.encode_images(list(r)) for r in references]
        self.gt = gt_matrix(self.references)

    def score(self, image: Image.Image) -> DnCResult:
        boxes = self.detector(image, self.queries)
        if len(boxes) != len(self.references):
            return DnCResult(0.0, boxes)
        feats = self.embedder.encode_images(crop_detections(image, boxes))
        s = similarity_matrix(feats, self.references)
        matched, assignment = greedy_match(s)
        return DnCResult(1.0 - matrix_norm(matched - self.gt, self.norm), boxes, s, assignment)
