"""Training data filters on synthetic samples in the released layout (spec §5 test 24)."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UsageError
from mipadapter.data import SubjectDataset, build_sample, read_ids, select_entities, write_synthetic_sample

CAT, DOG = ("cat", (8, 10, 40, 50), 0.9), ("dog", (50, 20, 90, 60), 0.8)


def load(root, sid, **kw):
    write_synthetic_sample(root, sid, **kw)
    return SubjectDataset(root).load(sid)


def labels(root, sid, **kw):
    image, mask, meta = load(root, sid, **kw)
    return [e["label"] for e in select_entities(meta, mask)]


def original_sample(image, mask_img, meta, size, rng):
    """data/subject_dataset.py's transform + post_verify (steps after the entity selection), with torchvision as
    it ran there (tensor Resize without antialias, as torchvision 0.14); python `random` -> rng, torch's global
    RNG -> a generator seeded from rng as ours is."""
    from torchvision import transforms
    from torchvision.transforms import functional

    boxes = torch.stack([torch.tensor(c["box"], dtype=torch.float32) for c in meta["final_masks"] if "box" in c])
    selected = [e["box"] for e in select_entities(meta, np.asarray(mask_img))]
    w, h = image.size
    rects = []
    for x1, y1, x2, y2 in selected:
        m = np.zeros((h, w), np.float32)  # a float ("F") image: ToTensor keeps 0 / 1
        m[int(y1):int(y2) + 1, int(x1):int(x2) + 1] = 1  # cv2.fillConvexPoly of the int32 corners
        rects.append(Image.fromarray(m))
    crop = min(w, h)
    min_x, min_y = int(boxes[:, 0].min()), int(boxes[:, 1].min())
    max_x, max_y = int(boxes[:, 2].max()), int(boxes[:, 3].max())
    x_b, x_e = max(0, max_x - crop), min(min_x, w - crop)
    y_b, y_e = max(0, max_y - crop), min(min_y, h - crop)
    near = transforms.InterpolationMode.NEAREST
    if x_b <= x_e and y_b <= y_e:
        sx, sy = rng.randint(x_b, x_e), rng.randint(y_b, y_e)
        img = transforms.Compose([transforms.Resize(size), transforms.ToTensor()])(
            functional.crop(image, sy, sx, crop, crop))
        seg = transforms.Compose([transforms.Resize(size, interpolation=near), transforms.ToTensor()])(
            functional.crop(mask_img, sy, sx, crop, crop))
        rects = [transforms.Compose([transforms.Resize(size, interpolation=near), transforms.ToTensor()])(
            functional.crop(r, sy, sx, crop, crop)) for r in rects]
        corner = (sy, sx)
    else:
        corner = ((h - size) // 2, (w - size) // 2)
        img = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])(image)
        tm = transforms.Compose([transforms.Resize(size, interpolation=near), transforms.CenterCrop(size),
                                 transforms.ToTensor()])
        seg, rects = tm(mask_img), [tm(r) for r in rects]
    torch.manual_seed(rng.randrange(2**63))

    def fill_cavity(m):
        c = m.cumsum(-1)
        f = (c > 0) & (c < c[..., -1:])
        c = m.cumsum(-2)
        return f & (c > 0) & (c < c[..., -1:, :])

    refs = []
    for r in rects:
        y, x = torch.where(1 - r[0] == 0)
        bb = (int(x.min()), int(y.min()), int(x.max()), int(y.max()))
        if not ((bb[3] - bb[1]) * (bb[2] - bb[0]) > 200 and 0.3 < (bb[3] - bb[1]) / (bb[2] - bb[0]) < 3):
            continue
        colors, counts = torch.unique(seg[:, bb[1]:bb[3], bb[0]:bb[2]], return_counts=True, sorted=True)
        segmap = fill_cavity((seg == colors[counts[1:].argmax() + 1]).float())[0].float()
        ent = (img * segmap + 1 - segmap)[:, bb[1]:bb[3], bb[0]:bb[2]]
        if bb[3] - bb[1] < bb[2] - bb[0]:
            pad = int(bb[2] - bb[0] - bb[3] + bb[1]) // 2
            ent = functional.pad(ent, (0, pad, 0, pad), 1)
        elif bb[3] - bb[1] > bb[2] - bb[0]:
            pad = int(bb[3] - bb[1] - bb[2] + bb[0]) // 2
            ent = functional.pad(ent, (pad, 0, pad, 0), 1)
        refs.append(transforms.Compose([transforms.RandomHorizontalFlip(0.5), transforms.Resize(224, antialias=False),
                                        transforms.RandomCrop(224)])(ent))
    return (img - 0.5) / 0.5, refs, corner


@pytest.mark.parametrize("size, objects", [
    ((96, 80), (CAT, DOG)),  # no square holds both boxes: Resize + CenterCrop
    ((160, 80), (("cat", (30, 10, 70, 50), 0.9), ("dog", (75, 15, 110, 60), 0.8))),  # a random square crop
])
def test_sample_equals_the_original_pipeline(tmp_path, size, objects):
    write_synthetic_sample(tmp_path, "ok", size=size, objects=objects)
    image, mask, meta = SubjectDataset(tmp_path).load("ok")
    assert labels(tmp_path, "ok", size=size, objects=objects) == ["cat", "dog"]
    sample = build_sample(image, mask, meta, 64, random.Random(3))
    pixels, refs, corner = original_sample(image, Image.open(tmp_path / "masks" / "ok.png"), meta, 64, random.Random(3))
    assert sample.words == ["cat", "dog"] and sample.original_size == (size[1], size[0])
    assert sample.crop_top_left == corner
    ours = (torch.from_numpy(np.array(sample.image)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(ours, pixels, atol=1e-6, rtol=0)
    assert len(refs) == len(sample.references) == 2
    for a, b in zip(sample.references, refs):
        assert a.shape == (3, 224, 224)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert all((r == 1).any() and (r != 1).any() for r in sample.references)  # object on white


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
