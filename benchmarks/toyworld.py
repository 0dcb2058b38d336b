"""Toy-world effect numbers (printed, never failing a test run): one line per model / method, base vs after.

- toy-clip zero-shot accuracy (colour, shape) on 400 unseen single-object scenes drawn like the training data,
  and on the 280 large centred held-in scenes (every shape x colour x background): a randomly initialised
  toy-clip (same config, seed 0) vs the trained one.
- toy-sd prompt accuracy: toy-sd samples for held-in prompts, read by toy-clip (colour, shape, both right):
  the same noise with an empty prompt (the unconditional model, so the base) vs with the prompt. The renders
  of the prompts' own scenes give the judge's ceiling.

Usage: `python benchmarks/toyworld.py [--every 4] [--num_inference_steps 20] [--guidance_scale 4]`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.toyworld.judge import (  # noqa: E402
    attribute_accuracy,
    eval_scenes,
    generate_scenes,
    held_in_scenes,
    prompt_scenes,
    toy_clip_extractor,
    weights_available,
)
from common.toyworld.scenes import render  # noqa: E402


def _mean(acc: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: v.float().mean().item() for k, v in acc.items()}


def _fmt(d: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in d.items())


def clip_line() -> None:
    from common.eval.extractor import FeatureExtractor
    from common.toyworld import models
    from common.toyworld.judge import TOY_CLIP_PREPROCESS, _features
    from common.toyworld.data import toy_tokenizer

    trained_clip = toy_clip_extractor()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        rand = models.build_toy_clip().eval()

    def text_fn(texts):
        ids = toy_tokenizer()(texts, padding="longest", return_tensors="pt")
        return rand.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)

    base = FeatureExtractor("toy-clip-random", TOY_CLIP_PREPROCESS,
                            _features(lambda x: rand.get_image_features(pixel_values=x)), _features(text_fn))
    for label, scenes in (("400 unseen training-like scenes", eval_scenes()),
                          ("280 large centred held-in scenes", held_in_scenes())):
        images = [render(s) for s in scenes]
        trained = _mean(attribute_accuracy(trained_clip, images, scenes))
        untrained = _mean(attribute_accuracy(base, images, scenes))
        print(f"toy-clip zero-shot ({label}; chance colour 0.125, shape 0.200): "
              f"random-init {_fmt(untrained)} | trained {_fmt(trained)}")


def sd_line(every: int, steps: int, guidance: float, seed: int) -> None:
    from common.models.loading import load_pipeline

    pipe = load_pipeline("toy-sd")
    pipe.set_progress_bar_config(disable=True)
    judge = toy_clip_extractor()
    scenes = prompt_scenes(every)
    t0 = time.perf_counter()
    images = generate_scenes(pipe, scenes, seed=seed, num_inference_steps=steps, guidance_scale=guidance)
    seconds = time.perf_counter() - t0
    uncond = generate_scenes(pipe, scenes, seed=seed, num_inference_steps=steps, guidance_scale=1.0,
                             prompts=[""] * len(scenes))
    after = _mean(attribute_accuracy(judge, images, scenes))
    base = _mean(attribute_accuracy(judge, uncond, scenes))
    ceiling = _mean(attribute_accuracy(judge, [render(s) for s in scenes], scenes))
    print(f"toy-sd prompt accuracy ({len(scenes)} prompts, {steps} DDIM steps, guidance {guidance}, judged by "
          f"toy-clip): empty prompt {_fmt(base)} | prompted {_fmt(after)} | real renders {_fmt(ceiling)} "
          f"[{seconds / len(scenes):.2f} s/image on {torch.get_num_threads()} threads]")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=int, default=4, help="judge every N-th of the 280 held-in prompts")
    p.add_argument("--num_inference_steps", type=int, default=20, help="DDIM steps per toy-sd sample")
    p.add_argument("--guidance_scale", type=float, default=4.0, help="classifier-free guidance of toy-sd")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the samples")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not weights_available():
        print("toy-world weights missing in assets/toyworld: train them with scripts/train_toyworld.py")
        return
    clip_line()
    sd_line(args.every, args.num_inference_steps, args.guidance_scale, args.seed)


if __name__ == "__main__":
    main()
