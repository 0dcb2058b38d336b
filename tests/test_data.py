"""common.data: upright RGB loading, folder listing, tensor conversion, image-folder and metadata datasets."""
import json

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common.data import (
    ImageFolderDataset,
    MetadataJsonlDataset,
    image_to_tensor,
    list_images,
    load_rgb,
    tensor_to_pil,
)
from common.errors import UsageError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _two_colour(width=40, height=20):
    """Left half red, right half blue."""
    img = Image.new("RGB", (width, height), RED)
    img.paste(BLUE, (width // 2, 0, width, height))
    return img


def _close(pixel, colour, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour))


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    path = tmp_path / "photo.jpg"
    _two_colour().save(path, exif=exif, quality=95)
    img = load_rgb(path)
    assert img.size == (20, 40)
    assert _close(img.getpixel((10, 2)), RED) and _close(img.getpixel((10, 37)), BLUE)


def test_modes_become_rgb_with_transparency_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    rgba.save(tmp_path / "a.png")
    img = load_rgb(tmp_path / "a.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0)) == (10, 20, 30)
    Image.new("L", (2, 2), 7).save(tmp_path / "g.png")
    assert load_rgb(tmp_path / "g.png").getpixel((0, 0)) == (7, 7, 7)
    Image.new("RGB", (2, 2), (5, 6, 7)).convert("P").save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png").mode == "RGB"


def test_unreadable_or_missing_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(UsageError, match="cannot read image .*broken.png"):
        load_rgb(bad)
    with pytest.raises(UsageError, match="image not found: .*gone.jpg"):
        load_rgb(tmp_path / "gone.jpg")


def test_list_images_sorted_filtered(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.webp", ".hidden.jpg", "notes.txt", "d.JPEG"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp", "d.JPEG"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"no images found in .*empty \(supported: .jpg"):
        list_images(tmp_path / "empty")
    with pytest.raises(UsageError, match="no images found in .*missing"):
        list_images(tmp_path / "missing")


def test_tensor_round_trip_is_exact():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 8, 6), generator=g, dtype=torch.uint8)
    img = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    t = image_to_tensor(img, (8, 6))
    assert t.shape == (3, 8, 6) and t.dtype == torch.float32 and -1 <= t.min() and t.max() <= 1
    assert tensor_to_pil(t).tobytes() == img.tobytes()
    batch = tensor_to_pil(torch.stack([t, -t]))
    assert len(batch) == 2 and batch[0].size == (6, 8)


def test_resize_covers_then_center_crops():
    img = Image.new("RGB", (60, 20), RED)
    img.paste(BLUE, (20, 0, 40, 20))  # blue middle third
    t = image_to_tensor(img, 10)
    assert t.shape == (3, 10, 10)
    assert torch.allclose(t[:, 5, 5], torch.tensor([-1.0, -1.0, 1.0]), atol=0.05)  # centre is blue
    wide = image_to_tensor(img, (10, 30))
    assert wide.shape == (3, 10, 30)


def test_random_crop_and_flip_follow_torch_seed():
    img = _two_colour(64, 16)
    torch.manual_seed(1)
    first = [image_to_tensor(img, 16, center_crop=False, hflip=True) for _ in range(12)]
    torch.manual_seed(1)
    again = [image_to_tensor(img, 16, center_crop=False, hflip=True) for _ in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    flipped = [t for t in first if t[0, 8, 0] < t[0, 8, -1]]  # red on the right
    assert 0 < len(flipped) < len(first)


def _write_images(folder, names):
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (24, 16), (i * 40, 0, 0)).save(folder / name)


def test_image_folder_dataset_batches(tmp_path):
    _write_images(tmp_path, ["1.png", "0.png"])
    ds = ImageFolderDataset(tmp_path, 8, prompt="a photo of sks dog")
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["prompt"] == ["a photo of sks dog"] * 2
    assert [p.split("/")[-1] for p in batch["path"]] == ["0.png", "1.png"]


def test_metadata_jsonl_dataset(tmp_path):
    _write_images(tmp_path, ["x.png", "y.jpg"])
    rows = [{"file_name": "x.png", "caption": "a cat"}, {"file_name": "y.jpg", "caption": "a dog"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = MetadataJsonlDataset(tmp_path, 8, caption_column="caption")
    assert [ds[i]["prompt"] for i in range(len(ds))] == ["a cat", "a dog"]
    assert ds[1]["pixel_values"].shape == (3, 8, 8)
    with pytest.raises(UsageError, match=r'metadata.jsonl:1: missing text column "text" \(other keys: caption\)'):
        MetadataJsonlDataset(tmp_path, 8)


@pytest.mark.parametrize(
    "third_line, pattern",
    [
        ('{"file_name": "x.png", "text": ', r"metadata.jsonl:3: not valid JSON"),
        ('{"text": "no file"}', r'metadata.jsonl:3: missing "file_name"'),
        ('{"file_name": "gone.png", "text": "t"}', r"metadata.jsonl:3: image not found: .*gone.png"),
    ],
)
def test_metadata_errors_name_the_line(tmp_path, third_line, pattern):
    _write_images(tmp_path, ["x.png"])
    good = json.dumps({"file_name": "x.png", "text": "t"})
    (tmp_path / "metadata.jsonl").write_text(f"{good}\n\n{third_line}\n")
    with pytest.raises(UsageError, match=pattern):
        MetadataJsonlDataset(tmp_path, 8)


def test_missing_metadata_file(tmp_path):
    with pytest.raises(UsageError, match="no metadata.jsonl in"):
        MetadataJsonlDataset(tmp_path, 8)


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    import numpy as np

    wide = (np.arange(32 * 32, dtype=np.int64).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    path = tmp_path / "g16.png"
    Image.fromarray(wide).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # what Pillow gives for a 16-bit PNG
    rgb = np.asarray(load_rgb(path))
    expected = np.rint(wide / 257.0).astype(np.uint8)
    assert rgb.shape == (32, 32, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))
    assert (rgb == 255).mean() < 0.01  # Pillow's own convert("RGB") makes ~all of it white


def test_tiny_training_images_are_refused(tmp_path):
    from common.data import MIN_TRAINING_SIDE, check_images

    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    Image.new("RGB", (MIN_TRAINING_SIDE, 40)).save(tmp_path / "ok.png")
    assert load_rgb(tmp_path / "one.png").size == (1, 1)  # plain loading still works
    with pytest.raises(UsageError, match=r"one.png is only 1x1 pixels \(at least 8 on each side needed\)"):
        check_images([tmp_path / "ok.png", tmp_path / "one.png"])
    check_images([tmp_path / "ok.png"])
    dataset = ImageFolderDataset(tmp_path, 8, prompt="p")
    with pytest.raises(UsageError, match="one.png is only 1x1"):
        dataset.check()
