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
colour's (wrong/right - 1 from -0.2 % to +0.5 % over the runs above; LoRA-zero +0.2 % to +1.4 %); naming the
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
from common.toyworld.multiview import colourless_caption, identity_sets, identity_views, object_mask, write_image_sets
from common.toyworld.scenes import BASE_SHAPES, COLORS, render, single_object_scene

TOY_SDXL_DIR = ASSETS / "toy-sdxl"
SHAPE = "star"
TRAIN_ARGS = ["--rank", "8", "--learning_rate", "3e-3", "--train_batch_size", "8", "--max_train_steps", "100",
              "--seed", "0"]
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
    """(base toy-sdxl, toy-sdxl + the SynCD LoRA trained here through syncd.train.main)."""
    if not (TOY_SDXL_DIR / "model_index.json").is_file():
        pytest.skip(f"toy-sdxl not exported yet ({TOY_SDXL_DIR}): see assets/toyworld/MODEL_CARD.md")
    from accelerate.state import AcceleratorState, GradientState

    from common.models.loading import load_pipeline
    from syncd.checkpoint import SDXL_PREFIX, SDXL_TARGETS, load_syncd_checkpoint
    from syncd.train import main

    out = tmp_path_factory.mktemp("toy_syncd")
    sets = identity_sets(BASE_SHAPES, 2, 3, seed=0)
    data = write_image_sets(out / "tuples", sets, [[colourless_caption(v) for v in views] for views in sets])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        main(["--model", "sdxl", "--pretrained_model_name_or_path", "toy-sdxl", "--train_data_dir", str(data),
              "--resolution", "32", "--numref", "2", "--masked", "--no-dilate_mask", "--trainkeys", "lora",
              "--optimizer", "adamw", "--lr_warmup_steps", "0", "--gradient_accumulation_steps", "1",
              "--checkpointing_steps", "0", "--dataloader_num_workers", "0", "--report_to", "none",
              "--output_dir", str(out / "model"), *TRAIN_ARGS])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(before)
    base, tuned = load_pipeline("toy-sdxl"), load_pipeline("toy-sdxl")
    for pipe in (base, tuned):
        pipe.set_progress_bar_config(disable=True)
    assert load_syncd_checkpoint(tuned.unet, out / "model", target_modules=SDXL_TARGETS, prefix=SDXL_PREFIX) > 0
    return base, tuned


@pytest.fixture(scope="module")
def colour_rates(pipes, toy_clip):
    """{"base", "zero", "tuned"}: fraction of samples toy-clip reads as the references' colour (8 colours x
    NOISE_SEEDS, a held-out star, prompt without the colour; same prompt and initial noise in all three)."""
    from common.toyworld.judge import attribute_accuracy
    from syncd.sdxl_pipeline import generate_sdxl

    base, tuned = pipes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(123)
    hits: dict[str, list[bool]] = {"base": [], "zero": [], "tuned": []}
    try:
        with torch.no_grad():
            for colour in COLORS:
                views = identity_views(SHAPE, colour, 3, rng)
                refs, target = views[:2], single_object_scene(SHAPE, colour, views[2].background)
                images = torch.stack([_pixels(render(v)) for v in refs])
                masks = torch.from_numpy(np.stack([object_mask(v) for v in refs]))
                prompt = colourless_caption(target)
                out: dict[str, list[Image.Image]] = {k: [] for k in hits}
                for seed in NOISE_SEEDS:
                    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1000 + seed))
                    out["base"].append(base(prompt, latents=x, num_inference_steps=SAMPLING["num_inference_steps"],
                                            guidance_scale=SAMPLING["guidance_scale"]).images[0])
                    for key, pipe in (("zero", base), ("tuned", tuned)):
                        g = torch.Generator().manual_seed(1000 + seed)  # its first draw is x, as above
                        out[key].append(generate_sdxl(pipe, prompt, images, masks, generator=g, progress=False,
                                                      **SAMPLING))
                for key, imgs in out.items():
                    read = attribute_accuracy(toy_clip, imgs, [target] * len(imgs), shapes=(SHAPE,))
                    hits[key] += read["color"].tolist()
    finally:
        torch.set_num_threads(before)
    return {k: float(np.mean(v)) for k, v in hits.items()}


