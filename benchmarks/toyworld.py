"""Toy-world effect numbers (printed, never failing a test run): one line per model / method, base vs after.

- toy-clip zero-shot accuracy (colour, shape) on 400 unseen single-object scenes drawn like the training data,
  and on the 280 large centred held-in scenes (every shape x colour x background): a randomly initialised
  toy-clip (same config, seed 0) vs the trained one.
- toy-sd prompt accuracy: toy-sd samples for held-in prompts, read by toy-clip (colour, shape, both right):
  the same noise with an empty prompt (the unconditional model, so the base) vs with the prompt. The renders
  of the prompts' own scenes give the judge's ceiling.
- Custom Diffusion: toy-CLIP-I to 4 references of a held-out shape (a yellow star on purple) of toy-sd samples
  for "a <new1> star on a purple background" after training (as tests/toyworld/test_toy_customdiffusion.py),
  vs the base model for the prompt without the token and for the one that also names the colour; and how often
  "a green <new1> star ..." is read green (base: "a green star ...").

- SyncTweedies, MIP-Adapter, MuDI, SynCD: each method's own script `benchmarks/toyworld_<method>.py` (run one by
  one with `--methods`; each prints its base-vs-method lines and takes minutes on one thread).

Usage: `python benchmarks/toyworld.py [--every 4] [--num_inference_steps 20] [--guidance_scale 4]
[--methods synctweedies mipadapter mudi syncd]`.
"""
from __future__ import annotations

import argparse
import subprocess
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

METHOD_SCRIPTS = ("synctweedies", "mipadapter", "mudi", "syncd")


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


def customdiffusion_line(steps: int, samples: int, seeds: tuple[int, ...]) -> None:
    import tempfile

    from common.eval.clip import clip_i
    from common.models.loading import load_pipeline
    from common.toyworld.judge import concept_scenes
    from common.toyworld.scenes import single_object_scene
    from customdiffusion.apply import apply_customdiffusion
    from customdiffusion.train import main as train_cd

    shape, colour, background = "star", "yellow", "purple"
    prompt = f"a <new1> {shape} on a {background} background"
    refs = [render(s) for s in concept_scenes(shape, colour, background)]
    judge = toy_clip_extractor()
    with tempfile.TemporaryDirectory() as tmp:
        for i, img in enumerate(refs):
            (Path(tmp) / "instances").mkdir(exist_ok=True)
            img.save(Path(tmp) / "instances" / f"{i}.png")
        t0 = time.perf_counter()
        train_cd(["--model", "toy-sd", "--instance_data_dir", str(Path(tmp) / "instances"), "--instance_prompt",
                  prompt, "--modifier_token", "<new1>", "--resolution", "32", "--train_batch_size", "4", "--noaug",
                  "--learning_rate", "2e-3", "--lr_warmup_steps", "0", "--max_train_steps", str(steps),
                  "--checkpointing_steps", "0", "--dataloader_num_workers", "0", "--report_to", "none",
                  "--seed", "0", "--output_dir", str(Path(tmp) / "concept")])
        seconds = time.perf_counter() - t0
        base, tuned = load_pipeline("toy-sd"), load_pipeline("toy-sd")
        apply_customdiffusion(tuned, Path(tmp) / "concept")
    for pipe in (base, tuned):
        pipe.set_progress_bar_config(disable=True)
    ref = judge.encode_images(refs)
    scene, green = single_object_scene(shape, colour, background), single_object_scene(shape, "green", background)
    rows: dict[str, list[float]] = {k: [] for k in ("plain", "colour", "tuned", "green_base", "green_tuned")}
    for seed in seeds:
        for key, pipe, text in (("plain", base, f"a {shape} on a {background} background"),
                                ("colour", base, f"a {colour} {shape} on a {background} background"),
                                ("tuned", tuned, prompt)):
            imgs = generate_scenes(pipe, [scene] * samples, seed=seed, prompts=[text] * samples)
            rows[key].append(clip_i(judge.encode_images(imgs), ref).mean().item())
        for key, pipe, text in (("green_base", base, f"a green {shape} on a {background} background"),
                                ("green_tuned", tuned, f"a green <new1> {shape} on a {background} background")):
            imgs = generate_scenes(pipe, [green] * samples, seed=seed, prompts=[text] * samples)
            acc = attribute_accuracy(judge, imgs, [green] * samples, shapes=(shape,))["color"].float().mean()
            rows[key].append(acc.item())
    fmt = lambda k: "/".join(f"{v:.3f}" for v in rows[k])  # noqa: E731
    print(f"custom diffusion on toy-sd ({steps} steps, 4 references of a {colour} {shape}, {samples} samples x "
          f"noise seeds {seeds}): toy-CLIP-I base '{shape}' {fmt('plain')}, base '{colour} {shape}' "
          f"{fmt('colour')} | '<new1> {shape}' {fmt('tuned')}; read green: base 'green {shape}' "
          f"{fmt('green_base')} | 'green <new1> {shape}' {fmt('green_tuned')} [training {seconds:.0f} s]")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=int, default=4, help="judge every N-th of the 280 held-in prompts")
    p.add_argument("--num_inference_steps", type=int, default=20, help="DDIM steps per toy-sd sample")
    p.add_argument("--guidance_scale", type=float, default=4.0, help="classifier-free guidance of toy-sd")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the samples")
    p.add_argument("--cd_steps", type=int, default=60, help="Custom Diffusion training steps (0: skip its line)")
    p.add_argument("--cd_samples", type=int, default=16, help="Custom Diffusion samples per prompt and noise seed")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (tiny models: 1 is fastest)")
    p.add_argument("--methods", nargs="*", default=[], choices=METHOD_SCRIPTS,
                   help="also run these methods' toy-world benchmarks (benchmarks/toyworld_<method>.py), in turn")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not weights_available():
        print("toy-world weights missing in assets/toyworld: train them with scripts/train_toyworld.py")
        return
    clip_line()
    sd_line(args.every, args.num_inference_steps, args.guidance_scale, args.seed)
    if args.cd_steps:
        customdiffusion_line(args.cd_steps, args.cd_samples, (0, 1, 2))
    for method in args.methods:  # each script loads its own models and prints its own lines
        print(f"--- {method} (benchmarks/toyworld_{method}.py) ---", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / f"toyworld_{method}.py")], check=False)


if __name__ == "__main__":
    main()
