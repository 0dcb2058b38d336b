"""SynCD on the toy world (issue 13): does the references' identity carry over to a held-out shape?

Data: SynCD tuples from toy scenes (`common.toyworld.multiview`): 3 views of one identity (a base shape in one
colour) on 3 backgrounds, random placements, exact object masks; 2 tuples per (shape, colour) = 80 tuples. The
target's prompt leaves the colour out ("a circle on a blue background"): the identity must come from the
references. Training: `syncd.train.main` (SDXL path on toy-sdxl, `--masked`, LoRA on attn1, `--trainkeys lora`:
toy-sdxl has no IP-Adapter), AdamW.

Probe: per colour (all 8), 2 references of a star (held out of toy-sdxl's and of this training) in that colour on
2 backgrounds and the prompt "a star on a <third background>", which does not name the colour. toy-clip reads the
sample's colour (8-way, chance 0.125) and toy-CLIP-I compares it with the references. Conditions, same prompt and
initial noise: base toy-sdxl (its own pipeline, text CFG, no references) | syncd's SDXL sampler with the
references on the untrained (LoRA-zero) shared attention | the same with the trained LoRA.

Usage: `python benchmarks/toyworld_syncd.py [--max_train_steps 300] [--seeds 0 1 2] [--finetuned_path DIR]`
(one CPU thread; about 4 s per reference-conditioned sample on a loaded 2-core machine, training ~1 s/step).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.toyworld.multiview import colourless_caption, identity_sets, identity_views, object_mask  # noqa: E402
from common.toyworld.multiview import write_image_sets  # noqa: E402
from common.toyworld.scenes import BASE_SHAPES, COLORS, Scene, render, single_object_scene  # noqa: E402

PROBE_SHAPE = "star"
#: the recipe of tests/toyworld/test_toy_syncd.py
TRAIN = dict(steps=100, rank=8, learning_rate=3e-3, batch=8, per_identity=2, seed=0, dilate_mask=False)
#: SynCD's SDXL sampler defaults (sample.py): text 7.5, image s0 8 + 5 (1000 - t) / 1000
SAMPLE = dict(num_inference_steps=10, guidance_scale=7.5, image_guidance_scale=8.0, adaptive_image_guidance_scale=5.0)


def _fresh_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def build_tuples(folder: Path, per_identity: int = 2, seed: int = 0) -> Path:
    """80 SynCD tuples (3 views of each base shape x colour, `per_identity` times) with colour-free prompts."""
    sets = identity_sets(BASE_SHAPES, per_identity, 3, seed=seed)
    return write_image_sets(folder, sets, [[colourless_caption(s) for s in views] for views in sets])


def train_syncd(data: Path, out: Path, *, steps: int, rank: int, learning_rate: float, batch: int, seed: int,
                dilate_mask: bool, **_) -> Path:
    """syncd's training entry point on toy-sdxl (one thread); returns the output folder."""
    from syncd.train import main

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    _fresh_accelerate_state()
    try:
        main(["--model", "sdxl", "--pretrained_model_name_or_path", "toy-sdxl", "--train_data_dir", str(data),
              "--resolution", "32", "--numref", "2", "--masked", "--trainkeys", "lora", "--rank", str(rank),
              "--optimizer", "adamw", "--learning_rate", str(learning_rate), "--lr_warmup_steps", "0",
              "--train_batch_size", str(batch), "--gradient_accumulation_steps", "1", "--max_train_steps", str(steps),
              "--checkpointing_steps", "0", "--dataloader_num_workers", "0", "--report_to", "none",
              "--seed", str(seed), "--output_dir", str(out), "--dilate_mask" if dilate_mask else "--no-dilate_mask"])
    finally:
        _fresh_accelerate_state()
        torch.set_num_threads(before)
    return out


def probes(shape: str = PROBE_SHAPE, seed: int = 123) -> list[tuple[list[Scene], Scene]]:
    """Per colour: (2 reference scenes of `shape` in it, the target scene whose colour-free caption is the
    prompt: same shape and colour on a third background)."""
    rng = np.random.default_rng(seed)
    out = []
    for colour in COLORS:
        views = identity_views(shape, colour, 3, rng)
        out.append((views[:2], single_object_scene(shape, colour, views[2].background)))
    return out


def _pixels(scene: Scene) -> torch.Tensor:
    return torch.from_numpy(np.asarray(render(scene)).copy()).permute(2, 0, 1).float() / 127.5 - 1


def load_pipes(finetuned: Path | None):
    """(toy-sdxl, toy-sdxl + the SynCD LoRA or None)."""
    from common.models.loading import load_pipeline
    from syncd.checkpoint import SDXL_PREFIX, SDXL_TARGETS, load_syncd_checkpoint

    base = load_pipeline("toy-sdxl")
    base.set_progress_bar_config(disable=True)
    if finetuned is None:
        return base, None
    tuned = load_pipeline("toy-sdxl")
    tuned.set_progress_bar_config(disable=True)
    load_syncd_checkpoint(tuned.unet, finetuned, target_modules=SDXL_TARGETS, prefix=SDXL_PREFIX)
    return base, tuned


