"""Seg-Mix and the MuDI dataset (spec §5 tests 1-9 and 24)."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from common.errors import UsageError
from common.train.steps import StepIndex
from mudi import data as mudi_data
from mudi.data import MuDIDataset, SegMixOptions, collate
from mudi.metadata import read_metadata
from mudi.segmix import (
    Subject,
    collage,
    crop_subject,
    loss_mask_map,
    max_factor,
    segmix_bbox,
    segmix_prompt,
)

from mudi_helpers import COLOURS, PHRASES, solid



def _dataset(folder, **kw):
    return MuDIDataset(read_metadata(folder), SegMixOptions(**kw))


def _capture_collage(monkeypatch):
    """Record what the dataset hands to `collage` and what it returns."""
    calls = []
    real, real_pair = mudi_data.collage, mudi_data.collage_pair

    def spy(subjects, *a, **kw):
        out = real(subjects, *a, **kw)
        calls.append((subjects, out))
        return out

    def spy_pair(left, right, *a, **kw):  # two subjects: the original's collage, subjects in canvas order
        out = real_pair(left, right, *a, **kw)
        calls.append(([left, right], out))
        return out

    monkeypatch.setattr(mudi_data, "collage", spy)
    monkeypatch.setattr(mudi_data, "collage_pair", spy_pair)
    return calls


# ------------------------------------------------------------------------------------------------- collage
def test_pixel_preservation_and_white_background():
    """(1) every pixel a subject owns equals its resized pixel; every pixel outside all masks is exactly 255."""
    rng = random.Random(0)
    a = Subject(np.random.default_rng(0).integers(0, 255, (60, 30, 3), dtype=np.uint8),
                np.pad(np.full((50, 20), 255, np.uint8), ((5, 5), (5, 5))), "a")
    b = Subject(np.random.default_rng(1).integers(0, 255, (40, 35, 3), dtype=np.uint8),
                np.pad(np.full((30, 25), 255, np.uint8), ((5, 5), (5, 5))), "b")
    for _ in range(20):
        out = collage([a, b], 200, 20, rng=rng)  # slots 100 wide, subjects <= 35: never overlap
        assert not (out.masks[0] & out.masks[1]).any()
        for k, s in enumerate((a, b)):
            x0, y0, x1, y1 = out.boxes[k]
            placed = np.zeros((200, 200), bool)
            placed[y0:y1, x0:x1] = s.mask > 122
            assert (placed == out.masks[k]).all()
            ys, xs = np.nonzero(out.masks[k])
            assert (out.image[ys, xs] == s.image[ys - y0, xs - x0]).all()
        assert (out.image[~out.merged] == 255).all()


def test_overlap_one_subject_on_top_both_ways():
    """(2) where subjects overlap, the pixel is exactly one subject's colour, and each is on top about half the time."""
    red, blue = (Subject(solid(c, 50, 70), np.full((50, 70), 255, np.uint8)) for c in (COLOURS["a"], COLOURS["b"]))
    rng, tops = random.Random(1), Counter()
    for _ in range(400):
        out = collage([red, blue], 100, 10, height_sync=True, rng=rng)  # 70 + 70 + margins > 100: overlap
        overlap_region = np.zeros((100, 100), bool)
        boxes = out.boxes
        overlap_region[max(boxes[0][1], boxes[1][1]):min(boxes[0][3], boxes[1][3]),
                       max(boxes[0][0], boxes[1][0]):min(boxes[0][2], boxes[1][2])] = True
        assert overlap_region.any()
        colours = {tuple(p) for p in out.image[overlap_region]}
        assert len(colours) == 1 and colours <= {COLOURS["a"], COLOURS["b"]}
        tops[colours.pop()] += 1
    assert 0.4 < tops[COLOURS["a"]] / 400 < 0.6


def test_bbox_crop_convention():
    """(8) the crop is the foreground block minus its last row and column (PIL's exclusive max, as the original)."""
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 30:50] = 255
    assert segmix_bbox(mask) == (30, 10, 49, 19)
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    s = crop_subject(img, mask)
    assert s.mask.shape == (9, 19) and (s.mask == 255).all()
    assert (s.image == img[10:19, 30:49]).all()
    mask[:] = 0
    mask[5, 5] = 255
    with pytest.raises(UsageError, match="at least 2x2"):
        crop_subject(img, mask)
    with pytest.raises(UsageError, match="no foreground"):
        crop_subject(img, np.zeros((64, 64), np.uint8))


def test_soft_alpha_map():
    """(7) soft_alpha 1 -> ones; 0 -> 1 inside, 0 far away; 0.3 -> background exactly 0.3; shape (1, r, r)."""
    merged = np.zeros((1024, 1024), bool)
    merged[100:600, 80:400] = True
    ones = loss_mask_map(merged, 128, 1.0)
    assert ones.shape == (1, 128, 128) and torch.equal(ones, torch.ones(1, 128, 128))
    hard = loss_mask_map(merged, 128, 0.0)
    assert hard.min() >= 0 and hard.max() <= 1
    assert (hard[0, 14:73, 11:48] == 1).all() and (hard[0, 100:, 100:] == 0).all()
    soft = loss_mask_map(merged, 128, 0.3)
    assert torch.allclose(soft[0, 100:, 100:], torch.full((28, 28), 0.3))
    assert torch.allclose(soft[0, 14:73, 11:48], torch.ones(59, 37))


