"""toy-sd draws what the prompt says, as toy-clip reads it; the quickstart command draws the red circle.

The effect is measured against the same model and noise with an empty prompt: a pipeline that ignored its
text (or a broken text path) scores the same both ways. Floors sit below the accuracy measured on the
committed weights (MODEL_CARD.md, `python benchmarks/toyworld.py`), with a margin.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from common.toyworld.judge import attribute_accuracy, generate_scenes, prompt_scenes
from common.toyworld.scenes import single_object_scene

EVERY = 7  # 40 of the 280 held-in prompts, spread over shapes, colours and backgrounds
STEPS = 20
GUIDANCE = 4.0
# measured on the committed weights (MODEL_CARD.md); the floors keep a margin below
COLOR_FLOOR = 0.50
BOTH_FLOOR = 0.20
MARGIN_OVER_EMPTY_PROMPT = 0.20


def test_toy_sd_samples_match_their_prompts(toy_sd, toy_clip):
    scenes = prompt_scenes(EVERY)
    prompted = generate_scenes(toy_sd, scenes, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    empty = generate_scenes(toy_sd, scenes, num_inference_steps=STEPS, guidance_scale=1.0, prompts=[""] * len(scenes))
    acc = {k: v.float().mean().item() for k, v in attribute_accuracy(toy_clip, prompted, scenes).items()}
    base = {k: v.float().mean().item() for k, v in attribute_accuracy(toy_clip, empty, scenes).items()}
    assert prompted[0].size == (32, 32)
    assert acc["color"] >= COLOR_FLOOR, acc
    assert acc["both"] >= BOTH_FLOOR, acc
    assert acc["color"] - base["color"] >= MARGIN_OVER_EMPTY_PROMPT, (acc, base)


def test_quickstart_command_draws_a_red_circle_on_blue(tmp_path, toy_clip):
    """The README quickstart, run as a user would, writes a 32x32 picture toy-clip reads as the prompt."""
    out = tmp_path / "circle.png"
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "scripts" / "sample.py"), "--model", "toy-sd", "--prompt",
           "a red circle on a blue background", "--guidance_scale", str(GUIDANCE), "--output", str(out)]
    subprocess.run(cmd, check=True, cwd=root, capture_output=True, timeout=300)
    img = Image.open(out).convert("RGB")
    scene = single_object_scene("circle", "red", "blue")
    acc = attribute_accuracy(toy_clip, [img], [scene])
    assert img.size == (32, 32)
    assert acc["color"].item(), "toy-clip does not read the quickstart sample as red"
