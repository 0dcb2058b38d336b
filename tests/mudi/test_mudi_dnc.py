"""Detect-and-Compare (spec §5 tests 18-23) with a stub detector and a fixed random-projection embedder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.eval.extractor import FeatureExtractor, Preprocess
from common.eval.similarity import cosine_matrix
from mudi.dnc import DetectAndCompare, dnc_from_matrices, gt_matrix, matrix_norm, pad_to_square


def _embedder(dim: int = 24) -> FeatureExtractor:
    proj = torch.randn(3 * 16 * 16, dim, generator=torch.Generator().manual_seed(0))
    return FeatureExtractor("stub", Preprocess((16, 16), None, None, None, interpolation="bilinear"),
                            lambda x: x.flatten(1) @ proj)


def _noise(seed: int, size=32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


class StubDetector:
    def __init__(self, boxes):
        self.boxes = boxes

    def __call__(self, image, queries):
        return list(self.boxes)


def _scene(first: Image.Image, second: Image.Image):
    canvas = Image.new("RGB", (120, 60), (255, 255, 255))
    canvas.paste(first, (4, 10))
    canvas.paste(second, (70, 20))
    return canvas, [(4, 10, 36, 42), (70, 20, 102, 52)]


A, B = _noise(1), _noise(2)


def _dnc(boxes, refs=((A, A, A), (B, B))):
    return DetectAndCompare(StubDetector(boxes), _embedder(), refs, ["toy a", "toy b"])


def test_perfect_match_scores_one():
    """(18) identical references, the generated image holds exactly those crops -> S* = GT -> 1."""
    image, boxes = _scene(A, B)
    result = _dnc(boxes).score(image)
    assert result.score == pytest.approx(1.0, abs=1e-6)


def test_order_invariance_and_duplicate():
    """(19) swapping positions keeps the score; a second copy of A instead of B lowers it below 1."""
    image, boxes = _scene(B, A)
    assert _dnc(boxes).score(image).score == pytest.approx(1.0, abs=1e-6)
    image, boxes = _scene(A, A)
    assert _dnc(boxes).score(image).score < 1 - 1e-3


def test_mixing_lowers_score():
    """(20) a crop that averages A and B scores below the perfect image."""
    mixed = Image.blend(A, B, 0.5)
    image, boxes = _scene(A, mixed)
    perfect_image, perfect_boxes = _scene(A, B)
    assert _dnc(boxes).score(image).score < _dnc(perfect_boxes).score(perfect_image).score - 1e-3


@pytest.mark.parametrize("count", [1, 3])
def test_count_mismatch_scores_zero(count):
    """(21) 1 or 3 detections -> exactly 0."""
    image, boxes = _scene(A, B)
    boxes = (boxes + [(50, 0, 60, 10)])[:count] if count == 3 else boxes[:1]
    assert _dnc(boxes).score(image).score == 0.0
    assert dnc_from_matrices(torch.zeros(count, 2), torch.eye(2)) == 0.0


def test_norm_convention():
    """(22) ord 2 is the spectral norm (largest singular value); Frobenius is the larger alternative."""
    m = torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert matrix_norm(m) == pytest.approx(float(torch.linalg.svdvals(m)[0]), rel=1e-12)
    assert matrix_norm(m, "fro") == pytest.approx(float(m.pow(2).sum().sqrt()), rel=1e-12)
    assert matrix_norm(m, "fro") >= matrix_norm(m)
    assert matrix_norm(m) == pytest.approx(float(np.linalg.norm(m.numpy(), ord=2)), rel=1e-12)


def test_gt_diagonal():
    """(23) identical references: GT[i, i] = 1; distinct ones: (n + sum_{r != r'} cos) / n^2."""
    emb = _embedder()
    same = [emb.encode_images([A, A]), emb.encode_images([B, B, B])]
    gt = gt_matrix(same)
    assert torch.allclose(gt.diagonal(), torch.ones(2, dtype=torch.float64), atol=1e-9)
    refs = [_noise(s) for s in (4, 5, 6)]
    feats = emb.encode_images(refs)
    cos = cosine_matrix(feats, feats)
    off = cos.sum() - cos.diagonal().sum()
    assert gt_matrix([feats])[0, 0].item() == pytest.approx(((3 + off) / 9).item(), abs=1e-9)


def test_pad_to_square_white():
    img = pad_to_square(Image.new("RGB", (10, 4), (0, 0, 0)))
    arr = np.asarray(img)
    assert img.size == (10, 10) and (arr[:3] == 255).all() and (arr[3:7] == 0).all() and (arr[7:] == 255).all()


def test_real_owlv2_class_runs_through_dnc():
    """The tiny OWLv2 (real transformers class) feeds D&C: boxes in the image, score 0 unless the count is N."""
    from mudi.detect import tiny_owlv2

    detector = tiny_owlv2(threshold=0.0)
    image, _ = _scene(A, B)
    boxes = detector(image, ["toy a", "toy b"])
    assert boxes and all(0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 60 for x0, y0, x1, y1 in boxes)
    result = DetectAndCompare(detector, _embedder(), [(A,), (B,)], ["toy a", "toy b"]).score(image)
    assert (result.score == 0.0) == (len(result.boxes) != 2)
