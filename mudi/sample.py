"""MuDI sampling: a trained Seg-Mix LoRA on SDXL with mean-shifted initialisation (spec §1.4), or on FLUX plainly.

The subjects of the init collage are the ids whose placeholder phrase (metadata.jsonl line 1) appears in the
prompt, in prompt order, one reference image (+ mask) each. `--gamma 0` (or no --instance_data_dir) samples
plainly; FLUX always does (the original's FLUX pipeline has no init). Other adapters stack through --adapters.
Writes <output_dir>/<prompt slug>_<i>.png, a grid per prompt, the init collage and prompts.json (image -> prompt).
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from common.cli import ArgumentParser, ModelConfig, SamplingConfig, add_model_args, add_sampling_args, parse_args
from common.cli import positive_int
from common.errors import UsageError

#: The negative prompt of the original's sampling helper (utils/pipe.py gen_pipe.sample) and generate_prior.py.
NEGATIVE = "anime, cartoon, graphic, text, painting, crayon, graphite, abstract glitch, blurry"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Sample a MuDI LoRA (SDXL: mean-shifted init; FLUX: plain).")
    add_model_args(p, default="sdxl")
    add_sampling_args(p, num_inference_steps=50, guidance_scale=None, negative_prompt=NEGATIVE)
    p.add_argument("--lora", "--lora_path", dest="lora", default=None,
                   help="MuDI output folder (or save-N folder) with pytorch_lora_weights.safetensors")
    p.add_argument("--lora_scale", type=float, default=1.0, help="LoRA weight")
    p.add_argument("--from_file", default=None, help="text file with one prompt per line (instead of --prompt)")
    p.add_argument("--num_images", type=positive_int, default=4, help="images per prompt")
    p.add_argument("--instance_data_dir", default=None,
                   help="the training folder (metadata.jsonl + images + masks): references of the init collage")
    p.add_argument("--gamma", type=float, default=3.0, help="mean-shift strength (0: plain sampling; SDXL only)")
    p.add_argument("--init_image_index", type=int, default=0, help="which image of each subject goes in the collage")
    p.add_argument("--init_seed", type=int, default=None, help="seed of the collage layout (default: --seed)")
    p.add_argument("--output_dir", default="outputs/mudi", help="folder for the images, grids and collages")
    p.add_argument("--overwrite", action="store_true", help="replace images already in --output_dir (else refused)")
    return p


def prompt_subjects(prompt: str, id_map: dict[str, str]) -> list[str]:
    """Ids whose phrase occurs in `prompt`, in order of appearance."""
    found = [(prompt.find(phrase), key) for key, phrase in id_map.items() if phrase in prompt]
    return [key for _, key in sorted(found)]


def slug(prompt: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:80] or "prompt"


def grid(images: list, cols: int | None = None):
    from PIL import Image

    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for k, img in enumerate(images):
        sheet.paste(img, ((k % cols) * w, (k // cols) * h))
    return sheet


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(build_parser(), argv)
    model, sampling = ModelConfig.from_args(args), SamplingConfig.from_args(args)
    if args.from_file:
        try:
            prompts = [s.strip() for s in Path(args.from_file).read_text(encoding="utf-8").splitlines() if s.strip()]
        except OSError as e:
            raise UsageError(f"cannot read --from_file {args.from_file}: {e.strerror}") from None
    else:
        prompts = [sampling.prompt] if sampling.prompt else []
    if not prompts:
        raise UsageError('no prompt: pass --prompt "a olis toy and a hta dog ..." or --from_file')
    if args.gamma < 0:
        raise UsageError(f"--gamma must be >= 0, got {args.gamma}")
    targets = [Path(args.output_dir) / f"{slug(q)}_{i}.png" for q in prompts for i in range(args.num_images)]
    existing = [t for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{existing[0]} exists ({len(existing)} of the outputs do); pass --overwrite or another "
                         "--output_dir")
    from common.io import check_writable

    check_writable(targets[0])
    meta = None
    if args.instance_data_dir and args.gamma > 0:
        from mudi.metadata import read_metadata

        meta = read_metadata(args.instance_data_dir)
        _check_references(args, meta)
    return _sample(args, model, sampling, prompts, meta)


def _check_references(args, meta) -> None:
    """The collage's folder must be the LoRA's training folder (same subjects, per `mudi_config.json`) and hold
    an image `--init_image_index` of every subject; refused before any model loads."""
    trained = Path(args.lora) / "mudi_config.json" if args.lora else None
    if trained is not None and trained.is_file():
        try:
            id_map = json.loads(trained.read_text(encoding="utf-8")).get("id_map")
        except (OSError, ValueError, AttributeError):
            id_map = None
        if isinstance(id_map, dict) and id_map != meta.id_map:
            raise UsageError(f"--instance_data_dir {args.instance_data_dir} has {len(meta.id_map)} subject(s) "
                             f"({', '.join(meta.id_map.values())}) but --lora {args.lora} was trained on "
                             f"{len(id_map)} ({', '.join(map(str, id_map.values()))}); pass its training folder")
    if args.init_image_index < 0:
        raise UsageError(f"--init_image_index must be >= 0, got {args.init_image_index}")
    for key, records in meta.by_id().items():
        if records and args.init_image_index >= len(records):
            raise UsageError(f"--init_image_index {args.init_image_index} but subject {key} "
                             f"({meta.id_map.get(key, key)}) has {len(records)} image(s)")


def _init_hook(pipe, meta, prompt: str, args, height: int, width: int):
    """The mean-shift hook for `prompt` and its collage image (None, None when fewer than two subjects are named).
    Nothing is written here, so a bad reference image or mask fails before the output folder exists."""
    import numpy as np
    import torch
    from PIL import Image

    from mudi.init import MeanShiftInit, init_collage, mean_shift_latent, subject_from_files

    ids = prompt_subjects(prompt, meta.id_map)
    if len(ids) < 2:
        print(f"mean-shift init skipped for {prompt!r}: it names {len(ids)} subject phrase(s) of "
              f"{', '.join(meta.id_map.values())}")
        return None, None
    groups = meta.by_id()
    refs = []
    for key in ids:
        records = groups.get(key) or []
        if not records:
            raise UsageError(f"no image of id {key} in {meta.folder}")
        rec = records[min(args.init_image_index, len(records) - 1)]
        refs.append(subject_from_files(rec.image, rec.mask))
    seed = args.seed if args.init_seed is None else args.init_seed
    result = init_collage([r[0] for r in refs], [r[1] for r in refs], height, width, rng=random.Random(seed))
    collage = Image.fromarray(np.ascontiguousarray(result.image))
    shift = mean_shift_latent(pipe.vae, result, args.gamma, generator=torch.Generator(pipe.device).manual_seed(seed),
                              factor=pipe.vae_scale_factor)
    return MeanShiftInit(shift.to(pipe.unet.dtype), pipe.scheduler), collage


def _record_prompts(path: Path, entries: dict[str, str]) -> None:
    """Merge image name -> prompt into `prompts.json` (what eval_mudi.py reads for CLIP-T), rewritten atomically
    after every prompt so that no finished image lacks its prompt."""
    from common.io import atomic_write_json

    table = {}
    if path.is_file():
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            table = {}
    atomic_write_json(path, {**(table if isinstance(table, dict) else {}), **entries})


def _sample(args, model: ModelConfig, sampling: SamplingConfig, prompts: list[str], meta) -> list[Path]:
    import torch
    from tqdm.auto import tqdm

    from common.io import atomic_save_image
    from common.models.adapters import apply_adapter, apply_adapters
    from common.models.loading import load_pipeline, pipeline_family
    from common.pipelines.text2image import default_size, generate

    pipe = load_pipeline(model.pretrained_model_name_or_path, torch_dtype=model.torch_dtype, device=model.device,
                         revision=model.revision, variant=model.variant)
    pipe.set_progress_bar_config(disable=True)
    family = pipeline_family(pipe)
    if family not in ("sdxl", "flux"):
        raise UsageError(f"MuDI samples SDXL or FLUX, not a {family} pipeline")
    sampling.check_size(16 if family == "flux" else 8)
    if args.lora:
        apply_adapter(pipe, args.lora, kind="lora", scale=args.lora_scale)
    apply_adapters(pipe, model.adapters)
    dh, dw = default_size(pipe)
    height, width = sampling.height or dh, sampling.width or dw
    if family == "flux" and meta is not None:
        print("FLUX samples without the mean-shifted init (as the original)")
    inits = {q: _init_hook(pipe, meta, q, args, height, width) if family == "sdxl" and meta is not None
             else (None, None) for q in prompts}  # every reference read before anything is written
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for prompt in prompts:
        hook, collage = inits[prompt]
        hooks = (hook,) if hook is not None else ()
        if collage is not None:
            atomic_save_image(collage, out / f"{slug(prompt)}_init.png")
        images = []
        for i in tqdm(range(args.num_images), desc=f"sampling {slug(prompt)[:30]}", leave=False):
            generator = torch.Generator(model.device).manual_seed(sampling.seed + i)
            images += generate(pipe, prompt, sampling.negative_prompt or None, hooks=hooks,
                               num_inference_steps=sampling.num_inference_steps,
                               guidance_scale=sampling.guidance_scale, height=height, width=width, eta=sampling.eta,
                               generator=generator, output_type="pil", progress=False)
        for i, image in enumerate(images):
            path = out / f"{slug(prompt)}_{i}.png"
            atomic_save_image(image, path)
            written.append(path)
        atomic_save_image(grid(images), out / f"{slug(prompt)}_grid.png")
        _record_prompts(out / "prompts.json", {p.name: prompt for p in written[-len(images):]})
        print(f"wrote {len(images)} images of {prompt!r} to {out}")
    return written
