"""Our shared loop vs diffusers' own pipeline call on the same tiny model, seed and steps.

Prints one line per model: our time, diffusers' time, the ratio (target <= 1.03) and the max abs
difference of the images (should be 0). Both run in this process, interleaved, best of --repeats.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common.models.loading import load_pipeline
from common.pipelines.text2image import generate


def _time(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-sdxl", "tiny-flux", "tiny-if"])
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per call")
    parser.add_argument("--repeats", type=int, default=5, help="best of N calls")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"device={args.device} steps={args.steps} repeats={args.repeats}")
    print(f"{'model':<12}{'ours_s':>10}{'diffusers_s':>13}{'ratio':>8}{'max_abs_diff':>14}")
    for name in args.models:
        pipe = load_pipeline(name, device=args.device)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=args.steps, guidance_scale=5.0)
        extra = {"clean_caption": False} if name == "tiny-if" else {}
        if name == "tiny-flux":
            kw["max_sequence_length"] = 77
        gen = lambda: torch.Generator(args.device).manual_seed(0)
        ours = lambda: generate(pipe, "a photo of a dog", generator=gen(), output_type="np", progress=False, **kw)
        theirs = lambda: pipe("a photo of a dog", generator=gen(), output_type="np", **kw, **extra).images
        _time(ours, 1), _time(theirs, 1)  # warm-up
        t_ours = t_theirs = float("inf")
        for _ in range(args.repeats):  # interleave so background load hits both alike
            a, img_ours = _time(ours, 1)
            b, img_theirs = _time(theirs, 1)
            t_ours, t_theirs = min(t_ours, a), min(t_theirs, b)
        diff = float(np.abs(img_ours - img_theirs).max())
        print(f"{name:<12}{t_ours:>10.4f}{t_theirs:>13.4f}{t_ours / t_theirs:>8.3f}{diff:>14.2e}")


if __name__ == "__main__":
    main()
