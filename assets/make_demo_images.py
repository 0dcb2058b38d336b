"""Draw the small demo concept images used by smoke runs and tests (our own, made in code).

    python assets/make_demo_images.py            # writes assets/demo/<concept>/*.png and assets/demo/mudi_toys/
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

CONCEPTS = {
    # name: (background, body colour, shape)
    "toy_robot": ((235, 230, 220), (200, 60, 50), "robot"),
    "teapot": ((210, 225, 240), (40, 110, 160), "teapot"),
}


def draw(kind: str, background, colour, size: int, variant: int) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    s, off = size, (variant - 1) * size // 12
    if kind == "robot":
        d.rectangle([s * .3 + off, s * .35, s * .7 + off, s * .8], fill=colour)
        d.rectangle([s * .38 + off, s * .15, s * .62 + off, s * .35], fill=colour)
        for x in (.44, .56):
            d.ellipse([s * (x - .03) + off, s * .22, s * (x + .03) + off, s * .28], fill=(255, 255, 255))
    else:
        d.ellipse([s * .25 + off, s * .35, s * .75 + off, s * .8], fill=colour)
        d.polygon([(s * .72 + off, s * .55), (s * .92 + off, s * .4), (s * .9 + off, s * .46), (s * .74 + off, s * .62)],
                  fill=colour)
        d.arc([s * .12 + off, s * .45, s * .34 + off, s * .68], 90, 270, fill=colour, width=max(2, s // 40))
        d.ellipse([s * .45 + off, s * .28, s * .55 + off, s * .36], fill=colour)
    angle = variant * 2 * math.pi / 5
    d.ellipse([s * (.1 + .05 * math.cos(angle)), s * .08, s * (.16 + .05 * math.cos(angle)), s * .14], fill=colour)
    return img


def make(out: Path, size: int = 128, per_concept: int = 2) -> list[Path]:
    paths = []
    for name, (bg, colour, kind) in CONCEPTS.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for v in range(per_concept):
            path = folder / f"{v:02d}.png"
            draw(kind, bg, colour, size, v).save(path)
            paths.append(path)
    return paths


# MuDI's layout (metadata.jsonl: line 1 maps ids to phrases, then one line per image with its mask)
MUDI_SUBJECTS = {"a": ("toy_robot", "olis toy robot"), "b": ("teapot", "hta teapot")}


def make_mudi(out: Path, size: int = 128, per_concept: int = 2) -> list[Path]:
    """The two demo concepts as a MuDI training folder; a mask is every pixel off the plain background."""
    folder = out / "mudi_toys"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": {k: phrase for k, (_, phrase) in MUDI_SUBJECTS.items()}})]
    paths = []
    for key, (name, phrase) in MUDI_SUBJECTS.items():
        bg, colour, kind = CONCEPTS[name]
        for v in range(per_concept):
            img = draw(kind, bg, colour, size, v)
            mask = Image.new("L", img.size, 0)
            mask.putdata([0 if px == bg else 255 for px in img.getdata()])
            stem = f"{key}{v:02d}"
            img.save(folder / f"{stem}.png")
            mask.save(folder / f"mask_{stem}.png")
            paths += [folder / f"{stem}.png", folder / f"mask_{stem}.png"]
            lines.append(json.dumps({"id": key, "file_name": f"{stem}.png", "mask_path": f"mask_{stem}.png",
                                     "text": f"A photo of a {phrase}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return paths + [folder / "metadata.jsonl"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "demo", help="output folder")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--per_concept", type=int, default=2, help="images per concept")
    args = parser.parse_args()
    for p in make(args.out, args.size, args.per_concept) + make_mudi(args.out, args.size, args.per_concept):
        print(p)
