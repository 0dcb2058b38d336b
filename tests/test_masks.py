"""Object masks on hand-built images: loading from every mode, grids, boxes, dilation, union."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.data.masks import dilate_mask, load_mask, mask_bbox, resize_mask, to_token_grid, union_masks
from common.errors import UsageError
from common.train.conditioning import flux_pack_latents

# A 6 x 8 object mask: rows 1-3, columns 2-5 set.
OBJECT = np.zeros((6, 8), dtype=bool)
OBJECT[1:4, 2:6] = True


def save(tmp_path, name: str, img: Image.Image) -> str:
    path = tmp_path / name
    img.save(path)
    return str(path)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "I;16", "F"])
def test_load_mask_from_every_mode(tmp_path, mode):
    grey = OBJECT.astype(np.uint8) * 255
    if mode == "I;16":
        img = Image.fromarray(OBJECT.astype(np.uint16) * 65535)
    elif mode == "F":
        img = Image.fromarray(OBJECT.astype(np.float32))
    else:
        img = Image.fromarray(grey, mode="L").convert(mode)
    path = save(tmp_path, "m.tiff" if mode == "F" else "m.png", img)
    mask = load_mask(path)
    assert mask.dtype == torch.bool and torch.equal(mask, torch.from_numpy(OBJECT))
    soft = load_mask(path, soft=True)
    assert soft.dtype == torch.float32 and torch.equal(soft, torch.from_numpy(OBJECT).float())


def test_load_mask_reads_the_alpha_of_a_cutout_and_thresholds(tmp_path):
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere: luminance alone would say "all object"
    rgba[..., 3] = OBJECT * 255
    assert torch.equal(load_mask(save(tmp_path, "cut.png", Image.fromarray(rgba, "RGBA"))), torch.from_numpy(OBJECT))

    ramp = np.array([[0, 1, 128, 129, 255]], dtype=np.uint8)
    path = save(tmp_path, "ramp.png", Image.fromarray(ramp, "L"))
    assert load_mask(path, threshold=0).tolist() == [[False, True, True, True, True]]  # SynCD: > 0
    assert load_mask(path, threshold=128 / 255).tolist() == [[False, False, False, True, True]]  # MuDI: > 128
    assert load_mask(path, soft=True)[0, 2].item() == pytest.approx(128 / 255)


def test_load_mask_resizes_and_reports_bad_files(tmp_path):
    path = save(tmp_path, "m.png", Image.fromarray(OBJECT.astype(np.uint8) * 255, "L"))
    assert torch.equal(load_mask(path, size=(12, 16)), torch.from_numpy(OBJECT.repeat(2, 0).repeat(2, 1)))
    with pytest.raises(UsageError, match="mask not found"):
        load_mask(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match="cannot read mask"):
        load_mask(tmp_path / "bad.png")


def test_resize_modes_on_a_hand_built_mask():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = mask[3, 2] = mask[3, 3] = True
    assert resize_mask(mask, (2, 2), "any").tolist() == [[True, False], [False, True]]
    assert resize_mask(mask, (2, 2), "area").tolist() == [[0.25, 0.0], [0.0, 0.5]]
    assert torch.equal(resize_mask(mask, (8, 8), "nearest"), mask.repeat_interleave(2, 0).repeat_interleave(2, 1))
    soft = torch.rand(2, 1, 16, 16)
    assert torch.equal(resize_mask(soft, (4, 4), "bilinear"), F.interpolate(soft, (4, 4), mode="bilinear"))
    assert resize_mask(torch.ones(3, 2, 8, 8, dtype=torch.bool), (4, 4), "any").shape == (3, 2, 4, 4)
    with pytest.raises(ValueError, match="nearest"):
        resize_mask(mask, (2, 2), "cubic")


def test_token_grid_lines_up_with_flux_packing():
    # a 64 x 64 image mask, latent 8 x 8, FLUX tokens 4 x 4 of 16 px: the object covers rows 0-31, cols 40-63
    image_mask = torch.zeros(64, 64, dtype=torch.bool)
    image_mask[:32, 40:] = True
    latent_mask = resize_mask(image_mask, (8, 8), "any")
    tokens = to_token_grid(image_mask, (8, 8), patch=2)
    assert tokens.shape == (16,)
    packed = flux_pack_latents(latent_mask[None, None].float())  # [1, 16 tokens, 4 cells]
    assert torch.equal(tokens, packed[0].amax(-1) > 0)
    assert tokens.reshape(4, 4).tolist() == [[False, False, True, True], [False, False, True, True],
                                             [False] * 4, [False] * 4]
    assert torch.equal(to_token_grid(image_mask, (8, 8), patch=1), latent_mask.flatten())
    # a wide canvas (target + 2 references side by side): tokens of the target block only
    canvas = torch.zeros(8, 24, dtype=torch.bool)
    canvas[:, :8] = True
    target = to_token_grid(canvas, (8, 24), patch=2).reshape(4, 12)
    assert target[:, :4].all() and not target[:, 4:].any()
    with pytest.raises(ValueError, match="patch"):
        to_token_grid(image_mask, (7, 8), patch=2)


def test_bbox_dilate_union():
    mask = torch.from_numpy(OBJECT)
    assert mask_bbox(mask) == (2, 1, 6, 4)  # PIL crop box: exclusive right and bottom
    x0, y0, x1, y1 = mask_bbox(mask)
    assert mask[y0:y1, x0:x1].all() and mask.sum() == (x1 - x0) * (y1 - y0)
    assert mask_bbox(torch.zeros(3, 3)) is None
    assert mask_bbox(torch.tensor([[0.0, 0.2], [0.0, 0.0]])) == (1, 0, 2, 1)

    dot = torch.zeros(7, 7, dtype=torch.bool)
    dot[1, 5] = True
    grown = dilate_mask(dot, 2)
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[0:4, 3:7] = True  # a 5 x 5 square clipped at the top and right borders
    assert torch.equal(grown, expected)
    assert torch.equal(dilate_mask(dot, 0), dot)
    assert dilate_mask(torch.stack([dot, dot]), 1).shape == (2, 7, 7)

    other = torch.zeros(6, 8, dtype=torch.bool)
    other[5, 0] = True
    assert torch.equal(union_masks([mask, other]), mask | other)
    soft = union_masks([mask.float() * 0.5, other.float()])
    assert soft.max() == 1.0 and soft[1, 2] == 0.5
    with pytest.raises(ValueError, match="shapes"):
        union_masks([mask, torch.zeros(2, 2, dtype=torch.bool)])
