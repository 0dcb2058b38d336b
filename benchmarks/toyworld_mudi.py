"""MuDI on toy-sdxl (issue 13): two held-out shapes, identity and mixing of a two-subject prompt, base vs method.

Subjects: "olis star" (a yellow star) and "hta heart" (a blue heart), shapes toy-sdxl never saw. Each has 4
training images (large centred / small centred / small left / small right, on green, red, black and purple) with
its exact mask from the scene generator, written as MuDI's metadata.jsonl ("a olis star on a green background").
Training is mudi.train.main, the SDXL trainer with the released code's loss (DCO, beta 1000; LoRA rank 8 on the
UNet attention, lr 1e-2, batch 4, 100 steps, seed 0), twice on the same data: `--segmix_prob 0`
(DreamBooth-LoRA on the two subjects, i.e. MuDI minus Seg-Mix) and with Seg-Mix at the SDXL trainer's default
0.6. Sampling (20 DDIM steps, guidance 4, 32 px) uses the same noise for every condition; the mean-shifted init
is mudi.init (one reference per subject collaged on white in a per-sample random order, VAE-encoded, gamma 3,
added to the first step's input by `MeanShiftInit`). Prompts: "a olis star and a hta heart on a white
background" (LoRAs; the base model with these words draws nothing in particular) and "a yellow star and a blue
heart on a white background" (the base model, colours named: the strict comparison); alone, "a olis star on a
white background" (base: also "a yellow star ...").

Judge (toy-clip, which reads colours 1.000 but shapes poorly, so identity = colour): the left and right 16x32
halves, each centred on a 32x32 canvas of its own background colour, read as the object colour of the best of
the 56 captions "a {colour} circle on a {background} background" (1.000 on renders of the two-subject scene
on white, green, purple and black, and on single subjects; on Seg-Mix composites, whose subjects often cross the
midline, `both` is 0.81-0.84). Per two-subject sample:
- `both`: the halves read as the two subjects' colours, either order (identities present and separate);
- `mixed`: both halves read as the same subject's colour (one identity twice: the failure MuDI targets);
- `dnc`: MuDI's Detect-and-Compare (mudi.dnc.dnc_from_matrices, spectral norm) with the two halves as the
  detections and toy-clip image features; references = each subject's 4 layouts on white.
Single subject: the fraction of whole images read as that subject's colour.

Two toy-world adjustments, both in `train_lora` (mudi/ itself unchanged): toy-sdxl's VAE has factor 2 (32 px <->
16x16 latents) where mudi.data hard-codes SD's 8 (`LATENT_FACTOR`, the Seg-Mix loss-map size), so it is patched
to 2; and the LoRA trains on the VAE posterior's mode, not a sample (toy-sd / toy-sdxl were trained on modes,
and the toy VAE, KL weight 1e-6, has posterior std 0.8 against a latent spread of 2.3: on samples the LoRA
came out worse than the base model on its own training images, 0.20 vs 0.05 epsilon-MSE at t = 100).

Usage: `python benchmarks/toyworld_mudi.py [--steps 100] [--samples 16] [--seeds 0 1] [--train_seed 0]
[--segmix_prob P] [--dco_beta B] [--lr LR] [--rank R]` (one thread; prints the toy-sdxl weights it measured and
every figure the test and the model card use; about 9 minutes on a busy 2-core CPU).
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common.toyworld.scenes import COLORS, Scene, ShapeSpec, render, single_object_scene  # noqa: E402

STEPS, GUIDANCE, SIZE = 20, 4.0, 32
LATENT_FACTOR = 2  # toy VAE: 32 px <-> 16x16
LAYOUTS = (("large", "center"), ("small", "center"), ("small", "left"), ("small", "right"))
BACKGROUNDS = ("green", "red", "black", "purple")
HALF_BOXES = ((0, 0, 16, 32), (16, 0, 32, 32))  # (x0, y0, x1, y1): toy scenes put two objects left and right
JUDGE_TEMPLATE = "a {} circle on a {} background"  # object colour, background colour
TRAIN_LR, TRAIN_RANK, TRAIN_BATCH, TRAIN_STEPS = 1e-2, 8, 4, 100
GAMMA = 3.0
ABBREV = {"red": "r", "green": "g", "blue": "b", "yellow": "y", "purple": "p", "orange": "o", "white": "w",
          "black": "k"}


@dataclass(frozen=True)
class Subject:
    """One personalisation target: metadata id, identifier word, held-out shape, colour."""

    id: str
    word: str
    shape: str
    color: str

    @property
    def phrase(self) -> str:
        return f"{self.word} {self.shape}"


SUBJECTS = (Subject("a", "olis", "star", "yellow"), Subject("b", "hta", "heart", "blue"))


def two_subject_prompt(subjects: Sequence[Subject] = SUBJECTS, *, identifiers: bool = True) -> str:
    """'a olis star and a hta heart on a white background' (toy caption form); without identifiers the base
    model's strict prompt that names the colours: 'a yellow star and a blue heart on a white background'."""
    words = [s.phrase if identifiers else f"{s.color} {s.shape}" for s in subjects]
    return " and ".join(f"a {w}" for w in words) + " on a white background"


