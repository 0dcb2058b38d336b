"""Training data filters on synthetic samples in the released layout (spec §5 test 24)."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
from PIL import Image

from common.errors import UsageError
from mipadapter.data import SubjectDataset, build_sample, read_ids, reference_crop, select_entities, write_synthetic_sample

CAT, DOG = ("cat", (8, 10, 40, 50), 0.9), ("dog", (50, 20, 90, 60), 0.8)


def load(root, sid, **kw):
    write_synthetic_sample(root, sid, **kw)
    return SubjectDataset(root).load(sid)


def labels(root, sid, **kw):
    image, mask, meta = load(root, sid, **kw)
    return [e["label"] for e in select_entities(meta, mask)]


def test_valid_sample_gives_two_entities_and_white_reference_crops(tmp_path):
    image, mask, meta = load(tmp_path, "ok")
    assert labels(tmp_path, "ok") == ["cat", "dog"]
    sample = build_sample(image, mask, meta, 64, random.Random(0))
    assert sample.words == ["cat", "dog"] and sample.image.size == (64, 64)
    assert sample.original_size == (80, 96)
    for ref in sample.references:
        assert ref.size == (224, 224)
    # outside the object's segment everything is white (object pixels are random noise, never all white)
    ref = np.asarray(reference_crop(image, mask, CAT[1], random.Random(1)))
    # the 32 x 40 box is padded to 40 x 40 (4 white columns each side = 22 px at 224) and its 1 px border is
    # background (5.6 px at 224, less the interpolation's reach)
    assert (ref[:, :20] == 255).all() and (ref[:, -20:] == 255).all() and (ref[:3] == 255).all()
    assert (ref[100:120, 100:120] != 255).any()


@pytest.mark.parametrize("objects, caption, expected", [
    ((("teddy bear", CAT[1], 0.9), DOG), "a teddy bear and a dog", ["dog"]),  # multi-word label
    ((("cat", CAT[1], 0.9), ("bird", DOG[1], 0.8)), "a cat and a dog", ["cat"]),  # label not in the caption
    ((("cat", (2, 2, 94, 78), 0.9), DOG), "a cat and a dog", ["dog"]),  # area ratio above 0.7
    ((("cat", (8, 10, 20, 22), 0.9), DOG), "a cat and a dog", ["dog"]),  # area ratio below 0.08
    ((("cat", CAT[1], 0.2), DOG), "a cat and a dog", ["dog"]),  # logit too low
    ((CAT, ("dog", (10, 12, 42, 52), 0.8)), "a cat and a dog", ["cat"]),  # > 80 % overlap with a chosen box
])
def test_filters_reject(tmp_path, objects, caption, expected):
    assert labels(tmp_path, "x", objects=objects, caption=caption) == expected


def test_duplicate_labels_and_single_objects_are_resampled(tmp_path):
    write_synthetic_sample(tmp_path, "dup", objects=(CAT, ("cat", DOG[1], 0.8)), caption="a cat and a cat")
    image, mask, meta = SubjectDataset(tmp_path).load("dup")
    assert build_sample(image, mask, meta, 64, random.Random(0)) is None
    write_synthetic_sample(tmp_path, "good")
    ds = SubjectDataset(tmp_path, ["dup", "good"], 64)
    item = ds[0]  # resampled to the valid one
    assert item["words"] == ["cat", "dog"] and item["ref_pixels"].shape == (2, 3, 224, 224)
    only_bad = SubjectDataset(tmp_path, ["dup"], 64)
    with pytest.raises(UsageError, match="no sample with two valid objects"):
        only_bad[0]


def test_id_lists_are_read_without_running_code(tmp_path):
    (tmp_path / "ids.pkl").write_bytes(pickle.dumps(["a", "b"]))
    assert read_ids(tmp_path / "ids.pkl") == ["a", "b"]
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(random.Random))
    with pytest.raises(UsageError, match="only plain lists of ids"):
        read_ids(tmp_path / "evil.pkl")
    with pytest.raises(UsageError, match="has no images/ folder"):
        SubjectDataset(tmp_path)


def test_broken_files_are_errors_not_resampled(tmp_path):
    write_synthetic_sample(tmp_path, "s")
    (tmp_path / "jsons" / "s.json").write_text("{broken")
    with pytest.raises(UsageError, match="cannot read"):
        SubjectDataset(tmp_path, resolution=64)[0]
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "t.png")
