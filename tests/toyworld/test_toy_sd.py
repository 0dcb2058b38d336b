"""toy-sd draws the prompt's colour, as toy-clip reads it (the quickstart samples toy-sdxl: test_toy_sdxl.py).

The effect is measured against the same model and noise with an empty prompt: a pipeline that ignored its
text (or a broken text path) scores the same both ways. Floors sit below the accuracy measured on the
committed weights (MODEL_CARD.md, `python benchmarks/toyworld.py`), with a margin.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from common.toyworld.judge import attribute_accuracy, generate_scenes, prompt_scenes
from common.toyworld.scenes import single_object_scene

EVERY = 4  # 70 of the 280 held-in prompts, spread over shapes, colours and backgrounds
STEPS = 20
GUIDANCE = 4.0
# Measured on the committed weights (step 3600; MODEL_CARD.md, benchmarks/toyworld.py, same prompts and seeds):
# colour read right 0.500 (35/70) prompted vs 0.114 (8/70) with the empty prompt; chance 0.125 (step 2000:
# 0.429 vs 0.129). The floors keep a margin of about 9 prompts. Shape is not asserted: toy-clip reads the shape of the prompts'
# own renders at chance (0.200), so it cannot judge toy-sd's shapes (see MODEL_CARD.md, Limits).
COLOR_FLOOR = 0.37
MARGIN_OVER_EMPTY_PROMPT = 0.25


@pytest.mark.slow  # 140 samples: about 10 s on a quiet 2-core CPU, 20-30 s on a busy one
def test_toy_sd_samples_match_their_prompts(toy_sd, toy_clip):
    scenes = prompt_scenes(EVERY)
    prompted = generate_scenes(toy_sd, scenes, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    empty = generate_scenes(toy_sd, scenes, num_inference_steps=STEPS, guidance_scale=1.0, prompts=[""] * len(scenes))
    acc = {k: v.float().mean().item() for k, v in attribute_accuracy(toy_clip, prompted, scenes).items()}
    base = {k: v.float().mean().item() for k, v in attribute_accuracy(toy_clip, empty, scenes).items()}
    assert prompted[0].size == (32, 32)
    assert acc["color"] >= COLOR_FLOOR, acc
    assert acc["color"] - base["color"] >= MARGIN_OVER_EMPTY_PROMPT, (acc, base)


@pytest.mark.xfail(strict=True, reason="toy-sd (step 2000: 0 of 8 seeds read red; step 3600: still "
                   "under 4 of 8) misses the colour of this prompt (MODEL_CARD.md); more training should turn this into a pass")
def test_quickstart_prompt_is_drawn_red(toy_sd, toy_clip):
    scene = single_object_scene("circle", "red", "blue")
    images = generate_scenes(toy_sd, [scene] * 8, num_inference_steps=30, guidance_scale=GUIDANCE,
                             prompts=["a red circle on a blue background"] * 8)
    assert attribute_accuracy(toy_clip, images, [scene] * 8)["color"].float().mean().item() >= 0.5
