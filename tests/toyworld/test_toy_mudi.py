"""MuDI on toy-sdxl: two held-out shapes, identities of a two-subject prompt (the method's effect, issue 13).

Subjects "olis star" (yellow) and "hta heart" (blue): shapes toy-sdxl never saw, 4 images each (4 layouts on
green / red / black / purple) with exact masks from the scene generator, in MuDI's metadata.jsonl. MuDI's real
trainer (mudi.train.main, SDXL path, the released loss: DCO beta 1000; LoRA rank 8 on the UNet attention, lr
1e-2, batch 4, 100 steps, seed 0) runs twice on the same data: `--segmix_prob 0` (DreamBooth-LoRA on both
subjects) and with Seg-Mix (the SDXL trainer's default 0.6). Sampling: 20 DDIM steps, guidance 4, the same noise
per seed for every condition; mean-shifted init = mudi.init (gamma 3, the two references collaged on white).
Judge: toy-clip (colours 1.000, shapes poor, so identity = colour) on the left / right halves (`both`: the two
subjects' colours, one per half; `mixed`: one subject's colour on both halves) and a toy D&C (mudi.dnc, the
halves as detections, toy-clip features). Measurement code and figures: `python benchmarks/toyworld_mudi.py`.
Two toy-world adjustments in its `train_lora` (mudi/ unchanged): mudi.data's latent factor 8 patched to
toy-sdxl's 2, and latents = the toy VAE posterior's mode (toy-sdxl was trained on modes; see the benchmark).

Measured (toy-sdxl UNet of 2026-11-29 19:21 UTC; 16 samples per noise seed 0/1; DB = DreamBooth-LoRA, MS = with
the mean-shifted init):
- alone, read as the subject's colour: "olis star" DB 0.56/0.50, MuDI 0.69/0.44 vs base "olis star" 0.19/0.00
  (base "yellow star" 0.25/0.19); "hta heart" DB 0.12/0.12, MuDI 0.06/0.00 vs base "hta heart" 0.00/0.00 (base
  "blue heart" 0.75/0.88): the star is learned, the heart is not.
- two subjects, `both`: base (colours named) 0.44/0.31; DB 0.19/0.19 (MS 0.19/0.31); MuDI 0.00/0.06 (MS 0.00/0.06).
  `mixed`: base 0.12/0.19; DB 0.19/0.25 (MS 0.25/0.12); MuDI 0.44/0.50 (MS 0.31/0.25), nearly all the star's
  yellow on both halves. Toy D&C: base 0.16/0.25; DB 0.10/0.20 (MS 0.11/0.22); MuDI -0.02/0.02 (MS 0.03/0.10).
- on the first toy-sdxl (18:25 UTC), same recipe: DB star 0.81/0.50, heart 0.56/0.50; `both` base 0.19/0.44, DB
  0.38/0.50, MuDI 0.31/0.06; `mixed` DB 0.06/0.06, MuDI 0.25/0.31; D&C base 0.25/0.32, MuDI 0.09/0.07. Seg-Mix
  raised mixing on both models. Also measured (first model, seed 0, an earlier centre-band crop judge): Seg-Mix
  0.3 instead of 0.6, `both` 0.00, `mixed` 0.31; `--dco_beta 0`: DB `mixed` 0.19, MuDI `both` 0.00.

Asserted: MuDI's trainer teaches the star's colour (DB, "a olis star" alone: >= 0.35 and >= 0.25 above the base
model with the same prompt, every seed; measured margins 0.37/0.50). Strict xfails (not shown at this scale):
the same for the heart; Seg-Mix beating DB on `both` and `mixed`; MuDI's D&C above the base model's; the
mean-shifted init raising MuDI's `both`.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from toy_benchmarks import load_benchmark

SAMPLES = 16  # per condition and noise seed
NOISE_SEEDS = (0, 1)
TRAIN_STEPS = 100




@pytest.fixture(scope="module")
def bench():
    return load_benchmark("mudi")


@pytest.fixture(scope="module")
def instance_dir(bench, tmp_path_factory):
    return bench.write_instance_dir(tmp_path_factory.mktemp("toy_mudi") / "data")


def test_instance_folder_is_mudis_format_with_exact_masks(bench, instance_dir):
    """metadata.jsonl reads back with both ids; each mask's foreground is exactly the subject's colour and its
    background exactly the scene's (anti-aliased edges aside), so Seg-Mix pastes the subject and nothing else."""
    from PIL import Image

    from common.toyworld.scenes import COLORS
    from mudi.metadata import read_metadata

    meta = read_metadata(instance_dir)
    assert meta.id_map == {"a": "olis star", "b": "hta heart"}
    subjects = {s.id: s for s in bench.SUBJECTS}
    assert [r.id for r in meta.records] == ["a"] * 4 + ["b"] * 4
    for r in meta.records:
        img = np.asarray(Image.open(r.image).convert("RGB")).astype(int)
        mask = np.asarray(Image.open(r.mask).convert("L"))
        background = r.text.split(" on a ")[1].split()[0]
        assert r.text == f"a {meta.id_map[r.id]} on a {background} background"
        assert (img[mask == 255] == COLORS[subjects[r.id].color]).all()
        assert (img[mask == 0] == COLORS[background]).all()
        assert (mask == 255).sum() >= 30  # even the small layouts (a small star: 38 px) give Seg-Mix a real subject