def single_prompt(subject: Subject, *, identifier: bool = True) -> str:
    return f"a {subject.phrase if identifier else subject.color + ' ' + subject.shape} on a white background"


# ------------------------------------------------------------------------------------------------------ data


def subject_scenes(subject: Subject, backgrounds: Sequence[str] = BACKGROUNDS) -> list[Scene]:
    return [single_object_scene(subject.shape, subject.color, bg, size=size, position=pos)
            for (size, pos), bg in zip(LAYOUTS, backgrounds)]


def object_mask(scene: Scene) -> Image.Image:
    """The exact mask of the scene's objects as an 8-bit image: 255 inside, 0 outside, the anti-aliased edge in
    between (the objects drawn in toy white on toy black, rescaled to 0..255)."""
    objs = tuple(ShapeSpec(o.shape, "white", o.size, o.center, o.radius, o.position) for o in scene.objects)
    grey = np.asarray(render(Scene(objs, "black")).convert("L"), dtype=np.float64)  # toy white 245, black 15
    lo, hi = COLORS["black"][0], COLORS["white"][0]
    return Image.fromarray(np.rint((grey - lo) * 255 / (hi - lo)).clip(0, 255).astype(np.uint8), "L")


def on_white(scene: Scene) -> Image.Image:
    """The scene's objects on a white background (a segmented reference, as D&C compares crops on white)."""
    return render(Scene(scene.objects, "white"))


