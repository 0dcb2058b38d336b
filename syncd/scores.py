"""SynCD filtering scores (§1.4, `cal_scores.py`): DINOv2 (ViT-L/14 with registers, as the original's
`dinov2_vitl14_reg`) CLS cosine between mask-cropped objects of a tuple (upper-triangular matrix) and the LAION
aesthetic score of each image, written to metadata_with_scores.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from common.errors import UsageError
from common.io import atomic_write_json


def _mask_box(m: np.ndarray) -> tuple[int, int, int, int] | None:
    """The original's `mask_to_bbox(square=True)`: tight box [x0, y0, x1, y1) of m, None when empty or one pixel
    thick; then a square of half-side round(max half-extent) around the rounded centre (may leave the image)."""
    ys, xs = np.nonzero(m)
    if ys.size == 0 or xs.max() <= xs.min() or ys.max() <= ys.min():
        return None
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
    cx, cy = ((box[:2] + box[2:]) / 2).round().astype(int)
    s = int(((box[2:] - box[:2]) / 2).max().round())
    return cx - s, cy - s, cx + s, cy + s


def crop_by_mask(img: Image.Image, mask: Image.Image) -> Image.Image:
    """The original's `crop_by_mask` (cal_scores' DINOv2 input): the square box around the object (mask > 0,
    nearest-resized to the image), padded with black where it leaves the image; when that box is exactly the
    whole (square) image the inverted mask's box is used. The whole image when there is no box (the original
    returns it too, and raises when the inverted mask is empty)."""
    m = np.asarray(mask.convert("L").resize(img.size, Image.NEAREST)) > 0
    box = _mask_box(m)
    side = max(img.size)
    if box is not None and box == (0, 0, side, side):
        box = _mask_box(~m)
    if box is None:
        return img
    return img.crop(tuple(int(v) for v in box))


def _backbones(tiny: bool, dinov2: str, aesthetic: str | None, device: str):
    if tiny:
        from common.eval import tiny as t

        return t.tiny_vit(1, name="tiny-dinov2", device=device), (t.tiny_aesthetic(16), t.tiny_clip(device=device))
    from common.eval.aesthetic import load_aesthetic_head
    from common.eval.clip import load_clip
    from common.eval.dino import load_dinov2

    if not aesthetic:
        raise UsageError("--score needs --aesthetic_model (sa_0_4_vit_l_14_linear.pth) or --tiny_backbones")
    head = load_aesthetic_head(aesthetic).to(device)
    return load_dinov2(dinov2, "cls", device=device), (head, load_clip("ViT-L-14", "openai", device=device))


def score_folder(root: Path, *, tiny: bool = False, dinov2: str = "facebook/dinov2-with-registers-large",
                 aesthetic: str | None = None, device: str = "cpu", progress: bool = True) -> Path:
    from common.eval.aesthetic import aesthetic_score

    entries = []
    for f in sorted(root.glob("metadata_*.json")):
        if f.name != "metadata_with_scores.json":
            entries += json.loads(f.read_text())
    dino, (head, clip) = _backbones(tiny, dinov2, aesthetic, device)
    dino_sum, n_pairs = 0.0, 0
    for e in tqdm(entries, desc="scores", disable=not progress):
        imgs = [Image.open(root / nm).convert("RGB") for nm in e["filenames"]]
        masks = [Image.open(root / "masks" / nm) if (root / "masks" / nm).is_file() else Image.new("L", im.size, 255)
                 for nm, im in zip(e["filenames"], imgs)]
        feats = F.normalize(dino.encode_images([crop_by_mask(i, m) for i, m in zip(imgs, masks)]).float(), dim=-1)
        sim = (feats @ feats.T).tolist()
        n = len(imgs)
        e["dino_scores"] = [[sim[i][j] if j > i else 0.0 for j in range(n)] for i in range(n)]
        scores = aesthetic_score(head, clip, imgs)
        e["aesthetics_scores"] = {Path(nm).stem: float(s) for nm, s in zip(e["filenames"], scores)}
        dino_sum += sum(sim[i][j] for i in range(n) for j in range(i + 1, n))
        n_pairs += n * (n - 1) // 2
    out = root / "metadata_with_scores.json"
    atomic_write_json(out, entries)
    if n_pairs:
        print(f"mean pairwise DINOv2 similarity: {dino_sum / n_pairs:.4f} over {len(entries)} tuples")
    return out
