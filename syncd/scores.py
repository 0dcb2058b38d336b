"""SynCD filtering scores (§1.4, `cal_scores.py`): DINOv2 CLS cosine between mask-cropped objects of a tuple
(upper-triangular matrix) and the LAION aesthetic score of each image, written to metadata_with_scores.json."""
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


def crop_by_mask(img: Image.Image, mask: Image.Image) -> Image.Image:
    """The object's bounding box (mask > 0), the whole image when the mask is empty."""
    m = np.asarray(mask.convert("L").resize(img.size, Image.NEAREST)) > 0
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return img
    return img.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


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


def score_folder(root: Path, *, tiny: bool = False, dinov2: str = "facebook/dinov2-large",
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
