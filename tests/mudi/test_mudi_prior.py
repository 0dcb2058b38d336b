"""Prior generation (spec §5 test 25): the one-box gate, retries, no silent failure, resume, class metadata."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from common.errors import UsageError
from mudi.metadata import read_metadata
from mudi.prior import PriorJob, class_entries, generate_prior, image_seed, update_class_metadata


class Gen:
    """Stub generator: a grey image whose value encodes the seed; records the seeds asked for."""

    def __init__(self):
        self.seeds = []

    def __call__(self, seed):
        self.seeds.append(seed)
        return Image.new("RGB", (32, 32), (seed % 251, 0, 0))


class Detect:
    """Stub detector answering from a list of box counts, one per call."""

    def __init__(self, counts):
        self.counts = list(counts)

    def __call__(self, image, queries):
        return [(4.0, 4.0, 20.0, 20.0)] * self.counts.pop(0)


def segment(image, box):
    mask = np.zeros((image.height, image.width), bool)
    x0, y0, x1, y1 = map(int, box)
    mask[y0:y1, x0:x1] = True
    return mask


def _job(tmp_path, n=2, tries=4):
    return PriorJob("corgi", tmp_path / "img", tmp_path / "mask", n, "corgi", True, tries, seed=7)


def test_one_box_gate_retries(tmp_path):
    """0 or 2 boxes -> regenerate without writing a mask; exactly 1 -> a 0/255 mask_{i}.png."""
    gen, det = Gen(), Detect([0, 2, 1, 1])
    written = generate_prior(_job(tmp_path), gen, det, segment, progress=False)
    assert written == [0, 1]
    assert gen.seeds == [image_seed(7, 0, 0), image_seed(7, 0, 1), image_seed(7, 0, 2), image_seed(7, 1, 0)]
    mask = np.asarray(Image.open(tmp_path / "mask" / "mask_0.png"))
    assert set(np.unique(mask)) == {0, 255} and (mask[4:20, 4:20] == 255).all() and mask.sum() == 255 * 16 * 16
    assert np.asarray(Image.open(tmp_path / "img" / "img_0.png"))[0, 0, 0] == image_seed(7, 0, 2) % 251


def test_never_one_box_is_an_error_not_a_silent_image(tmp_path):
    """The original saves an unmasked image after its last try; here: an error and no image for that index."""
    with pytest.raises(UsageError, match="exactly one 'corgi' box after 3 tries"):
        generate_prior(_job(tmp_path, n=2, tries=3), Gen(), Detect([1, 0, 2, 0]), segment, progress=False)
    assert (tmp_path / "img" / "img_0.png").is_file() and not (tmp_path / "img" / "img_1.png").exists()
    assert not (tmp_path / "mask" / "mask_1.png").exists()


def test_resume_and_own_masks(tmp_path):
    """A finished index is skipped; a mask already in mask_dir is kept (no detection for it)."""
    generate_prior(_job(tmp_path), Gen(), Detect([1, 1]), segment, progress=False)
    before = (tmp_path / "img" / "img_1.png").read_bytes()
    (tmp_path / "img" / "img_1.png").unlink()
    gen = Gen()
    assert generate_prior(_job(tmp_path), gen, Detect([]), segment, progress=False) == [1]  # own mask: no detection
    assert gen.seeds == [image_seed(7, 1, 0)] and (tmp_path / "img" / "img_1.png").read_bytes() == before


def test_class_metadata_merges_ids(tmp_path):
    """class_metadata.jsonl: one call per class, ids merged; the result reads back as MuDI metadata."""
    reg = tmp_path / "reg"
    for cid, name in (("a", "corgi"), ("b", "robot toy")):
        job = PriorJob(name, tmp_path / cid, tmp_path / cid, 2, name, True, 2)
        generate_prior(job, Gen(), Detect([1, 1]), segment, progress=False)
        update_class_metadata(reg, cid, name, class_entries(job, cid, reg))
    job = PriorJob("corgi", tmp_path / "a", tmp_path / "a", 2, "corgi", True, 2)
    update_class_metadata(reg, "a", "corgi", class_entries(job, "a", reg))  # re-running replaces, not duplicates
    meta = read_metadata(reg, "class_metadata.jsonl")
    assert meta.id_map == {"a": "corgi", "b": "robot toy"}
    assert [r.id for r in meta.records] == ["b", "b", "a", "a"]
    assert meta.records[0].text == "A photo of a robot toy" and meta.records[2].mask.name == "mask_0.png"
    assert json.loads((reg / "class_metadata.jsonl").read_text().splitlines()[0]) == {"id": meta.id_map}


def test_real_tiny_owl_and_sam(tmp_path):
    """The gate with the real classes: tiny-single OWLv2 (one patch -> one box) and tiny SAM give a mask."""
    from mudi.detect import load_owlv2, load_sam

    det, sam = load_owlv2("tiny-single", threshold=0.0), load_sam("tiny")
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    boxes = det(image, ["red toy"])
    assert len(boxes) == 1
    mask = sam(image, boxes[0])
    assert mask.shape == (40, 48) and mask.dtype == bool
