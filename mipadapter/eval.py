"""`eval_mipadapter.py`: MIP-Adapter's Concept101 protocol (mipadapter.eval_protocol) plus `--generate`, the original
inference_concept101.py: per combination its two class words as entity words (token length 1 for a word the
prompt lacks, as get_entity_index), all images of each concept (800-px bilinear, box-cropped by its json_data box
when present, letterboxed on white to 224), batches of 4 prompts with a fresh generator seeded 420, 30 steps,
CFG 5.0 (the SDXL pipeline default the original ends up with), λ 0.75 (sdxl) / 0.65 (sdxl_plus), one image per
prompt; CLIP-T text `<prompt>_gen.` cut at the first '.', as the original's prompts.json.

Differences from the original, deliberate: prompt-safe, unique file names (a '/' broke saving, duplicate prompts
overwrote each other), the prompts are sharded over processes with accelerate without dropping a short last
batch, a concept without json_data boxes is used uncropped (the original raised), and finished images are
skipped, so an interrupted run resumes (batches are formed per combination: Concept101's 12 prompts each give
the original's batches of 4, and so its initial noise, on a fresh run)."""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from common.cli import ArgumentParser, positive_int
from common.data import load_rgb
from common.errors import UsageError
from common.eval.datasets import Benchmark, Task
from common.eval.scoring import PROMPTS_FILE
from common.io import atomic_save_image, atomic_write_json
from mipadapter import eval_protocol
from mipadapter.model import VARIANTS
from mipadapter.outputs import safe_name
from mipadapter.pipeline import GUIDANCE_SCALE
from mipadapter.pipeline import generate as mip_generate
from mipadapter.sample import load_mip, str2bool

SHORT_SIDE = 800
REF_SIZE = 224