@torch.no_grad()
def sample(pipe, refs: Sequence[Scene] | None, target: Scene, seed: int, *, num_inference_steps: int,
           guidance_scale: float, image_guidance_scale: float, adaptive_image_guidance_scale: float):
    """One 32 px sample for the target's colour-free prompt. refs None: the pipeline itself (text CFG); else
    syncd's SDXL sampler with the references and their exact masks. The initial noise is the first draw of
    `seed` in both cases."""
    prompt = colourless_caption(target)
    if refs is None:
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
        return pipe(prompt, latents=x, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale).images[0]
    from syncd.sdxl_pipeline import generate_sdxl

    images = torch.stack([_pixels(s) for s in refs])
    masks = torch.from_numpy(np.stack([object_mask(s) for s in refs]))
    return generate_sdxl(pipe, prompt, images, masks, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
                         adaptive_image_guidance_scale=adaptive_image_guidance_scale,
                         generator=torch.Generator().manual_seed(seed), progress=False)


def colour_transfer(judge, base, tuned, seeds: Sequence[int], sampling: dict | None = None
                    ) -> dict[str, dict[str, float]]:
    """{condition: {"colour": fraction read as the references' colour, "clip_i": mean toy-CLIP-I to them}} over
    8 colours x `seeds`; conditions "base", "zero" (references, LoRA-zero) and "tuned" (when `tuned`)."""
    from common.eval.clip import clip_i
    from common.toyworld.judge import attribute_accuracy

    sampling = {**SAMPLE, **(sampling or {})}
    pipes = {"base": (base, False), "zero": (base, True), **({"tuned": (tuned, True)} if tuned is not None else {})}
    hits: dict[str, list[float]] = {k: [] for k in pipes}
    sims: dict[str, list[float]] = {k: [] for k in pipes}
    for refs, target in probes():
        ref_feats = judge.encode_images([render(s) for s in refs])
        for name, (pipe, with_refs) in pipes.items():
            imgs = [sample(pipe, refs if with_refs else None, target, 1000 + s, **sampling) for s in seeds]
            ok = attribute_accuracy(judge, imgs, [target] * len(imgs), shapes=(target.objects[0].shape,))["color"]
            hits[name] += ok.float().tolist()  # colour-major, seed-minor
            sims[name] += clip_i(judge.encode_images(imgs), ref_feats).tolist()
    return {k: {"colour": float(np.mean(hits[k])), "clip_i": float(np.mean(sims[k])),
                "per_seed": np.asarray(hits[k]).reshape(-1, len(seeds)).sum(0).astype(int).tolist()} for k in pipes}


@torch.no_grad()
def reference_use(pipe, timesteps: Sequence[int] = (200, 400, 600, 800), repeats: int = 2, seed: int = 0
                  ) -> dict[str, float]:
    """SynCD's training objective on held-out star tuples (16: 2 per colour; target + 2 references, masked K/V
    written with the LoRA off and read through the
    target pass's LoRA'd projections as syncd's training, target prompt without the colour): mean epsilon MSE with the right references,
    with another colour's references (same noise), and with none. Returns {"right", "wrong", "none"}."""
    from common.attention.plan import AttentionPlan, KVBank
    from common.attention.schedule import plan_installed
    from common.pipelines.conditioning import build_conditioning
    from common.pipelines.latents import encode_images
    from common.train.conditioning import sdxl_add_time_ids
    from common.train.lora import lora_disabled

    rng, g = np.random.default_rng(5), torch.Generator().manual_seed(seed)
    tuples = [identity_views(PROBE_SHAPE, c, 3, rng) for c in COLORS for _ in range(2)]
    has_lora = any("lora_" in n for n, _ in pipe.unet.named_parameters())
    tid = sdxl_add_time_ids((32, 32), (0, 0), (32, 32), batch=1, device="cpu")
    ref_cond = build_conditioning(pipe, ["", ""], do_cfg=False, device="cpu")
    mse: dict[str, list[float]] = {"right": [], "wrong": [], "none": []}

    def run(x, t, cond, bank):
        return pipe.unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs={
            "text_embeds": cond.pooled, "time_ids": tid.expand(x.shape[0], -1)},
            cross_attention_kwargs={"plan": AttentionPlan(kv_bank=bank)}).sample

    with plan_installed(pipe.unet, where="attn1"):
        for i, views in enumerate(tuples):
            other = tuples[(i + 6) % len(tuples)]  # 3 colours further on
            lat = {k: encode_images(pipe.vae, torch.stack([_pixels(s) for s in v]), g)
                   for k, v in (("right", views), ("wrong", other))}
            masks = {k: torch.from_numpy(np.stack([object_mask(s) for s in v[1:]]))
                     for k, v in (("right", views), ("wrong", other))}
            cond = build_conditioning(pipe, [colourless_caption(views[0])], do_cfg=False, device="cpu")
            for t in timesteps:
                for _ in range(repeats):
                    noise = torch.randn(lat["right"].shape, generator=g)
                    tt = torch.tensor([t])
                    target = pipe.scheduler.add_noise(lat["right"][:1], noise[:1], tt)
                    for key in mse:
                        bank = KVBank(mode="off", project_on_read=True)  # as syncd's training
                        if key != "none":
                            bank.masks = masks[key]
                            refs = pipe.scheduler.add_noise(lat[key][1:], noise[1:], tt.repeat(2))
                            bank.mode = "write"
                            with lora_disabled(pipe.unet) if has_lora else contextlib.nullcontext():
                                run(refs, tt.repeat(2), ref_cond, bank)
                            bank.mode, bank.read_index = "read", torch.arange(2)[None]
                        mse[key].append(((run(target, tt, cond, bank) - noise[:1]) ** 2).mean().item())
    return {k: float(np.mean(v)) for k, v in mse.items()}