def test_prompt_templates():
    assert segmix_prompt(["olis toy", "hta dog"], "sdxl") == "a photo of a olis toy and a hta dog, simple background."
    assert segmix_prompt(["olis toy", "hta dog"], "flux", white=False) == (
        "a close out photo of a small olis toy and a small hta dog, black simple background, pasted, sticker, "
        "unnatural, glued, clip-art, attached, collage, low quality.")
    assert segmix_prompt(["x", "y", "z"], "sdxl") == "a photo of a x and a y and a z, simple background."


# ------------------------------------------------------------------------------------------------- dataset
def test_scale_bounds_random(dataset_dir, monkeypatch):
    """(3) relative_scale 0: each subject fits its half-width slot and is at least 0.75 f_max of its crop."""
    calls = _capture_collage(monkeypatch)
    ds = _dataset(dataset_dir, resolution=64, segmix_prob=1.0)
    crop = crop_subject(np.asarray(Image.open(dataset_dir / "a00.png").convert("RGB")),
                        np.asarray(Image.open(dataset_dir / "mask_a00.png").convert("L")))
    fmax = max_factor(crop, 1024, 2, 32)  # every test subject has this box (rectangles and ellipses alike)
    ch, cw = crop.mask.shape
    for i in range(8):
        random.seed(i)
        ds[i % len(ds)]
    for subjects, _ in calls:
        for s in subjects:
            h, w = s.mask.shape
            assert w <= 1024 / 2 - 32 and h <= 1024 - 32
            assert w >= 0.75 * fmax * cw - 1 and h >= 0.75 * fmax * ch - 1


@pytest.mark.parametrize("s", [0.5, -0.5])
def test_relative_scale(dataset_dir, monkeypatch, s):
    """(3) s > 0: a at f_max, b at s f_max; s < 0 swaps the roles (±1 px)."""
    calls = _capture_collage(monkeypatch)
    ds = _dataset(dataset_dir, resolution=64, segmix_prob=1.0, relative_scale=s)
    random.seed(0)
    for i in range(4):
        ds[i]
    crop = crop_subject(np.asarray(Image.open(dataset_dir / "a00.png").convert("RGB")),
                        np.asarray(Image.open(dataset_dir / "mask_a00.png").convert("L")))
    fmax = max_factor(crop, 1024, 2, 32)  # all test crops share one box size
    want = {"a": 1.0 if s > 0 else 0.5, "b": 0.5 if s > 0 else 1.0}
    for subjects, _ in calls:
        for sub in subjects:
            assert abs(sub.mask.shape[1] - crop.mask.shape[1] * fmax * want[sub.id]) <= 1
            assert abs(sub.mask.shape[0] - crop.mask.shape[0] * fmax * want[sub.id]) <= 1


def test_prompt_composition_five_ids(make_data):
    """(4) prompt = template(own phrase, partner phrase); partner != own; every partner shows up."""
    folder = make_data(ids=("a", "b", "c", "d", "e"), per_id=1)
    ds = _dataset(folder, resolution=64, segmix_prob=1.0)
    partners = Counter()
    random.seed(0)
    for i in range(40):
        item = ds[0]  # subject "a"
        own, partner = item["prompt"].removeprefix("a photo of a ").removesuffix(", simple background.").split(" and a ")
        assert own == PHRASES["a"] and partner != own
        assert item["prompt"] == segmix_prompt([own, partner])
        partners[partner] += 1
    assert set(partners) == {PHRASES[k] for k in "bcde"}


def test_three_subjects(make_data):
    """--segmix_num_subjects 3: three distinct phrases, own first."""
    folder = make_data(ids=("a", "b", "c"), per_id=1)
    ds = _dataset(folder, resolution=64, segmix_prob=1.0, num_subjects=3)
    item = ds[StepIndex(1, 0)]
    phrases = item["prompt"].removeprefix("a photo of a ").removesuffix(", simple background.").split(" and a ")
    assert phrases[0] == PHRASES["b"] and sorted(phrases) == sorted(PHRASES[k] for k in "abc")


def test_segmix_prob_zero_is_dreambooth(dataset_dir):
    """(5) prob 0: the item equals a reference DreamBooth transform under the same RNG (random crop included)."""
    ds = _dataset(dataset_dir, resolution=64, segmix_prob=0.0, center_crop=False)
    reference = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BILINEAR), T.RandomCrop(64), T.ToTensor(),
                           T.Normalize([0.5], [0.5])])
    for i in range(len(ds)):
        torch.manual_seed(i)
        item = ds[i]
        torch.manual_seed(i)
        record = ds.meta.records[i]
        expected = reference(Image.open(record.image).convert("RGB"))
        assert torch.equal(item["pixel_values"], expected)
        assert item["prompt"] == record.text and not item["segmix"]
        assert torch.equal(item["mask_map"], torch.ones(1, 8, 8))