def test_judge_reads_two_object_renders_and_segmix_composites(bench, instance_dir, toy_clip):
    """The judge's ceiling. Renders of the two-subject scene (left / right, white background): both colours, in
    either order, 1.000, and a subject on both sides reads `mixed`. Seg-Mix composites (mudi.segmix's SDXL rules:
    1024 canvas, random scales, heights and margins, subjects often crossing the midline; a local rng, so the
    figure does not depend on the global random state) read `both` in most cases."""
    from PIL import Image

    from common.toyworld.scenes import SIZES, Scene, ShapeSpec, render
    from mudi.init import subject_from_files
    from mudi.metadata import read_metadata
    from mudi.segmix import SegMixConfig, collage, crop_subject, max_factor, resize_subject

    def two(c1, c2):
        return render(Scene((ShapeSpec("star", c1, "small", (0.3, 0.5), SIZES["small"], "left"),
                             ShapeSpec("heart", c2, "small", (0.7, 0.5), SIZES["small"], "right")), "white"))

    assert bench.judge_pairs(toy_clip, [two("yellow", "blue"), two("blue", "yellow")]).both == 1.0
    mixed = bench.judge_pairs(toy_clip, [two("yellow", "yellow"), two("blue", "blue")])
    assert mixed.mixed == 1.0 and mixed.both == 0.0
    groups = read_metadata(instance_dir).by_id()
    cfg = SegMixConfig.for_model("sdxl", bench.SIZE)
    rng = random.Random(0)
    composites = []
    for _ in range(32):
        subjects = [crop_subject(*subject_from_files(r.image, r.mask)) for r in (rng.choice(groups["a"]),
                                                                                 rng.choice(groups["b"]))]
        subjects = [resize_subject(s, max_factor(s, cfg.canvas, 2, cfg.margin) * rng.uniform(cfg.scale_low, 1.0))
                    for s in subjects]
        image = collage(subjects, cfg.canvas, cfg.margin_max, rng=rng).image
        composites.append(Image.fromarray(image).resize((bench.SIZE, bench.SIZE), Image.Resampling.BILINEAR))
    assert bench.judge_pairs(toy_clip, composites).both >= COMPOSITE_BOTH_FLOOR


COMPOSITE_BOTH_FLOOR = 0.65  # measured 0.84 / 0.84 / 0.81 (32 composites, rng seeds 0 / 1 / 2)


# ------------------------------------------------------------------------------------------- trained effects


@pytest.fixture(scope="module")
def figures(bench, instance_dir, toy_clip, tmp_path_factory):
    """bench.measure(...) for the base model and both LoRAs: {condition: {noise seed: figures}}."""
    from common.toyworld.judge import ASSETS

    if not (ASSETS / "toy-sdxl" / "model_index.json").is_file():
        pytest.skip("toy-sdxl not exported yet: see assets/toyworld/MODEL_CARD.md")
    out = tmp_path_factory.mktemp("toy_mudi_runs")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loras = {"dreambooth-lora": bench.train_lora(instance_dir, out / "db", segmix_prob=0.0, steps=TRAIN_STEPS),
                 "mudi": bench.train_lora(instance_dir, out / "mudi", segmix_prob=None, steps=TRAIN_STEPS)}
        return bench.measure(toy_clip, instance_dir, loras, samples=SAMPLES, seeds=NOISE_SEEDS, full=False)
    finally:
        torch.set_num_threads(before)


def _per_seed(figures, key, attr=None):
    return [getattr(figures[key][s], attr) if attr else figures[key][s] for s in NOISE_SEEDS]


@pytest.mark.slow  # two 100-step trainings + 320 samples: about 6 minutes of one thread on a busy 2-core CPU
@pytest.mark.parametrize("subject", [
    "a",
    pytest.param("b", marks=pytest.mark.xfail(strict=True, reason="the blue heart is not learned at this scale (the "
                                              "star's colour wins); figures in the module docstring")),
])
def test_mudi_trainer_learns_each_subjects_colour(figures, subject):
    """DreamBooth-LoRA through MuDI's trainer (Seg-Mix off): "a olis star" / "a hta heart" alone come out in the
    subject's colour far more often than from the base model with the same identifier prompt, on every seed."""
    tuned = _per_seed(figures, f"dreambooth-lora/single-{subject}")
    base = _per_seed(figures, f"base-id/single-{subject}")
    assert all(t >= IDENTITY_FLOOR for t in tuned), (tuned, base)
    assert all(t - b >= IDENTITY_MARGIN for t, b in zip(tuned, base)), (tuned, base)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="at toy scale Seg-Mix increases identity mixing instead of removing it "
                   "(the star's yellow takes both halves); figures in the module docstring")
def test_segmix_separates_identities_better_than_dreambooth_lora(figures):
    both = _per_seed(figures, "mudi/plain", "both"), _per_seed(figures, "dreambooth-lora/plain", "both")
    mixed = _per_seed(figures, "mudi/plain", "mixed"), _per_seed(figures, "dreambooth-lora/plain", "mixed")
    assert all(m > d for m, d in zip(*both)), both
    assert all(m < d for m, d in zip(*mixed)), mixed


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="at toy scale MuDI's toy D&C stays below the base model's (colours named "
                   "in the prompt); figures in the module docstring")
def test_mudi_dnc_above_base_model(figures):
    mudi = _per_seed(figures, "mudi/meanshift", "dnc")
    base = _per_seed(figures, "base/plain", "dnc")
    assert all(m > b for m, b in zip(mudi, base)), (mudi, base)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="at toy scale the mean-shifted init does not raise `both` on every seed; "
                   "figures in the module docstring")
def test_mean_shift_init_raises_both_subjects(figures):
    on = _per_seed(figures, "mudi/meanshift", "both")
    off = _per_seed(figures, "mudi/plain", "both")
    assert all(a > b for a, b in zip(on, off)), (on, off)


IDENTITY_FLOOR = 0.35
IDENTITY_MARGIN = 0.25
