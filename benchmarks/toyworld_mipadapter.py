"""MIP-Adapter on toy-sdxl (issue 13 point 6): does each reference's colour go to its own entity?

Setup: the toy IP-Adapter (assets/toyworld/toy-ip-adapter, trained by `common.toyworld.ip_adapter` on
single-object scenes whose captions drop the colour word, references = the object large on white; encoder =
toy-clip's vision tower) on toy-sdxl. Prompt "a circle and a square on a white background" (toy-sdxl's
two-object scenes put the first-named object on the left); object 1 = a reference of a `c1` circle with entity
word "circle", object 2 = a `c2` square with word "square". Four conditions, the same noise per sample:

- mip: MIP-Adapter's merge (`mipadapter.processor`, K = 2; each reference its own softmax, weighted per
  position by where its entity word attends); the gate `text_to_weight` is zero (no MIP training at toy scale:
  the merge alone, on the IP-Adapter it starts from);
- masked: the same merge with the user-region extension (`MIPState.masks`): reference 1 on the left half of
  the latent, reference 2 on the right, multiplied into the word weights -- a control that gives the merge the
  routing the entity words should give;
- concat: the plain multi-image IP-Adapter: both references' 8 tokens in one softmax, no entity routing
  (the same processor with K = 1 and the two token sets concatenated = diffusers' multi-image IP-Adapter);
- none: no reference (the text branch only: the prompt names no colour).

A routing line reports where MIP-Adapter's word weights send reference 1 (`routing_contrast`).

Judge: toy-clip reads the colour of each half (the 16x32 half stretched to 32x32, candidates "a {c} {shape} on
a white background" over the 8 colours). Rates over samples: left = the left half reads c1, right = the right
half reads c2, both = both, swapped = left c2 and right c1. The colour pair is run in both orders (red/green and
green/red), so a colour preference of the model cannot pass for routing.

Usage: `python benchmarks/toyworld_mipadapter.py [--samples 32] [--seeds 0 1] [--scale 1.0] [--steps 20]
[--guidance 4.0]` (one thread; prints the weights measured and every figure the test and the model card use).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common.toyworld.judge import ASSETS  # noqa: E402
from common.toyworld.scenes import COLORS, IMAGE_SIZE, render, single_object_scene  # noqa: E402

ASSETS_SDXL = ASSETS / "toy-sdxl"

PROMPT = "a circle and a square on a white background"
SHAPES = ("circle", "square")  # object 1 (left in toy-sdxl's two-object scenes), object 2
WORDS = SHAPES  # their entity words
PAIRS = (("red", "green"), ("green", "red"))
STEPS, GUIDANCE, SCALE = 20, 4.0, 1.0
CONDITIONS = ("mip", "masked", "concat", "none")


# -------------------------------------------------------------------------------------------------- models


def load_models(ip_folder: str | Path | None = None) -> dict[str, Any]:
    """toy-sdxl, the toy encoder, toy-clip's judge and the toy IP-Adapter installed as a MIP-Adapter with a zero
    gate (MIPAdapter: K = 1 with zero gate is exactly IP-Adapter)."""
    from common.eval.clip import load_clip
    from common.models.loading import load_pipeline
    from common.toyworld.ip_adapter import TOY_IP_ADAPTER_DIR, load_toy_ip_adapter_state, toy_image_encoder
    from mipadapter.model import MIPAdapter

    pipe = load_pipeline("toy-sdxl")
    pipe.set_progress_bar_config(disable=True)
    folder = Path(ip_folder or TOY_IP_ADAPTER_DIR)
    adapter = MIPAdapter(pipe.unet, load_toy_ip_adapter_state(folder), source=str(folder), require_gate=False,
                         zero_gate=True)
    return {"pipe": pipe, "adapter": adapter, "encoder": toy_image_encoder(), "judge": load_clip("toy-clip")}


def reference_images(c1: str, c2: str) -> list[Image.Image]:
    from common.toyworld.ip_adapter import reference_scene

    return [render(reference_scene(SHAPES[0], c1)), render(reference_scene(SHAPES[1], c2))]


@torch.no_grad()
def states(models: dict[str, Any], references: Sequence[Image.Image], batch: int, scale: float) -> dict[str, Any]:
    """The per-call MIPState of each condition for `batch` positive rows (None: no reference)."""
    from mipadapter.pipeline import build_state
    from mipadapter.processor import MIPState

    pipe, adapter, encoder = models["pipe"], models["adapter"], models["encoder"]
    mip = build_state(pipe, adapter, encoder, [[r] for r in references], WORDS, batch=batch, scale=scale)
    size = pipe.unet.config.sample_size
    masks = torch.zeros(2, size, size)
    masks[0, :, : size // 2], masks[1, :, size // 2:] = 1, 1  # object 1 on the left half, object 2 on the right
    masked = build_state(pipe, adapter, encoder, [[r] for r in references], WORDS, batch=batch, scale=scale,
                         masks=masks, latent_hw=(size, size))
    concat = MIPState(mip.tokens.flatten(1, 2)[:, None], mip.entity_embeds[:, :1], mip.entity_lengths[:, :1],
                      negative_tokens=mip.negative_tokens.flatten(1, 2)[:, None],
                      negative_entity_embeds=mip.negative_entity_embeds[:, :1], scale=scale)
    return {"mip": mip, "masked": masked, "concat": concat, "none": None}


@torch.no_grad()
def sample(pipe: Any, state: Any, n: int, seed: int, *, steps: int = STEPS, guidance: float = GUIDANCE,
           prompt: str = PROMPT) -> list[Image.Image]:
    """`n` samples of `prompt`; sample i's noise depends only on (seed, i), as common.toyworld.judge's."""
    from mipadapter.processor import STATE_KEY

    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    latents = torch.stack([torch.randn(channels, size, size,
                                       generator=torch.Generator().manual_seed(seed * 100_003 + i)) for i in range(n)])
    kwargs = {} if state is None else {"cross_attention_kwargs": {STATE_KEY: state}}
    return pipe([prompt] * n, latents=latents, num_inference_steps=steps, guidance_scale=guidance, **kwargs).images


@torch.no_grad()
def routing_contrast(models: dict[str, Any], c1: str = "red", c2: str = "green", n: int = 8, seed: int = 0,
                     scale: float = SCALE) -> dict[str, float]:
    """Where MIP-Adapter sends reference 1 ("circle"): its weight w^1 averaged over the left half minus over the
    right half, per sample, every layer and step (conditional rows). "mean": that difference averaged (1 = all
    of reference 1 on the left, 0 = no preference); "abs": the mean |difference| (a per-sample split that
    varies in direction); "spread": mean |w^1 - 0.5| over positions (0 = the maps do not tell the words apart)."""
    st = states(models, reference_images(c1, c2), n, scale)["mip"]
    st.debug = {}
    sample(models["pipe"], st, n, seed)
    diffs, spread = [], []
    for recs in st.debug.values():
        for rec in recs:
            w = rec["w"][-n:, 0].float()  # [n, N] weight of reference 1, positive rows
            side = int(round(w.shape[-1] ** 0.5))
            grid = w.view(n, side, side)
            diffs.append(grid[:, :, : side // 2].mean((1, 2)) - grid[:, :, side // 2:].mean((1, 2)))
            spread.append((w - 0.5).abs().mean(1))
    d = torch.stack(diffs)
    return {"mean": d.mean().item(), "abs": d.abs().mean().item(), "spread": torch.stack(spread).mean().item()}


# ---------------------------------------------------------------------------------------------------- judge


def halves(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Left and right halves, each stretched back to 32x32 (toy-clip's input)."""
    w, h = image.size
    return (image.crop((0, 0, w // 2, h)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR),
            image.crop((w // 2, 0, w, h)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))


def read_half_colours(judge: Any, images: Sequence[Image.Image]) -> tuple[list[str], list[str]]:
    """toy-clip's colour reading of each image's left half (as the circle) and right half (as the square)."""
    from common.toyworld.judge import colour_candidates, read_choice

    colours = list(COLORS)
    out = []
    for k, shape in enumerate(SHAPES):
        crops = [halves(im)[k] for im in images]
        cands = colour_candidates(single_object_scene(shape, "red", "white"))
        out.append([colours[i] for i in read_choice(judge, crops, [cands] * len(crops)).tolist()])
    return out[0], out[1]


def rates(left: Sequence[str], right: Sequence[str], c1: str, c2: str) -> dict[str, float]:
    n = len(left)
    return {"left": sum(a == c1 for a in left) / n, "right": sum(b == c2 for b in right) / n,
            "both": sum(a == c1 and b == c2 for a, b in zip(left, right)) / n,
            "swapped": sum(a == c2 and b == c1 for a, b in zip(left, right)) / n}


def judge_ceiling(judge: Any) -> float:
    """The judge on rendered truth: every ordered pair of non-white colours as a small left circle and a small
    right square on white; fraction of halves read right."""
    from common.toyworld.scenes import POSITIONS, SIZES, Scene, ShapeSpec

    scenes = []
    for c1 in COLORS:
        for c2 in COLORS:
            if c1 != c2 and "white" not in (c1, c2):
                objs = (ShapeSpec(SHAPES[0], c1, "small", POSITIONS["left"], SIZES["small"], "left"),
                        ShapeSpec(SHAPES[1], c2, "small", POSITIONS["right"], SIZES["small"], "right"))
                scenes.append(Scene(objs, "white"))
    left, right = read_half_colours(judge, [render(s) for s in scenes])
    ok = sum(a == s.objects[0].color for a, s in zip(left, scenes)) + sum(b == s.objects[1].color
                                                                          for b, s in zip(right, scenes))
    return ok / (2 * len(scenes))


# ---------------------------------------------------------------------------------------------------- lines


SINGLE_COLOURS = ("red", "green", "yellow", "purple", "orange", "black")
SINGLE_BACKGROUNDS = ("white", "blue")


@torch.no_grad()
def single_object_rates(models: dict[str, Any], samples: int = 8, seed: int = 0, scale: float = SCALE
                        ) -> tuple[float, float]:
    """The toy IP-Adapter alone (K = 1): "a circle on a {background} background" with a reference circle of each
    colour; (rate read as the reference's colour, same rate with no reference) over colours x backgrounds x
    `samples` (same noise)."""
    from common.toyworld.ip_adapter import reference_scene
    from common.toyworld.judge import colour_candidates, read_choice
    from mipadapter.pipeline import build_state

    colours = list(COLORS)
    hits, total = {"ref": 0, "none": 0}, 0
    for background in SINGLE_BACKGROUNDS:
        for colour in SINGLE_COLOURS:
            state = build_state(models["pipe"], models["adapter"], models["encoder"],
                                [[render(reference_scene("circle", colour))]], ["circle"], batch=samples, scale=scale)
            candidates = colour_candidates(single_object_scene("circle", colour, background))
            for cond, st in (("ref", state), ("none", None)):
                images = sample(models["pipe"], st, samples, seed, prompt=f"a circle on a {background} background")
                read = read_choice(models["judge"], images, [candidates] * samples).tolist()
                hits[cond] += sum(colours[i] == colour for i in read)
            total += samples
    return hits["ref"] / total, hits["none"] / total


def measure(models: dict[str, Any], *, samples: int = 32, seeds: Sequence[int] = (0,), scale: float = SCALE,
            steps: int = STEPS, guidance: float = GUIDANCE, pairs: Sequence[tuple[str, str]] = PAIRS,
            conditions: Sequence[str] = CONDITIONS) -> dict[tuple[str, str, int, str], dict[str, float]]:
    """{(c1, c2, seed, condition): rates} for every colour pair, noise seed and condition (same noise)."""
    out = {}
    for c1, c2 in pairs:
        st = states(models, reference_images(c1, c2), samples, scale)
        for seed in seeds:
            for cond in conditions:
                images = sample(models["pipe"], st[cond], samples, seed, steps=steps, guidance=guidance)
                out[(c1, c2, seed, cond)] = rates(*read_half_colours(models["judge"], images), c1, c2)
    return out


def mipadapter_lines(results: dict[tuple[str, str, int, str], dict[str, float]] | None = None, **kwargs: Any
                     ) -> list[str]:
    """One line per (colour pair, noise seed): both-right rate (left / right) per condition; then the means."""
    if results is None:
        results = measure(load_models(), **kwargs)
    lines = []
    keys = sorted({k[:3] for k in results}, key=lambda k: (PAIRS.index(k[:2]) if k[:2] in PAIRS else 9, k[2]))
    for c1, c2, seed in keys:
        parts = []
        for cond in [c for c in CONDITIONS if (c1, c2, seed, c) in results]:
            r = results[(c1, c2, seed, cond)]
            parts.append(f"{cond} {r['both']:.3f} ({r['left']:.2f}/{r['right']:.2f}, swapped {r['swapped']:.2f})")
        lines.append(f"MIP-Adapter toy-sdxl, {c1} circle + {c2} square, noise seed {seed}: both right "
                     + "; ".join(parts))
    mean = {cond: sum(r["both"] for k, r in results.items() if k[3] == cond) / len(keys)
            for cond in CONDITIONS if any(k[3] == cond for k in results)}
    lines.append("MIP-Adapter toy-sdxl, mean both-right over pairs and seeds: "
                 + ", ".join(f"{c} {v:.3f}" for c, v in mean.items()))
    return lines


def weights_line(ip_folder: str | Path | None = None) -> str:
    """When the measured weights were written (toy-sdxl's UNet, the toy IP-Adapter)."""
    from common.toyworld.ip_adapter import TOY_IP_ADAPTER_DIR, WEIGHTS

    unet = ASSETS_SDXL / "unet" / "diffusion_pytorch_model.safetensors"
    ip = Path(ip_folder or TOY_IP_ADAPTER_DIR) / WEIGHTS

    def stamp(p: Path) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(p.stat().st_mtime)) if p.exists() else "missing"

    return f"weights: toy-sdxl unet {stamp(unet)}; toy IP-Adapter {stamp(ip)}"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=32, help="samples per colour pair, noise seed and condition")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="noise seeds")
    p.add_argument("--scale", type=float, default=SCALE, help="IP-Adapter / MIP-Adapter scale λ")
    p.add_argument("--steps", type=int, default=STEPS, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--ip_adapter", default=None, help="toy IP-Adapter folder (default assets/toyworld/toy-ip-adapter)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    models = load_models(a.ip_adapter)
    print(weights_line(a.ip_adapter))
    ceiling = judge_ceiling(models["judge"])
    print(f"judge ceiling (rendered two-object scenes on white, halves read right): {ceiling:.3f}")
    ref, none = single_object_rates(models, scale=a.scale)
    print(f"toy IP-Adapter, one object ('a circle on a white/blue background', 6 reference colours x 8 samples): "
          f"read as the reference's colour {ref:.3f}, without a reference {none:.3f}")
    r = routing_contrast(models, scale=a.scale)
    print(f"MIP-Adapter toy-sdxl routing, w(circle) left half - right half: mean {r['mean']:+.3f}, "
          f"mean |.| {r['abs']:.3f}; mean |w - 0.5| {r['spread']:.3f} (8 samples, noise seed 0, every layer and step)")
    results = measure(models, samples=a.samples, seeds=a.seeds, scale=a.scale, steps=a.steps, guidance=a.guidance)
    for line in mipadapter_lines(results):
        print(line)
    print(f"({time.time() - start:.0f} s, {a.samples} samples x {len(a.seeds)} seeds x {len(PAIRS)} pairs x "
          f"{len(CONDITIONS)} conditions, {a.steps} steps, guidance {a.guidance}, λ {a.scale})")


if __name__ == "__main__":
    main()