def write_instance_dir(folder: Path, subjects: Sequence[Subject] = SUBJECTS,
                       backgrounds: Sequence[str] = BACKGROUNDS) -> Path:
    """MuDI's training folder: images, masks and metadata.jsonl (line 1 maps ids to phrases)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": {s.id: s.phrase for s in subjects}})]
    for s in subjects:
        for k, scene in enumerate(subject_scenes(s, backgrounds)):
            render(scene).save(folder / f"{s.id}{k}.png")
            object_mask(scene).save(folder / f"mask_{s.id}{k}.png")
            lines.append(json.dumps({"id": s.id, "file_name": f"{s.id}{k}.png", "mask_path": f"mask_{s.id}{k}.png",
                                     "text": f"a {s.phrase} on a {scene.background} background"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# -------------------------------------------------------------------------------------------------- training


def _fresh_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_lora(instance_dir: Path, output_dir: Path, *, segmix_prob: float | None, steps: int, seed: int = 0,
               lr: float = TRAIN_LR, rank: int = TRAIN_RANK, extra: Sequence[str] = (), mode_latents: bool = True
               ) -> Path:
    """mudi.train.main on toy-sdxl at 32 px, one thread; `segmix_prob` None = the SDXL trainer's default.

    mudi.data sizes the Seg-Mix loss map with SD's VAE factor 8; toy-sdxl's is 2, so it is patched here."""
    import mudi.data
    import mudi.train
    from common.pipelines.latents import encode_images
    from mudi.train import main

    argv = ["--model", "toy-sdxl", "--instance_data_dir", str(instance_dir), "--resolution", str(SIZE),
            "--train_batch_size", str(TRAIN_BATCH), "--learning_rate", str(lr), "--lr_warmup_steps", "0",
            "--max_train_steps", str(steps), "--rank", str(rank), "--checkpointing_steps", "0",
            "--save_steps", str(10 ** 6), "--dataloader_num_workers", "0", "--report_to", "none",
            "--seed", str(seed), "--output_dir", str(output_dir), *extra]
    if segmix_prob is not None:
        argv += ["--segmix_prob", str(segmix_prob)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    _fresh_accelerate_state()
    try:
        with mock.patch.object(mudi.data, "LATENT_FACTOR", LATENT_FACTOR), \
                mock.patch.object(mudi.train, "encode_images", functools.partial(encode_images, sample=not mode_latents)):
            main(argv)
    finally:
        _fresh_accelerate_state()
        torch.set_num_threads(before)
    return output_dir


def load_with_lora(lora_dir: Path | None):
    """A fresh toy-sdxl pipeline (float32, CPU), with the MuDI LoRA applied when given."""
    from common.models.adapters import apply_adapter
    from common.models.loading import load_pipeline

    pipe = load_pipeline("toy-sdxl")
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        apply_adapter(pipe, lora_dir, kind="lora")
    return pipe


# -------------------------------------------------------------------------------------------------- sampling


def noise(pipe, n: int, seed: int) -> torch.Tensor:
    """x_T of sample i depends only on (seed, i), as common.toyworld.judge.generate_scenes. [n, 4, 16, 16]"""
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    return torch.stack([torch.randn(channels, size, size, generator=torch.Generator().manual_seed(seed * 100_003 + i))
                        for i in range(n)])


def mean_shift(pipe, instance_dir: Path, n: int, seed: int, gamma: float = GAMMA) -> torch.Tensor:
    """gamma * M * z_seg per sample [n, 4, 16, 16]: mudi.init's collage of one reference per subject (image 0),
    in a random order per sample (rng seeded by (seed, i)), VAE-encoded with a seeded posterior draw."""
    from mudi.init import init_collage, mean_shift_latent, subject_from_files
    from mudi.metadata import read_metadata

    meta = read_metadata(instance_dir)
    groups = meta.by_id()
    refs = [subject_from_files(groups[k][0].image, groups[k][0].mask) for k in meta.id_map]
    shifts = []
    for i in range(n):
        result = init_collage([r[0] for r in refs], [r[1] for r in refs], SIZE, SIZE,
                              rng=random.Random(seed * 100_003 + i))
        shifts.append(mean_shift_latent(pipe.vae, result, gamma, factor=LATENT_FACTOR,
                                        generator=torch.Generator().manual_seed(seed * 100_003 + i))[0])
    return torch.stack(shifts)


@torch.no_grad()
def sample(pipe, prompt: str, n: int, seed: int, shift: torch.Tensor | None = None, batch: int = 16
           ) -> list[Image.Image]:
    """n samples of `prompt` through the shared loop (common.pipelines.text2image.generate); `shift` [n, ...]
    adds MuDI's mean-shifted init (mudi.init.MeanShiftInit) on the same x_T."""
    from common.pipelines.text2image import generate
    from mudi.init import MeanShiftInit

    x_T = noise(pipe, n, seed)
    images: list[Image.Image] = []
    for start in range(0, n, batch):
        chunk = slice(start, min(n, start + batch))
        hooks = (MeanShiftInit(shift[chunk], pipe.scheduler),) if shift is not None else ()
        k = chunk.stop - chunk.start
        images += generate(pipe, [prompt] * k, hooks=hooks, latents=x_T[chunk].clone(), num_inference_steps=STEPS,
                           guidance_scale=GUIDANCE, height=SIZE, width=SIZE, output_type="pil", progress=False)
    return images


# ----------------------------------------------------------------------------------------------------- judge