def add_generate_args(p: ArgumentParser) -> None:
    g = p.add_argument_group("--generate (sampling before scoring; inference_concept101.py flags)")
    g.add_argument("--base_model_path", "--pretrained_model_name_or_path", dest="base_model_path", default=None,
                   help="SDXL base / RealVisXL (default: the variant's)")
    g.add_argument("--image_encoder_path", default=None, help="CLIP vision folder or preset (default: the variant's)")
    g.add_argument("--ip_ckpt", default=None, help="MIP-Adapter checkpoint or trained output folder")
    g.add_argument("--is_plus", type=str2bool, default=None, help="True for sdxl_plus (checked against --ip_ckpt)")
    g.add_argument("--variant", choices=tuple(VARIANTS), default=None, help="sdxl | sdxl_plus")
    g.add_argument("--scale", type=float, default=None, help="λ (default: 0.75 sdxl, 0.65 sdxl_plus)")
    g.add_argument("--num_inference_steps", type=positive_int, default=30, help="denoising steps")
    g.add_argument("--guidance_scale", type=float, default=GUIDANCE_SCALE,
                   help="classifier-free guidance (the original's generate never forwards its 7.5: the SDXL "
                        "pipeline's default 5.0 is what ran)")
    g.add_argument("--sample_seed", type=int, default=420, help="seed of each batch's fresh generator")
    g.add_argument("--sample_batch_size", type=positive_int, default=4, help="prompts per generate call")
    g.add_argument("--sample_dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="dtype of the diffusion model (default: fp16 on CUDA, else fp32)")
    g.add_argument("--height", type=positive_int, default=None, help="image height (default: the model's, 1024)")
    g.add_argument("--width", type=positive_int, default=None, help="image width (default: the model's, 1024)")


def reference_image(path: Path, json_root: Path | None) -> Image.Image:
    """data/concept101_dataset.py: shorter side to 800 (torchvision Resize: bilinear, longer side truncated),
    cropped to json_data/<concept>/<stem>.json's mask[1].box (coordinates truncated to int, as its int32 cast)
    when there is one, then resize_padding_image: the longer side to 224, the other int(224 * aspect) (truncated),
    bilinear, padded on white to 224 x 224 (left/top get the smaller half)."""
    img = load_rgb(path)
    w, h = img.size
    if w <= h:
        size = (SHORT_SIDE, int(SHORT_SIDE * h / w))
    else:
        size = (int(SHORT_SIDE * w / h), SHORT_SIDE)
    if size != img.size:
        img = img.resize(size, Image.BILINEAR)
    box_file = None if json_root is None else json_root / path.parent.name / f"{path.stem}.json"
    if box_file is not None and box_file.is_file():
        try:
            box = json.loads(box_file.read_text())["mask"][1]["box"]
            img = img.crop(tuple(int(v) for v in box))
        except (KeyError, IndexError, TypeError, ValueError, json.JSONDecodeError) as err:
            raise UsageError(f"{box_file}: no mask[1].box ({err})") from None
    aspect = img.width / img.height
    if aspect > 1.0:
        new_w, new_h = REF_SIZE, int(REF_SIZE / aspect)
    else:
        new_w, new_h = int(REF_SIZE * aspect), REF_SIZE
    img = img.resize((max(1, new_w), max(1, new_h)), Image.BILINEAR)
    canvas = Image.new("RGB", (REF_SIZE, REF_SIZE), (255, 255, 255))
    canvas.paste(img, ((REF_SIZE - img.width) // 2, (REF_SIZE - img.height) // 2))
    return canvas


def clip_t_text(prompt: str) -> str:
    """The CLIP-T text the original scores: its prompts.json holds `<file stem up to the first '.'> + '.'` of
    `<prompt>_gen.png`, i.e. the prompt cut at its first '.' (kept), or `<prompt>_gen.` when it has none."""
    return f"{prompt}_gen".split(".")[0] + "."


def entity_token_lengths(pipe: Any, prompt: str, words: Sequence[str]) -> list[int]:
    """concept101_dataset.get_entity_index's length per word: the word's tokens (tokenizer 1, no BOS/EOS) when
    that token run occurs in the prompt's padded 77 ids, else 1 (the original's fallback (1, 1))."""
    tok = pipe.tokenizer
    ids = tok(prompt, max_length=tok.model_max_length, padding="max_length", truncation=True).input_ids
    out = []
    for word in words:
        sub = tok(word).input_ids[1:-1]
        hit = any(ids[i:i + len(sub)] == sub for i in range(len(ids) - len(sub)))
        out.append(len(sub) if hit else 1)
    return out


def task_files(task: Task) -> dict[str, str]:
    """{image file name: CLIP-T text (clip_t_text)} for one combination, names prompt-safe and unique."""
    out: dict[str, str] = {}
    for prompt in task.prompts(with_token=False):
        stem, i = safe_name(prompt), 1
        name = f"{stem}_gen.png"
        while name in out:
            i += 1
            name = f"{stem}_{i}_gen.png"
        out[name] = clip_t_text(prompt)
    return out


def generate(args: argparse.Namespace, bench: Benchmark) -> None:
    """Write <sample_root>/comb_<i>/<prompt>_gen.png + prompts.json for every (or every --concepts) task."""
    if not args.ip_ckpt:
        raise UsageError("--generate needs --ip_ckpt (a MIP-Adapter checkpoint)")
    from accelerate import PartialState

    state = PartialState()
    root = Path(args.sample_root)
    tasks = [bench.task(n) for n in args.concepts] if args.concepts else list(bench.tasks)
    jobs = []  # (task, [(file, prompt)]) batches still to do
    for task in tasks:
        folder = root / f"comb_{task.index}"
        files = task_files(task)
        if state.is_main_process:
            atomic_write_json(folder / PROMPTS_FILE, files)
        todo = [(f, p) for f, p in zip(files, task.prompts(with_token=False)) if not (folder / f).is_file()]
        for i in range(0, len(todo), args.sample_batch_size):
            jobs.append((task, todo[i:i + args.sample_batch_size]))
    state.wait_for_everyone()
    if not jobs:
        print("all images exist; scoring")
        return
    import torch

    dtype = args.sample_dtype or ("fp16" if torch.cuda.is_available() else "fp32")
    want = args.variant or (None if args.is_plus is None else ("sdxl_plus" if args.is_plus else "sdxl"))
    pipe, adapter, encoder = load_mip(args.ip_ckpt, args.base_model_path, args.image_encoder_path, want, dtype,
                                      str(state.device))
    scale = args.scale if args.scale is not None else adapter.variant.scale
    json_root = bench.root / "json_data"
    refs_cache: dict[int, list[list[Image.Image]]] = {}
    with state.split_between_processes(jobs) as mine:  # uneven shares, nothing dropped
        for task, batch in tqdm(mine, desc=f"generating (process {state.process_index})", disable=not args.progress):
            if task.index not in refs_cache:
                refs_cache = {task.index: [[reference_image(p, json_root if json_root.is_dir() else None)
                                            for p in c.references] for c in task.concepts]}
            words = [c.class_word for c in task.concepts]
            prompts = [p for _, p in batch]  # as the template gives them (the final '.' kept)
            lengths = torch.tensor([entity_token_lengths(pipe, p, words) for p in prompts])
            gen = torch.Generator(pipe._execution_device).manual_seed(args.sample_seed)
            images, _ = mip_generate(pipe, adapter, encoder, prompts, refs_cache[task.index], words, scale=scale,
                                     lengths=lengths,
                                     num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                     seed=None, generator=gen, height=args.height, width=args.width, progress=False)
            for (name, _), img in zip(batch, images):
                atomic_save_image(img, root / f"comb_{task.index}" / name)
    state.wait_for_everyone()


def main(argv: Sequence[str] | None = None) -> dict:
    """Score (with --generate: first sample) Concept101 with MIP-Adapter's protocol."""
    return eval_protocol.main(argv, add_generate_args=add_generate_args, generate=generate)
