"""Custom Diffusion on toy-sd learns a held-out shape from 4 images (the method's effect, issue 13).

toy-sd never saw a star. Custom Diffusion (customdiffusion.train.main: cross-attention K/V + the "<new1>" row)
trains on 4 renders of a yellow star on purple (`concept_scenes`); then toy-CLIP-I (common.eval.clip.clip_i,
toy-clip through `load_clip("toy-clip")`) of "<new1>" samples to the references is compared with the base
model's samples for the same prompt without the concept, on the same noise. Two baselines: the prompt minus the
token ("a star on a purple background") and, stricter, the prompt that also names the colour ("a yellow star
...": the text alone already describes the references as far as toy-sd can draw them).

Measured (toy-sd step 3600, training seed 0, 16 samples per noise seed 0/1/2; `python benchmarks/toyworld.py`):
toy-CLIP-I '<new1> star' 0.250/0.183/0.166 vs base 'star' -0.076/-0.133/-0.198 and base 'yellow star'
-0.005/-0.046/-0.080: margins >= 0.32 and >= 0.23 on every seed. On the step-2000 weights, training seeds 0 and 1
x noise seeds 0/1/2 gave margins over 'yellow star' of 0.11 to 0.22 (over 'star' >= 0.21). Floors below: 0.15
over 'star', 0.10 over 'yellow star', on noise seeds 0 and 1.

Not shown at this scale: "a green <new1> star" is read green in 0.31/0.25/0.38 of samples vs 0.38/0.44/0.69 for
the base model's "a green star" (step 3600; the concept's yellow overrides the colour word after 60 steps). At
step 2000 the tuned model won (0.44-0.94 vs 0.13-0.38), so the step-3600 weights reverse it; kept as a strict
xfail that a better model or recipe should turn into a pass.
"""
from __future__ import annotations

import pytest

from common.eval.clip import clip_i
from common.toyworld.judge import attribute_accuracy, concept_scenes, generate_scenes
from common.toyworld.scenes import render, single_object_scene

SHAPE, COLOR, BACKGROUND = "star", "yellow", "purple"
PROMPT = f"a <new1> {SHAPE} on a {BACKGROUND} background"
STEPS = 60  # batch 4 at 32 px, lr 2e-3, no resize augmentation: about 8 s of one thread on a quiet CPU
SAMPLES = 16  # per prompt and noise seed
NOISE_SEEDS = (0, 1)
MARGIN_OVER_PLAIN = 0.15
MARGIN_OVER_COLOUR = 0.10


def _fresh_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def concept(toy_clip, tmp_path_factory):
    """(base toy-sd, toy-sd with the trained "<new1>" star, the 4 reference images)."""
    import torch

    from common.models.loading import load_pipeline
    from customdiffusion.apply import apply_customdiffusion
    from customdiffusion.train import main

    out = tmp_path_factory.mktemp("toy_cd")
    references = [render(s) for s in concept_scenes(SHAPE, COLOR, BACKGROUND)]
    folder = out / "instances"
    folder.mkdir()
    for i, img in enumerate(references):
        img.save(folder / f"{i}.png")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    _fresh_accelerate_state()
    try:
        main(["--model", "toy-sd", "--instance_data_dir", str(folder), "--instance_prompt", PROMPT,
              "--modifier_token", "<new1>", "--resolution", "32", "--train_batch_size", "4", "--noaug",
              "--learning_rate", "2e-3", "--lr_warmup_steps", "0", "--max_train_steps", str(STEPS),
              "--checkpointing_steps", "0", "--dataloader_num_workers", "0", "--report_to", "none", "--seed", "0",
              "--output_dir", str(out / "concept")])
    finally:
        _fresh_accelerate_state()
        torch.set_num_threads(before)
    base, tuned = load_pipeline("toy-sd"), load_pipeline("toy-sd")
    for pipe in (base, tuned):
        pipe.set_progress_bar_config(disable=True)
    assert apply_customdiffusion(tuned, out / "concept") == ["<new1>"]
    return base, tuned, references


@pytest.mark.slow  # 60 training steps + 96 samples: about 30 s on one quiet thread
def test_custom_diffusion_raises_toy_clip_i_to_a_held_out_star(concept, toy_clip):
    base, tuned, references = concept
    ref = toy_clip.encode_images(references)
    scene = single_object_scene(SHAPE, COLOR, BACKGROUND)

    def score(pipe, prompt, seed):
        images = generate_scenes(pipe, [scene] * SAMPLES, seed=seed, prompts=[prompt] * SAMPLES)
        return clip_i(toy_clip.encode_images(images), ref).mean().item()

    for seed in NOISE_SEEDS:
        tuned_i = score(tuned, PROMPT, seed)
        plain = score(base, f"a {SHAPE} on a {BACKGROUND} background", seed)
        colour = score(base, f"a {COLOR} {SHAPE} on a {BACKGROUND} background", seed)
        assert tuned_i - plain >= MARGIN_OVER_PLAIN, (seed, tuned_i, plain)
        assert tuned_i - colour >= MARGIN_OVER_COLOUR, (seed, tuned_i, colour)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="at toy scale the learned star's yellow overrides 'green' (step 3600: read "
                   "green 0.31/0.25 vs 0.38/0.44 for the base 'a green star', noise seeds 0/1); see the docstring")
def test_green_new1_comes_out_green(concept, toy_clip):
    base, tuned, _ = concept
    green = single_object_scene(SHAPE, "green", BACKGROUND)

    def green_rate(pipe, prompt, seed):
        images = generate_scenes(pipe, [green] * SAMPLES, seed=seed, prompts=[prompt] * SAMPLES)
        return attribute_accuracy(toy_clip, images, [green] * SAMPLES, shapes=(SHAPE,))["color"].float().mean().item()

    for seed in NOISE_SEEDS:
        tuned_g = green_rate(tuned, f"a green <new1> {SHAPE} on a {BACKGROUND} background", seed)
        base_g = green_rate(base, f"a green {SHAPE} on a {BACKGROUND} background", seed)
        assert tuned_g > base_g, (seed, tuned_g, base_g)