def halves(image: Image.Image) -> list[Image.Image]:
    """The left and right 16x32 halves, each centred on a 32x32 canvas of its outer top corner's colour (the
    background), so toy-clip sees one object on a plain background wherever the object sits vertically."""
    out = []
    for k, box in enumerate(HALF_BOXES):
        half = image.crop(box)
        canvas = Image.new("RGB", (SIZE, SIZE), image.getpixel((0, 0) if k == 0 else (SIZE - 1, 0)))
        canvas.paste(half, ((SIZE - half.width) // 2, 0))
        out.append(canvas)
    return out


def read_colours(clip, images: Sequence[Image.Image]) -> list[str]:
    """toy-clip's reading of each image's object colour: the best of the 56 captions "a {c} circle on a {b}
    background" (c != b), object colour taken (1.000 on renders of the subjects, halves included, on white,
    green, purple and black; a fixed "on a white background" misreads yellow on green as green)."""
    from common.toyworld.judge import read_choice

    pairs = [(c, b) for c in COLORS for b in COLORS if c != b]
    cands = [JUDGE_TEMPLATE.format(c, b) for c, b in pairs]
    picks = read_choice(clip, list(images), [cands] * len(images))
    return [pairs[int(k)][0] for k in picks]


@dataclass
class PairFigures:
    """Two-subject figures over n samples: fractions `both`, `mixed`, mean `dnc`; `pairs`: (left, right) colours."""

    both: float
    mixed: float
    dnc: float
    pairs: list[tuple[str, str]]


def references(clip, subjects: Sequence[Subject] = SUBJECTS) -> list[torch.Tensor]:
    """Per subject: toy-clip features [4, D] of its 4 layouts on white (the segmented references)."""
    return [clip.encode_images([on_white(s) for s in subject_scenes(s)]) for s in subjects]


def judge_pairs(clip, images: Sequence[Image.Image], subjects: Sequence[Subject] = SUBJECTS) -> PairFigures:
    from mudi.dnc import dnc_from_matrices, gt_matrix, similarity_matrix

    crops = [c for img in images for c in halves(img)]
    colours = read_colours(clip, crops)
    pairs = list(zip(colours[0::2], colours[1::2]))
    wanted = sorted(s.color for s in subjects)
    both = [sorted(p) == wanted for p in pairs]
    mixed = [p[0] == p[1] and p[0] in wanted for p in pairs]
    refs = references(clip, subjects)
    gt = gt_matrix(refs)
    feats = clip.encode_images(crops)
    dnc = [dnc_from_matrices(similarity_matrix(feats[2 * i: 2 * i + 2], refs), gt) for i in range(len(images))]
    return PairFigures(float(np.mean(both)), float(np.mean(mixed)), float(np.mean(dnc)), pairs)


def judge_single(clip, images: Sequence[Image.Image], subject: Subject) -> float:
    """Fraction of whole images read as the subject's colour."""
    return float(np.mean([c == subject.color for c in read_colours(clip, images)]))


# ------------------------------------------------------------------------------------------------- measuring


def measure(clip, instance_dir: Path, loras: dict[str, Path], *, samples: int, seeds: Sequence[int],
            full: bool = True) -> dict[str, dict]:
    """{condition: {seed: PairFigures or float}} for every condition the test and the card use.

    "base/plain", "base/meanshift": toy-sdxl, two-subject prompt naming the colours, without / with the
    mean-shifted init; "base/single-a", "base/single-b": each subject alone, colour named; "base-id/single-*":
    toy-sdxl with the identifier prompts (what the LoRA must teach); "<lora>/plain", "<lora>/meanshift",
    "<lora>/single-*": each LoRA with the identifier prompts. Every condition uses the same noise per seed.
    `full=False` (the test) leaves out what no assertion reads: base/meanshift, base/single-*, and the
    mean-shifted init of every LoRA but "mudi"."""
    out: dict[str, dict] = {}

    def pairs(key, pipe, prompt, init):
        out[key] = {}
        for seed in seeds:
            shift = mean_shift(pipe, instance_dir, samples, seed) if init == "meanshift" else None
            out[key][seed] = judge_pairs(clip, sample(pipe, prompt, samples, seed, shift))

    def singles(prefix, pipe, identifier):
        for s in SUBJECTS:
            out[f"{prefix}/single-{s.id}"] = {
                seed: judge_single(clip, sample(pipe, single_prompt(s, identifier=identifier), samples, seed), s)
                for seed in seeds}

    base = load_with_lora(None)
    for init in ("plain", "meanshift") if full else ("plain",):
        pairs(f"base/{init}", base, two_subject_prompt(identifiers=False), init)
    if full:
        singles("base", base, False)
    singles("base-id", base, True)
    for name, path in loras.items():
        pipe = load_with_lora(path)
        for init in ("plain", "meanshift") if full or name == "mudi" else ("plain",):
            pairs(f"{name}/{init}", pipe, two_subject_prompt(), init)
        singles(name, pipe, True)
    return out


def mudi_lines(figures: dict[str, dict], seeds: Sequence[int]) -> list[str]:
    """Metric on the base model vs after the method, one line each (the README / model-card lines)."""
    def pair(key: str, attr: str) -> str:
        return "/".join(f"{getattr(figures[key][s], attr):.2f}" for s in seeds)

    def single(key: str) -> str:
        return "/".join(f"{figures[key][s]:.2f}" for s in seeds)

    lines = []
    for attr, what in (("both", "both subjects' colours, one per half"), ("mixed", "one subject on both halves"),
                       ("dnc", "toy D&C (halves as detections, toy-clip features)")):
        row = [f"base 'a yellow star and a blue heart' {pair('base/plain', attr)}"]
        for name in [k.split("/")[0] for k in figures if k.endswith("/plain") and not k.startswith("base")]:
            row.append(f"{name} {pair(f'{name}/plain', attr)} (+mean-shift {pair(f'{name}/meanshift', attr)})")
        lines.append(f"MuDI toy-sdxl two-subject {what}, seeds {'/'.join(map(str, seeds))}: " + "; ".join(row))
    for s in SUBJECTS:
        row = [f"base '{s.color} {s.shape}' {single(f'base/single-{s.id}')}",
               f"base '{s.phrase}' {single(f'base-id/single-{s.id}')}"]
        row += [f"{k.split('/')[0]} {single(k)}" for k in figures if k.endswith(f"/single-{s.id}")
                and not k.startswith("base")]
        lines.append(f"MuDI toy-sdxl single subject '{s.phrase}' read {s.color}: " + "; ".join(row))
    return lines


def weights_stamp() -> str:
    """The toy-sdxl UNet file's mtime and size (which weights were measured)."""
    from common.toyworld.judge import ASSETS

    f = ASSETS / "toy-sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    st = f.stat()
    return f"{f} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(st.st_mtime))} UTC, {st.st_size} bytes"


def main(argv: Sequence[str] | None = None) -> None:
    import tempfile

    from common.eval.clip import load_clip

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=TRAIN_STEPS, help="training steps of each LoRA")
    p.add_argument("--samples", type=int, default=16, help="samples per condition and noise seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="noise seeds")
    p.add_argument("--train_seed", type=int, default=0, help="training seed (both LoRAs)")
    p.add_argument("--lr", type=float, default=TRAIN_LR, help="LoRA learning rate")
    p.add_argument("--rank", type=int, default=TRAIN_RANK, help="LoRA rank")
    p.add_argument("--segmix_prob", type=float, default=None, help="Seg-Mix probability of the MuDI run "
                   "(default: the SDXL trainer's)")
    p.add_argument("--dco_beta", type=float, default=None, help="DCO beta of both runs (default: the trainer's)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"toy-sdxl weights: {weights_stamp()}")
    extra = ["--dco_beta", str(args.dco_beta)] if args.dco_beta is not None else []
    clip = load_clip("toy-clip")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_instance_dir(Path(tmp) / "data")
        loras = {}
        for name, prob in (("dreambooth-lora", 0.0), ("mudi", args.segmix_prob)):
            t0 = time.time()
            loras[name] = train_lora(data, Path(tmp) / name, segmix_prob=prob, steps=args.steps,
                                     seed=args.train_seed, lr=args.lr, rank=args.rank, extra=extra)
            print(f"trained {name} ({args.steps} steps): {time.time() - t0:.1f} s")
        t0 = time.time()
        figures = measure(clip, data, loras, samples=args.samples, seeds=args.seeds)
        print(f"sampled and judged: {time.time() - t0:.1f} s")
    for key, per_seed in figures.items():
        for seed, fig in per_seed.items():
            if isinstance(fig, PairFigures):
                print(f"{key:28s} seed {seed}: both {fig.both:.3f} mixed {fig.mixed:.3f} dnc {fig.dnc:.3f}  "
                      + " ".join(ABBREV[a] + ABBREV[b] for a, b in fig.pairs))
            else:
                print(f"{key:28s} seed {seed}: read as the subject's colour {fig:.3f}")
    for line in mudi_lines(figures, args.seeds):
        print(line)


if __name__ == "__main__":
    main()