def syncd_lines(max_train_steps: int = TRAIN["steps"], seeds: Sequence[int] = (0, 1, 2),
                finetuned_path: str | None = None, sampling: dict | None = None,
                dilate_mask: bool = TRAIN["dilate_mask"]) -> list[str]:
    """Metric on the base model vs after the method, one line each; trains once unless `finetuned_path`."""
    from common.toyworld.judge import toy_clip_extractor

    torch.set_num_threads(1)
    judge = toy_clip_extractor()
    with tempfile.TemporaryDirectory() as tmp:
        seconds = 0.0
        if finetuned_path is None:
            data = build_tuples(Path(tmp) / "data", TRAIN["per_identity"], TRAIN["seed"])
            t0 = time.perf_counter()
            finetuned_path = str(train_syncd(data, Path(tmp) / "model", **{**TRAIN, "steps": max_train_steps,
                                                                                  "dilate_mask": dilate_mask}))
            seconds = time.perf_counter() - t0
        base, tuned = load_pipes(Path(finetuned_path))
        t0 = time.perf_counter()
        res = colour_transfer(judge, base, tuned, seeds, sampling)
        per_sample = (time.perf_counter() - t0) / (len(seeds) * len(COLORS) * 3)
        use = {"zero": reference_use(base), "tuned": reference_use(tuned)}
    s = {**SAMPLE, **(sampling or {})}
    n = len(seeds) * len(COLORS)
    head = (f"SynCD on toy-sdxl ({max_train_steps} steps x {TRAIN['batch']} tuples, rank {TRAIN['rank']}, "
            f"lr {TRAIN['learning_rate']}, mask dilation {'on' if dilate_mask else 'off'}; {n} samples: 8 colours of a "
            f"held-out {PROBE_SHAPE}, 2 references each, "
            f"prompt without the colour, {s['num_inference_steps']} DDIM steps, guidance {s['guidance_scale']} / "
            f"image {s['image_guidance_scale']} + {s['adaptive_image_guidance_scale']})")
    fmt = lambda k: f"{res[k]['colour']:.3f} (per seed {res[k]['per_seed']} of 8)" if k in res else "-"  # noqa: E731
    fmi = lambda k: f"{res[k]['clip_i']:.3f}" if k in res else "-"  # noqa: E731
    lines = [head,
             f"  read as the references' colour (chance 0.125): base no refs {fmt('base')} | refs, LoRA-zero "
             f"{fmt('zero')} | refs, trained {fmt('tuned')}",
             f"  toy-CLIP-I to the references: base no refs {fmi('base')} | refs, LoRA-zero {fmi('zero')} | "
             f"refs, trained {fmi('tuned')}  [training {seconds:.0f} s, {per_sample:.1f} s/sample]"]
    for k, label in (("zero", "LoRA-zero"), ("tuned", "trained")):
        u = use[k]
        lines.append(f"  SynCD loss on 16 held-out star tuples, {label}: right refs {u['right']:.5f} | another colour's"
                     " "
                     f"refs {u['wrong']:.5f} | no refs {u['none']:.5f} (wrong/right - 1 = "
                     f"{u['wrong'] / u['right'] - 1:+.2%})")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max_train_steps", type=int, default=TRAIN["steps"],
                   help="SynCD training steps (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="noise seeds per colour (default: 0 1 2)")
    p.add_argument("--finetuned_path", default=None, help="a trained SynCD folder: skip training")
    p.add_argument("--dilate_mask", action=argparse.BooleanOptionalAction, default=TRAIN["dilate_mask"],
                   help="syncd's 5x5 dilation of the r/8 training masks (at 32 px: 4x4, so all-ones) (default: off)")
    p.add_argument("--num_inference_steps", type=int, default=SAMPLE["num_inference_steps"], help="DDIM steps")
    p.add_argument("--guidance_scale", type=float, default=SAMPLE["guidance_scale"], help="text guidance")
    p.add_argument("--image_guidance_scale", type=float, default=SAMPLE["image_guidance_scale"], help="image s0")
    p.add_argument("--adaptive_image_guidance_scale", type=float, default=SAMPLE["adaptive_image_guidance_scale"],
                   help="image s_adapt")
    a = p.parse_args(argv)
    sampling = {k: getattr(a, k) for k in SAMPLE}
    for line in syncd_lines(a.max_train_steps, a.seeds, a.finetuned_path, sampling, a.dilate_mask):
        print(line, flush=True)


if __name__ == "__main__":
    main()