def test_start_step(dataset_dir):
    """(6) before segmix_start_step no Seg-Mix even with prob 1; from the step on, always."""
    ds = _dataset(dataset_dir, resolution=64, segmix_prob=1.0, segmix_start_step=3)
    assert not any(ds[StepIndex(i, 2)]["segmix"] for i in range(4))
    assert all(ds[StepIndex(i, 3)]["segmix"] for i in range(4))
    assert not ds[0]["segmix"]  # plain int index: the main-process step, 0
    ds.set_step(5)
    assert ds[0]["segmix"]


def test_value_range_and_white(dataset_dir, monkeypatch):
    """(9) [-1, 1]; white background -> +1 exactly (canvas = resolution, so no resampling blurs it)."""
    calls = _capture_collage(monkeypatch)
    ds = _dataset(dataset_dir, resolution=1024, segmix_prob=1.0, soft_alpha=0.0)
    random.seed(3)
    item = ds[0]
    px = item["pixel_values"]
    assert px.min() >= -1 and px.max() <= 1
    merged = torch.from_numpy(calls[-1][1].merged)
    assert (px[:, ~merged] == 1).all()
    red = torch.tensor(COLOURS["a"]) / 127.5 - 1
    own = [sub.id for sub in calls[-1][0]].index("a")
    owned = torch.from_numpy(calls[-1][1].masks[own])
    assert torch.allclose(px[:, owned].mean(1), red, atol=0.05)
    assert item["mask_map"].shape == (1, 128, 128)


def test_metadata_parsing(make_data, tmp_path):
    """(24) id map + records; len = images x repeats; a truncated last line is ignored; missing mask -> error."""
    folder = make_data(extra_lines=['{"id": "a", "file_na'])
    with pytest.warns(UserWarning, match="unparsable last line"):
        meta = read_metadata(folder)
    assert meta.id_map == {"a": PHRASES["a"], "b": PHRASES["b"]} and len(meta.records) == 4
    assert len(MuDIDataset(meta, SegMixOptions(resolution=64, repeats=3))) == 12
    (folder / "mask_b01.png").unlink()
    with pytest.warns(UserWarning), pytest.raises(UsageError, match="mask not found"):
        read_metadata(folder)


@pytest.mark.parametrize("line, message", [
    ('{"id": "z", "file_name": "a00.png", "mask_path": "mask_a00.png", "text": "x"}', "not in the id map"),
    ('{"id": "a", "file_name": "gone.png", "mask_path": "mask_a00.png", "text": "x"}', "image not found"),
])
def test_metadata_bad_lines(make_data, line, message):
    folder = make_data(extra_lines=[line, '{"id": "a", "file_name": "a00.png", "mask_path": "mask_a00.png", '
                                          '"text": "x"}'])
    with pytest.raises(UsageError, match=message):
        read_metadata(folder)


def test_bad_json_in_the_middle(make_data):
    folder = make_data(extra_lines=["{broken", '{"id": "a", "file_name": "a00.png", "mask_path": "m", "text": "x"}'])
    with pytest.raises(UsageError, match="not valid JSON"):
        read_metadata(folder)


def test_wrong_mask_size(dataset_dir):
    Image.new("L", (10, 10)).save(dataset_dir / "mask_a00.png")
    with pytest.raises(UsageError, match="masks must have the size of their image"):
        _dataset(dataset_dir, resolution=64)


def test_empty_mask_refused_up_front(dataset_dir):
    Image.new("L", (96, 128)).save(dataset_dir / "mask_b00.png")
    with pytest.raises(UsageError, match="mask_b00.png: a subject mask has no foreground"):
        _dataset(dataset_dir, resolution=64)


def test_relative_scale_out_of_range(dataset_dir):
    with pytest.raises(UsageError, match="must be in \\[-1, 1\\]"):
        _dataset(dataset_dir, resolution=64, relative_scale=1.5)


def test_collate_instance_then_class(make_data):
    inst = make_data("inst")
    cls = make_data("cls", filename="class_metadata.jsonl", class_names=True)
    ds = MuDIDataset(read_metadata(inst), SegMixOptions(resolution=64, segmix_prob=1.0),
                     read_metadata(cls, "class_metadata.jsonl"))
    random.seed(0)
    batch = collate([ds[0], ds[2]])
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["num_instance"] == 2
    assert batch["prompts"][2] == "a photo of a red toy and a blue toy, simple background."
    assert batch["prompts"][3] == "a photo of a blue toy and a red toy, simple background."


def test_start_step_reaches_loader_workers(dataset_dir):
    """The step travels with the index (StepIndex, as the Trainer's sampler hands it out), so forked loader
    workers see it: nothing to propagate from the main process."""
    from torch.utils.data import DataLoader

    ds = _dataset(dataset_dir, resolution=64, segmix_prob=1.0, segmix_start_step=1)
    batches = [[StepIndex(0, 0), StepIndex(1, 0)], [StepIndex(2, 1), StepIndex(3, 1)]]
    loader = DataLoader(ds, batch_sampler=batches, num_workers=2, collate_fn=collate)
    assert [batch["segmix"] for batch in loader] == [[False, False], [True, True]]