@pytest.mark.slow  # 100 training steps + 48 samples: 3-4 min on one thread of a loaded 2-core machine
@pytest.mark.xfail(strict=True, reason="toy-sdxl of 19:21: read as the references' colour base 0.125 | LoRA-zero "
                   "0.188 | trained 0.250 on these 16 samples (+0.13 < 0.15; the first export gave +0.31): see the "
                   "module docstring")
def test_syncd_references_carry_their_colour_over(colour_rates):
    r = colour_rates
    print("colour read as the references'", r)
    assert r["tuned"] - r["base"] >= MARGIN_OVER_BASE, r
    assert r["zero"] - r["base"] >= MARGIN_OVER_BASE, r


@torch.no_grad()
def _reference_use(pipe, timesteps=(200, 400, 600, 800), repeats: int = 2) -> dict[str, float]:
    """SynCD's training objective on 16 held-out star tuples (2 per colour; 2 references, masked K/V written with the
    LoRA off; target prompt without the colour): mean epsilon MSE with the right references, with the references of
    another colour (same noise), and with none (benchmarks/toyworld_syncd.py: `reference_use`)."""
    from common.attention.plan import AttentionPlan, KVBank
    from common.attention.schedule import plan_installed
    from common.pipelines.conditioning import build_conditioning
    from common.pipelines.latents import encode_images
    from common.train.conditioning import sdxl_add_time_ids
    from common.train.lora import lora_disabled

    rng, g = np.random.default_rng(5), torch.Generator().manual_seed(0)
    tuples = [identity_views(SHAPE, c, 3, rng) for c in COLORS for _ in range(2)]
    tid = sdxl_add_time_ids((32, 32), (0, 0), (32, 32), batch=1, device="cpu")
    ref_cond = build_conditioning(pipe, ["", ""], do_cfg=False, device="cpu")
    mse: dict[str, list[float]] = {"right": [], "wrong": [], "none": []}

    def run(x, t, cond, bank):
        added = {"text_embeds": cond.pooled, "time_ids": tid.expand(x.shape[0], -1)}
        return pipe.unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added,
                         cross_attention_kwargs={"plan": AttentionPlan(kv_bank=bank)}).sample

    with plan_installed(pipe.unet, where="attn1"):
        for i, views in enumerate(tuples):
            pair = {"right": views, "wrong": tuples[(i + 6) % len(tuples)]}  # 3 colours further on
            lat = {k: encode_images(pipe.vae, torch.stack([_pixels(render(s)) for s in v]), g) for k, v in pair.items()}
            masks = {k: torch.from_numpy(np.stack([object_mask(s) for s in v[1:]])) for k, v in pair.items()}
            cond = build_conditioning(pipe, [colourless_caption(views[0])], do_cfg=False, device="cpu")
            for t in timesteps:
                for _ in range(repeats):
                    noise = torch.randn(lat["right"].shape, generator=g)
                    tt = torch.tensor([t])
                    target = pipe.scheduler.add_noise(lat["right"][:1], noise[:1], tt)
                    for key in mse:
                        bank = KVBank(mode="off")
                        if key != "none":
                            bank.masks, bank.mode = masks[key], "write"
                            refs = pipe.scheduler.add_noise(lat[key][1:], noise[1:], tt.repeat(2))
                            with lora_disabled(pipe.unet):  # as syncd's training: references with the LoRA off
                                run(refs, tt.repeat(2), ref_cond, bank)
                            bank.mode, bank.read_index = "read", torch.arange(2)[None]
                        mse[key].append(((run(target, tt, cond, bank) - noise[:1]) ** 2).mean().item())
    return {k: float(np.mean(v)) for k, v in mse.items()}


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="at toy scale the trained LoRA does not use the references: SynCD loss with "
                   "another colour's references / right ones - 1 = -0.2 % .. +0.5 % (needs >= 2 %); see the docstring")
def test_syncd_training_teaches_the_target_to_use_the_references(pipes):
    _, tuned = pipes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        use = _reference_use(tuned)
    finally:
        torch.set_num_threads(before)
    print("SynCD loss, trained LoRA", use)
    assert use["wrong"] >= (1 + REFERENCE_USE_GAP) * use["right"], use
