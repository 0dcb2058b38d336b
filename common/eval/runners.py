"""Generic scoring runner (`evaluate`: score every task folder, write CSV / Markdown / contact sheet), its
shared flags (`eval_parser`), KID, and the DreamBench entry point. A method's own protocol and paper table
live in its package (customdiffusion.eval_protocol, mipadapter.eval_protocol).

Sample layout: `<sample_root>/<task>/` holds the images (directly or in `samples/`) and `prompts.json`
({image name: prompt}); `<task>` is the concept folder name (`scene_barn`), `<concept1>+<concept2>` for a
pair, or `comb_<index>` (MIP-Adapter's names, index into dataset_multiconcept.json). For one concept the
sample root may itself be that folder.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from common.cli import ArgumentParser, parse_args, torch_dtype_from_name
from common.data import list_images
from common.errors import UsageError
from common.eval.cache import DEFAULT_CACHE, FeatureCache
from common.eval.datasets import DREAMBENCH_TOKEN, Benchmark, Task, load_dreambench
from common.eval.report import COLUMN_TITLES, save_contact_sheet, summary_markdown, write_csv
from common.eval.scoring import PROMPTS_FILE, Backbones, TaskScores, mean_over_tasks, read_generated, score_task
from common.io import atomic_write_json, atomic_write_text

METRICS = ("clip_t", "clip_i", "dino", "dinov2", "aesthetic")


def eval_parser(prog: str, description: str) -> ArgumentParser:
    """The flags every evaluation script shares (sample/benchmark roots, metrics, backbones, output)."""
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--sample_root", required=True,
                   help="folder of generated images: one subfolder per concept/combination with prompts.json")
    p.add_argument("--benchmark_root", "--data_root", dest="benchmark_root", required=True,
                   help="the customconcept101/ folder (dataset.json, dataset_multiconcept.json, prompts/, "
                        "benchmark_dataset/)")
    p.add_argument("--concepts", nargs="+", default=None,
                   help="only these concept/combination names (default: every one with a sample folder)")
    p.add_argument("--numgen", type=int, default=None,
                   help="expected number of images per concept; a different count is an error (default: any)")
    p.add_argument("--metrics", nargs="+", default=["clip_t", "clip_i", "dino"], choices=METRICS,
                   help="metrics to compute")
    p.add_argument("--clip_model", "--clip", dest="clip_model", default="ViT-B-32",
                   help="open_clip model name for CLIP-T / CLIP-I; 'toy-clip' for the toy world's trained CLIP")
    p.add_argument("--clip_pretrained", default="openai", help="open_clip pretrained tag or local weights file")
    p.add_argument("--dino_model", default="dino_vits16",
                   help="DINO ViT-S/16: 'dino_vits16' (timm / torch.hub cache) or a local .pth state dict")
    p.add_argument("--dinov2_model", default="facebook/dinov2-base", help="DINOv2 hub id or local folder")
    p.add_argument("--dinov2_pooling", default="cls", choices=("cls", "mean"), help="DINOv2 feature pooling")
    p.add_argument("--aesthetic_model", default=None,
                   help="LAION aesthetic predictor .pth (sac+logos+ava1-l14-linearMSE.pth); needed for 'aesthetic'")
    p.add_argument("--aesthetic_clip_model", default="ViT-L-14", help="open_clip model under the aesthetic MLP")
    p.add_argument("--aesthetic_clip_pretrained", default="openai", help="its pretrained tag or weights file")
    p.add_argument("--feature_cache", default=str(DEFAULT_CACHE), help="folder caching reference-image features")
    p.add_argument("--batch_size", type=int, default=32, help="images per backbone forward pass")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="backbone dtype")
    p.add_argument("--tiny_backbones", action="store_true",
                   help="use tiny random-weight backbones built in code (tests and smoke runs; scores meaningless)")
    p.add_argument("--contact_k", type=int, default=4, help="prompts per row (worst / best) in the contact sheet")
    p.add_argument("--output", default=None, help="where to write results (default: <sample_root>/eval)")
    p.add_argument("--generate", action="store_true",
                   help="sample the images with the method first (comes with the method's sampler issue)")
    p.add_argument("--seed", type=int, default=0, help="seed of the KID subset draws")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    return p


_parser = eval_parser


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def build_backbones(args: argparse.Namespace) -> Backbones:
    """The backbones the selected metrics need (tiny random ones with --tiny_backbones)."""
    want = set(args.metrics)
    dev, dtype, bs = _device(args), torch_dtype_from_name(args.dtype), args.batch_size
    if args.tiny_backbones:
        from common.eval import tiny

        clip = tiny.tiny_clip(device=dev) if want & {"clip_t", "clip_i"} else None
        return Backbones(
            clip=clip,
            dino=tiny.tiny_vit(device=dev) if "dino" in want else None,
            dinov2=tiny.tiny_vit(1, name="tiny-dinov2", device=dev) if "dinov2" in want else None,
            aesthetic=(tiny.tiny_aesthetic(16), clip or tiny.tiny_clip(device=dev)) if "aesthetic" in want else None,
        )
    from common.eval.aesthetic import load_aesthetic_head
    from common.eval.clip import load_clip
    from common.eval.dino import load_dino, load_dinov2

    kw = dict(device=dev, dtype=dtype, batch_size=bs)
    aesthetic = None
    if "aesthetic" in want:
        if not args.aesthetic_model:
            raise UsageError("the aesthetic metric needs --aesthetic_model (sac+logos+ava1-l14-linearMSE.pth)")
        head = load_aesthetic_head(args.aesthetic_model).to(dev)
        aesthetic = (head, load_clip(args.aesthetic_clip_model, args.aesthetic_clip_pretrained, **kw))
    return Backbones(
        clip=load_clip(args.clip_model, args.clip_pretrained, **kw) if want & {"clip_t", "clip_i"} else None,
        dino=load_dino(args.dino_model, **kw) if "dino" in want else None,
        dinov2=load_dinov2(args.dinov2_model, args.dinov2_pooling, **kw) if "dinov2" in want else None,
        aesthetic=aesthetic,
    )


def find_task_folders(benchmark: Benchmark, sample_root: Path, only: Sequence[str] | None) -> list[tuple[Task, Path]]:
    """(task, folder) for every task with generated images; `only` names tasks that must all be present."""
    if not sample_root.is_dir():
        raise UsageError(f"--sample_root {sample_root} is not a folder")
    tasks = [benchmark.task(n) for n in only] if only else list(benchmark.tasks)
    found = []
    for task in tasks:
        cands = [sample_root / task.name, sample_root / f"comb_{task.index}"]
        if len(tasks) == 1 and (sample_root / PROMPTS_FILE).is_file():
            cands.append(sample_root)
        folder = next((c for c in cands if (c / PROMPTS_FILE).is_file()), None)
        if folder is None:
            if only:
                raise UsageError(f"no generated images for {task.name}: expected {cands[0]}/ with {PROMPTS_FILE} "
                                 f"(or {cands[1].name}/)")
            continue
        found.append((task, folder))
    if not found:
        raise UsageError(f"no concept folders with {PROMPTS_FILE} in {sample_root}; expected e.g. "
                         f"{sample_root / benchmark.tasks[0].name}/{PROMPTS_FILE}")
    return found


def evaluate(
    args: argparse.Namespace,
    benchmark: Benchmark,
    *,
    table: str,
    title: str,
    label: str,
    clip_text: Callable[[str], str],
    notes: list[str],
    paper_rows: Sequence[tuple[str, float, float, float]] | None = None,
) -> dict:
    """Score every task folder, write per_concept.csv, per_image.jsonl, summary.md, scores.json and
    contact_sheet.png under the output folder; returns the summary dict. `paper_rows` (method, CLIP-T,
    CLIP-I, DINO) are printed beside ours (default: report.PAPER_TABLES[table], if any)."""
    sample_root = Path(args.sample_root)
    out = Path(args.output) if args.output else sample_root / "eval"
    pairs = find_task_folders(benchmark, sample_root, args.concepts)
    generated = [(task, read_generated(folder, args.numgen)) for task, folder in pairs]  # fail before any model
    backbones = build_backbones(args)
    cache = FeatureCache(args.feature_cache)
    scores: list[TaskScores] = [
        score_task(task, gen, backbones, cache, clip_text=clip_text, progress=args.progress) for task, gen in generated
    ]
    keys = [k for k in ("clip_t", "clip_t_cos", "clip_i", "dino", "dinov2", "aesthetic")
            if k in args.metrics or (k == "clip_t_cos" and "clip_t" in args.metrics)]
    ours = mean_over_tasks(scores, keys)
    notes = [*notes, f"ours: {len(scores)} of {len(benchmark.tasks)} {benchmark.name} tasks, "
             f"{sum(s.n_images for s in scores)} images; reference features: {cache.hits} cached, {cache.misses} computed"]
    if args.tiny_backbones:
        notes.append("TINY RANDOM BACKBONES: these numbers are meaningless (smoke run)")
    md = summary_markdown(title, table, ours, label, notes=notes, paper_rows=paper_rows)
    write_csv(out / "per_concept.csv", scores)
    lines = [json.dumps({"task": s.task, **row}, ensure_ascii=False) for s in scores for row in s.per_image]
    atomic_write_text(out / "per_image.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(out / "summary.md", md)
    # CLIPScore is monotone in the cosine above 0; ranking by the cosine also orders the clipped ones
    sheet = "clip_t_cos" if "clip_t" in args.metrics else next(iter(keys), "clip_t")
    wrote = save_contact_sheet(out / "contact_sheet.png", scores, args.contact_k, metric=sheet)
    result = {"benchmark": benchmark.name, "table": table, "mean": ours,
              "per_task": {s.task: s.metrics for s in scores}, "n_images": sum(s.n_images for s in scores)}
    atomic_write_json(out / "scores.json", result)
    print(md)
    print("per-concept scores:", out / "per_concept.csv")
    if wrote:
        print("contact sheet:", out / "contact_sheet.png")
    return result


def _no_generate(args: argparse.Namespace, method: str) -> None:
    if args.generate:
        raise UsageError(f"--generate comes with the {method} sampler; generate the images first, then run "
                         "this script without --generate")


#: A method's sampler for `--generate`: (args, benchmark) -> None, writing <sample_root>/<task>/ + prompts.json.
GenerateFn = Callable[[argparse.Namespace, Benchmark], None]


def main_dreambench(argv: Sequence[str] | None = None) -> dict:
    """DreamBench (30 subjects x 25 prompts): CLIP-T with the subject token dropped ("a sks dog" -> "a dog"),
    CLIP-I and DINO against the subject's reference images (add dinov2 for DINOv2), per subject then averaged.
    Sample layout: <sample_root>/<subject>/ with prompts.json."""
    p = _parser("eval_dreambench.py", main_dreambench.__doc__.split("\n\n")[0])
    p.add_argument("--token", default=DREAMBENCH_TOKEN, help="the subject token used in the prompts")
    args = parse_args(p, argv)
    _no_generate(args, "dreambench")
    bench = load_dreambench(args.benchmark_root, token=args.token)
    drop = lambda prompt: " ".join(w for w in prompt.split() if w != args.token)
    return evaluate(args, bench, table="dreambench", title="DreamBench", label="ours", clip_text=drop,
                    notes=[f"CLIP-T = 2.5 * max(cos, 0) on the prompt without the token {args.token!r}",
                           "CLIP-I / DINO: mean of the generated x reference cosine matrix per subject",
                           "paper rows: not filled in (numbers not retrieved); compare against your baselines"])


def kid_main(argv: Sequence[str] | None = None) -> dict:
    """KID between two image folders (e.g. class-prompt generations vs held-out real images)."""
    p = ArgumentParser(prog="kid", description=kid_main.__doc__)
    p.add_argument("--real_dir", required=True, help="folder of real images")
    p.add_argument("--gen_dir", required=True, help="folder of generated images")
    p.add_argument("--inception", default=None, help="clean-fid inception-2015-12-05.pt (default: torchvision)")
    p.add_argument("--num_subsets", type=int, default=100, help="random subsets (clean-fid: 100)")
    p.add_argument("--max_subset_size", type=int, default=1000, help="subset size cap (clean-fid: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset draws")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--tiny_backbones", action="store_true", help="tiny random conv net instead of Inception")
    args = parse_args(p, argv)
    from common.eval.kid import kid, load_inception
    from common.eval.tiny import tiny_inception

    dev = _device(args)
    ext = tiny_inception(device=dev) if args.tiny_backbones else load_inception(args.inception, device=dev)
    real = ext.encode_images(list_images(args.real_dir), progress=True, desc="real")
    gen = ext.encode_images(list_images(args.gen_dir), progress=True, desc="generated")
    res = kid(real, gen, num_subsets=args.num_subsets, max_subset_size=args.max_subset_size, seed=args.seed)
    print(f"KID ({ext.name}): {res.mean:.6f} ± {res.std:.6f} (subset size {res.subset_size})")
    return {"kid": res.mean, "kid_std": res.std, "subset_size": res.subset_size, "backbone": ext.name}


__all__ = ["COLUMN_TITLES", "build_backbones", "eval_parser", "evaluate", "find_task_folders", "kid_main",
           "main_dreambench"]
