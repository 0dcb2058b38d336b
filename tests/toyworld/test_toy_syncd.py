"""SynCD on toy-sdxl: the references' colour carries over to a held-out shape (the method's effect, issue 13).

Data: SynCD tuples from toy scenes (`common.toyworld.multiview`): 3 views of one identity (a BASE shape in one
colour) on 3 backgrounds, each large-centred or small at one of the 5 positions, with the scene generator's exact
object masks; 2 tuples per (shape, colour) = 80 tuples. Every view's prompt leaves the colour out ("a circle on a
blue background"), so the identity can only come from the references. Training: syncd's real entry point
(`syncd.train.main`, SDXL path, `--masked --no-dilate_mask`, LoRA rank 8 on attn1 with `--trainkeys lora`, the
default without an IP-Adapter: none exists for toy-sdxl), AdamW lr 3e-3, 100 steps x 8 tuples, seed 0. (syncd's
training masks are r/8 = 4x4 at 32 px; its default 5x5 dilation makes them all-ones, hence --no-dilate_mask.)

Probe: per colour (all 8), 2 references of a STAR (never in toy-sdxl's or this training) in that colour on 2
backgrounds, and the prompt "a star on a <third background>" that does not name the colour; toy-clip reads the
sample's colour (8-way, chance 0.125). Same prompt and initial noise (seeds 1000 + NOISE_SEEDS) in three ways:
  base  - toy-sdxl's own pipeline, no references (text CFG 7.5);
  zero  - syncd's SDXL sampler (`generate_sdxl`: masked reference K/V bank + normalised image/text guidance, its
          defaults 7.5 / 8 + 5) with the references on the untrained (LoRA-zero) shared attention;
  tuned - the same sampler with the trained SynCD LoRA. 10 DDIM steps.

Measured (100 training steps, about 90-130 s on one thread of a loaded 2-core box; 1-2.5 s per reference sample;
`python benchmarks/toyworld_syncd.py --seeds 0 1 2 3`), read as the references' colour, base | zero | tuned:
  toy-sdxl of 18:24 (first quick export), seeds 0-2 (24 samples): 0.125 | 0.417 | 0.375 (0.458 with syncd's
  default mask dilation; with it seeds 0-1: 0.188 | 0.500 | 0.500).
  toy-sdxl of 19:21 (the weights in place when this was written), seeds 0-3 (32 samples): 0.094 | 0.250 | 0.250;
  seeds 0-1 (this test): 0.125 | 0.188 | 0.250.
So the references do carry some colour over through syncd's sampler, but how much depends on the base weights
(+0.31 on the first export, +0.13 on the second, 16 samples), and SynCD training adds nothing at this scale:
the SynCD loss of the trained LoRA on held-out star tuples is the same with the right references as with another
colour's (wrong/right - 1 from -0.2 % to +0.5 % over the runs above; -0.4 % once the probe read the references
through the LoRA'd projections as syncd's training now does; LoRA-zero +0.2 % to +1.4 %); naming the
colour in the prompt instead lowers the loss by only ~5 % at t >= 600 and not at all below, so the identity signal
of the epsilon objective is faint (the original trains a v-prediction model, whose loss weights high noise more).
Both effect claims are strict xfails on the current weights: a better toy-sdxl (or recipe) that makes them hold
shows up as an XPASS to claim.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.toyworld.judge import ASSETS
from common.toyworld.multiview import colourless_caption, identity_sets, object_mask, write_image_sets
from common.toyworld.scenes import COLORS, render
from toy_benchmarks import load_benchmark

TOY_SDXL_DIR = ASSETS / "toy-sdxl"
TRAIN = dict(steps=100, rank=8, learning_rate=3e-3, batch=8, seed=0, dilate_mask=False)
SAMPLING = dict(num_inference_steps=10, guidance_scale=7.5, image_guidance_scale=8.0, adaptive_image_guidance_scale=5.0)
NOISE_SEEDS = (0, 1)  # x 8 colours = 16 samples per condition
MARGIN_OVER_BASE = 0.15
REFERENCE_USE_GAP = 0.02  # another colour's references must cost >= 2 % more SynCD loss than the right ones


def _pixels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1


def test_toy_tuples_in_syncd_layout_with_exact_masks(tmp_path):
    """The tuples syncd's dataset reads: views of one identity, colour-free prompts, masks = the object's pixels."""
    from syncd.data import SynCDDataset

    sets = identity_sets(("circle",), 1, 3, seed=0)
    assert len(sets) == len(COLORS)
    for views in sets:
        assert len({(v.objects[0].shape, v.objects[0].color) for v in views}) == 1  # one identity
        assert len({v.background for v in views}) == 3 and all(v.background != v.objects[0].color for v in views)
        for v in views:  # the mask is exactly the pixels that differ from the flat background
            bg = np.asarray(COLORS[v.background])
            drawn = (np.asarray(render(v)).astype(int) != bg).any(-1)
            assert np.array_equal(object_mask(v), drawn)
    prompts = [[colourless_caption(v) for v in views] for views in sets]
    bg = sets[0][0].background
    assert prompts[0][0] == f"a circle on {'an' if bg[0] in 'aeiou' else 'a'} {bg} background"
    assert not any(c in p for ps in prompts for p in ps for c in COLORS if not p.endswith(f"{c} background"))
    folder = write_image_sets(tmp_path / "tuples", sets, prompts)
    # mask_kernel_size 1 = --no-dilate_mask: syncd's masks are r/8 = 4x4 at 32 px, which its default 5x5 dilation
    # turns all-ones (masking off); the training below passes --no-dilate_mask
    ds = SynCDDataset([str(folder)], resolution=32, numref=-1, drop_both=0, drop_image=0, drop_text=0, mask_ones_prob=0,
                      mask_kernel_size=1)
    ds.check()
    assert len(ds) == len(sets)
    torch.manual_seed(0)
    item = ds[3]
    assert item["prompt"] == prompts[3][0]
    # syncd's mask-keeping crop trims the 32 px views a little (its 200 px padding, then a resize): each item image
    # is still its own view, and each mask its own object's
    renders = torch.stack([_pixels(render(v)) for v in sets[3]])
    dist = (item["images"][:, None] - renders[None]).abs().mean(dim=(2, 3, 4))  # [item view, render]
    assert torch.equal(dist.argmin(1), torch.arange(3)) and dist.diagonal().max() < 0.1, dist
    for j, v in enumerate(sets[3]):
        want = torch.from_numpy(np.asarray(Image.fromarray(object_mask(v).astype(np.uint8) * 255).resize(
            (4, 4), Image.NEAREST)) > 0)
        got = item["masks"][j]
        assert not (want & ~got).any(), (j, got, want)  # LANCZOS > 0 at 4x4 is generous, never short
    assert not item["masks"].all()  # some background stays hidden from the target


# ------------------------------------------------------------------------------------------------- the effect


@pytest.fixture(scope="module")
def pipes(toy_clip, tmp_path_factory):
    """(base toy-sdxl, toy-sdxl + the SynCD LoRA trained here through syncd.train.main; benchmarks/toyworld_syncd.py)."""
    if not (TOY_SDXL_DIR / "model_index.json").is_file():
        pytest.skip(f"toy-sdxl not exported yet ({TOY_SDXL_DIR}): see assets/toyworld/MODEL_CARD.md")
    bench = load_benchmark("syncd")
    out = tmp_path_factory.mktemp("toy_syncd")
    data = bench.build_tuples(out / "tuples", per_identity=2, seed=0)
    base, tuned = bench.load_pipes(bench.train_syncd(data, out / "model", **TRAIN))
    return base, tuned


@pytest.fixture(scope="module")
def colour_rates(pipes, toy_clip):
    """{"base", "zero", "tuned"}: fraction of samples toy-clip reads as the references' colour (8 colours x
    NOISE_SEEDS, a held-out star, prompt without the colour; same prompt and initial noise in all three)."""
    base, tuned = pipes
    rates = load_benchmark("syncd").colour_transfer(toy_clip, base, tuned, NOISE_SEEDS, SAMPLING)
    return {k: v["colour"] for k, v in rates.items()}


@pytest.mark.slow  # 100 training steps + 48 samples: 3-4 min on one thread of a loaded 2-core machine
@pytest.mark.xfail(strict=True, reason="toy-sdxl of 19:21: read as the references' colour base 0.125 | LoRA-zero "
                   "0.188 | trained 0.250 on these 16 samples (+0.13 < 0.15; the first export gave +0.31): see the "
                   "module docstring")
def test_syncd_references_carry_their_colour_over(colour_rates):
    r = colour_rates
    print("colour read as the references'", r)
    assert r["tuned"] - r["base"] >= MARGIN_OVER_BASE, r
    assert r["zero"] - r["base"] >= MARGIN_OVER_BASE, r


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="at toy scale the trained LoRA does not use the references: SynCD loss with "
                   "another colour's references / right ones - 1 = -0.4 % .. +0.5 % (needs >= 2 %); see the docstring")
def test_syncd_training_teaches_the_target_to_use_the_references(pipes):
    use = load_benchmark("syncd").reference_use(pipes[1])
    print("SynCD loss, trained LoRA", use)
    assert use["wrong"] >= (1 + REFERENCE_USE_GAP) * use["right"], use
