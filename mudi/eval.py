"""MuDI evaluation: Detect-and-Compare (mudi.dnc), multi-subject fidelity and CLIP-T over a folder of samples.

References come from the training folder (--instance_data_dir: each id's images, queries = its phrase without
the identifier word, e.g. "olis harry potter toy" -> "harry potter toy") or from --reference_dirs + --queries
(files with "mask" in the name skipped, sorted, as the original). Similarity: DINOv2 (mean of the last hidden
state, the original's `eval_with_dinov2`) or DreamSim where installed. Multi-subject fidelity: per subject, the
mean cosine of the whole image to that subject's references (DINOv2), then the mean over subjects. CLIP-T: the
prompt (prompts.json beside the images) with the identifier words removed.
Writes per_image.csv, summary.json and contact_sheet.png (detected boxes drawn).
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from common.cli import ArgumentParser, parse_args
from common.errors import UsageError

BOX_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Detect-and-Compare, multi-subject fidelity and CLIP-T of MuDI samples.")
    p.add_argument("--sample_dir", required=True, help="folder of generated images (prompts.json optional)")
    p.add_argument("--instance_data_dir", default=None, help="training folder: references and queries per id")
    p.add_argument("--reference_dirs", nargs="*", default=None, help="one reference folder per subject")
    p.add_argument("--queries", nargs="*", default=None, help="OWLv2 text query per subject")
    p.add_argument("--owl_model", default="google/owlv2-base-patch16-ensemble", help="OWLv2 hub id or folder")
    p.add_argument("--threshold", type=float, default=0.4, help="OWLv2 threshold (the demo's 0.4; function default 0.25)")
    p.add_argument("--similarity", default="dinov2", choices=["dinov2", "dreamsim"], help="embedding for D&C")
    p.add_argument("--dinov2_model", default="facebook/dinov2-base", help="DINOv2 hub id or folder")
    p.add_argument("--norm", default="spectral", choices=["spectral", "fro"],
                   help="matrix norm of D&C: spectral (ord=2, the original) or Frobenius")
    p.add_argument("--clip_model", default="ViT-B-32", help="open_clip model for CLIP-T")
    p.add_argument("--clip_pretrained", default="openai", help="open_clip weights tag or file")
    p.add_argument("--tiny_backbones", action="store_true", help="random tiny OWLv2 / ViT / CLIP (smoke runs only)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--output", default="results/mudi", help="folder for per_image.csv, summary.json, contact_sheet.png")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --output (else refused)")
    return p


def _images(folder: Path) -> list[Path]:
    from common.data import list_images

    return [p for p in list_images(folder) if "mask" not in p.name and not p.stem.endswith(("_grid", "_init"))]


def references_and_queries(args) -> tuple[list[list[Path]], list[str], list[str]]:
    """(reference image lists, OWLv2 queries, identifier words to strip from prompts)."""
    if args.instance_data_dir:
        from mudi.metadata import read_metadata

        meta = read_metadata(args.instance_data_dir, need_masks=False)
        groups = meta.by_id()
        refs = [[r.image for r in groups[k]] for k in meta.id_map if k in groups]
        phrases = [meta.id_map[k] for k in meta.id_map if k in groups]
        queries = args.queries or [p.split(" ", 1)[1] if " " in p else p for p in phrases]
        identifiers = [p.split(" ", 1)[0] for p in phrases if " " in p]
    elif args.reference_dirs:
        refs = [_images(Path(d)) for d in args.reference_dirs]
        queries, identifiers = list(args.queries or []), []
    else:
        raise UsageError("give --instance_data_dir or --reference_dirs with --queries")
    if len(queries) != len(refs):
        raise UsageError(f"{len(refs)} reference sets but {len(queries)} queries; give one --queries entry each")
    if len(refs) < 2:
        raise UsageError("D&C compares at least two subjects")
    return refs, queries, identifiers


def _backbones(args, device):
    from mudi.detect import load_owlv2

    if args.tiny_backbones:
        from common.eval.tiny import tiny_clip, tiny_vit

        return load_owlv2("tiny", threshold=args.threshold, device=device), tiny_vit(name="tiny-dinov2", device=device), \
            tiny_clip(device=device)
    detector = load_owlv2(args.owl_model, threshold=args.threshold, device=device)
    if args.similarity == "dreamsim":
        embedder = _dreamsim(device)
    else:
        from common.eval.dino import load_dinov2

        embedder = load_dinov2(args.dinov2_model, pooling="mean", device=device)
    return detector, embedder, None


def _dreamsim(device):
    try:
        from dreamsim import dreamsim
    except ImportError:
        raise UsageError("--similarity dreamsim needs the dreamsim package (pip install dreamsim)") from None
    from common.eval.extractor import FeatureExtractor, Preprocess

    model, _ = dreamsim(pretrained=True, device=str(device))
    return FeatureExtractor("dreamsim", Preprocess((224, 224), None, None, None), model.embed, device=device)


def _clip(args, device, tiny):
    if tiny is not None:
        return tiny
    from common.eval.clip import load_clip

    return load_clip(args.clip_model, args.clip_pretrained, device=device)


def _prompts(sample_dir: Path, images: list[Path]) -> dict[str, str]:
    path = sample_dir / "prompts.json"
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e.msg})") from None
    return {p.name: table.get(p.name, table.get(p.stem)) for p in images if table.get(p.name, table.get(p.stem))}


def strip_identifiers(prompt: str, identifiers: Sequence[str]) -> str:
    return " ".join(w for w in prompt.split() if w not in set(identifiers))


def draw_boxes(image, boxes):
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for k, box in enumerate(boxes):
        draw.rectangle(box, outline=BOX_COLOURS[k % len(BOX_COLOURS)], width=max(1, out.width // 128))
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    import torch

    from common.data import load_rgb
    from common.eval.similarity import cosine_matrix
    from common.io import atomic_save_image, atomic_write_json, atomic_write_text
    from mudi.dnc import DetectAndCompare, pad_to_square
    from mudi.sample import grid

    from tqdm.auto import tqdm

    args = parse_args(build_parser(), argv)
    out = Path(args.output)
    if (out / "summary.json").exists() and not args.overwrite:
        raise UsageError(f"{out} already holds results; pass --overwrite or another --output")
    from common.io import check_writable

    check_writable(out / "summary.json")
    sample_dir = Path(args.sample_dir)
    images = _images(sample_dir)
    refs, queries, identifiers = references_and_queries(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    detector, embedder, tiny_clip_model = _backbones(args, device)
    ref_images = [[load_rgb(p) for p in group] for group in refs]
    dnc = DetectAndCompare(detector, embedder, ref_images, queries, norm=args.norm)
    prompts = _prompts(sample_dir, images)
    clip = _clip(args, device, tiny_clip_model) if prompts else None
    rows, sheet = [], []
    for path in tqdm(images, desc="D&C", unit="img"):
        image = load_rgb(path)
        result = dnc.score(image)
        whole = embedder.encode_images([image])
        fidelity = [cosine_matrix(whole, r).mean().item() for r in dnc.references]
        row = {"image": path.name, "dnc": result.score, "detections": len(result.boxes),
               "fidelity": sum(fidelity) / len(fidelity)}
        row.update({f"fidelity_{q.replace(' ', '_')}": f for q, f in zip(queries, fidelity)})
        if clip is not None and path.name in prompts:
            text = strip_identifiers(prompts[path.name], identifiers)
            row["clip_t"] = cosine_matrix(clip.encode_images([image]), clip.encode_texts([text])).item()
        rows.append(row)
        scale = 256 / max(image.size)
        thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        sheet.append(pad_to_square(draw_boxes(thumb, [tuple(v * scale for v in box) for box in result.boxes])))
    if not rows:
        raise UsageError(f"no generated images in {sample_dir}")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    atomic_write_text(out / "per_image.csv", buffer.getvalue())
    summary = {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r)
               for k in keys if k not in ("image",)}
    summary.update(num_images=len(rows), norm=args.norm, threshold=args.threshold, queries=queries)
    atomic_write_json(out / "summary.json", summary)
    atomic_save_image(grid(sheet[:16], cols=min(4, len(sheet))), out / "contact_sheet.png")
    print(f"D&C {summary['dnc']:.4f} over {len(rows)} images -> {out}")
    return summary


__all__ = ["build_parser", "main", "references_and_queries", "strip_identifiers"]
