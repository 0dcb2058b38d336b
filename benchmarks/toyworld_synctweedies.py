"""SyncTweedies wide images on toy-sd (issue 13): seamlessness and per-window colour, base vs after the method.

The method is the wide-image app itself (`synctweedies.apps.wide_image.run`, flags from its parser, toy-sd
loaded once and handed to it): a 32x128 px image (latent 16x64), toy-sd's native 16x16 latent window, stride 8
(7 windows), case 2, `--mvd_end 1 --initialize_xt_from_zt` as configs/synctweedies/wide_image.yaml, 20 DDIM
steps, guidance 4. The base is what one would do without it: 4 independent toy-sd samples of the same prompt
put side by side. An ablation runs the app with `--case_num 0` (same windows, same attention, decoded windows
averaged, nothing synchronised). Two prompt forms: the caption alone (the app's fixed "Best quality, extremely
detailed " prefix patched away: toy-sd never saw those words, and they cut its colour accuracy) and the app as
shipped (prefix on; the tiles then get the same prefixed prompt).

- seam ratio: mean |column j+1 - column j| (RGB, 0-255) across the tile boundaries (x = 32, 64, 96) over the
  same mean at every other column; ~1 for an image with no seams there, large for tiles put side by side.
- window colour: toy-clip reads the prompt's object colour (and background colour) of each 32x32 window (the
  app's 7 windows; the base's 4 tiles, i.e. toy-sd's single-image rate for the same prompts).

Usage: `python benchmarks/toyworld_synctweedies.py [--num_prompts 16] [--seed 0] [--no_ablation]
[--no_shipped_prefix]` (prints the toy-sd weights it measured and every figure the test and the model card use;
one thread; about 4 minutes of CPU).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common.toyworld.scenes import BASE_SHAPES, COLORS, Scene, caption_of, single_object_scene  # noqa: E402

HEIGHT, WIDTH, TILE = 32, 128, 32  # px; toy-sd's VAE factor is 2, so the latent canvas is 16x64
STRIDE = 8  # latent px between windows (the app's default): 7 windows of 16x16
STEPS, GUIDANCE = 20, 4.0


def wide_scenes(n: int) -> list[Scene]:
    """`n` prompts' scenes, spread over shapes, object colours (cycling all 8) and backgrounds (never the
    object's colour): scene i = shape i mod 5, colour i mod 8, background (3i + 1) mod 8."""
    colours = list(COLORS)
    return [single_object_scene(BASE_SHAPES[i % len(BASE_SHAPES)], colours[i % 8], colours[(3 * i + 1) % 8])
            for i in range(n)]


def app_prompt(scene: Scene, prefix: bool = True) -> str:
    """What the wide app feeds the UNet for `--prompt <caption>`: its fixed positive prefix + the caption
    (`prefix=False`: the caption alone, toy-sd's own prompt format)."""
    from synctweedies.apps.wide_image import POSITIVE_PREFIX

    return (POSITIVE_PREFIX if prefix else "") + caption_of(scene.objects, scene.background)


def run_wide_app(pipe, scene: Scene, seed: int, out_dir: Path, *, case_num: int = 2, prefix: bool = True) -> dict:
    """The wide-image app on an already-loaded toy-sd (its loader patched to hand `pipe` over; the rest of
    `run` as the CLI runs it, files written under `out_dir`). Returns run's dict plus "pil": the 128x32 image.
    `prefix=False` patches the app's fixed "Best quality, extremely detailed " prefix away (toy-sd never saw
    those words; they cost it colour accuracy)."""
    from common.cli import parse_args
    from common.pipelines.text2image import to_pil
    from synctweedies.apps import wide_image
    from synctweedies.config import wide_parser

    argv = ["--app", "wide_image", "--model", "toy-sd", "--prompt", caption_of(scene.objects, scene.background),
            "--panorama_height", str(HEIGHT), "--panorama_width", str(WIDTH), "--window_stride", str(STRIDE),
            "--num_inference_steps", str(STEPS), "--guidance_scale", str(GUIDANCE), "--case_num", str(case_num),
            "--mvd_end", "1.0", "--initialize_xt_from_zt", "--seed", str(seed), "--save_top_dir", str(out_dir),
            "--tag", f"case{case_num}_seed{seed}_prefix{int(prefix)}", "--no_progress"]
    args = parse_args(wide_parser(), argv)
    with mock.patch.object(wide_image, "load_sd", lambda *a, **k: (pipe, None)), \
            mock.patch.object(wide_image, "POSITIVE_PREFIX", wide_image.POSITIVE_PREFIX if prefix else ""):
        out = wide_image.run(args)
    out["pil"] = to_pil(out["image"].clamp(-1, 1))[0]
    return out


def independent_tiles(pipe, scene: Scene, seed: int, tiles: int = WIDTH // TILE, prefix: bool = True
                      ) -> list[Image.Image]:
    """The base: `tiles` independent toy-sd samples of the app's prompt (noise of tile k: (seed, k))."""
    from common.toyworld.judge import generate_scenes

    return generate_scenes(pipe, [scene] * tiles, seed=seed, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                           prompts=[app_prompt(scene, prefix)] * tiles)


def side_by_side(images: Sequence[Image.Image]) -> Image.Image:
    return Image.fromarray(np.concatenate([np.asarray(im.convert("RGB")) for im in images], axis=1))


def column_jumps(images: Sequence[Image.Image]) -> torch.Tensor:
    """[W - 1]: mean over images, rows and channels of |x[:, j + 1] - x[:, j]| (0-255)."""
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).float()  # [B, H, W, 3]
    return (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(0, 1, 3))


def seam_ratio(images: Sequence[Image.Image], tile: int = TILE) -> float:
    """Column jumps across the tile boundaries (x = tile, 2 tile, ...) over those everywhere else."""
    jumps = column_jumps(images)
    at = torch.zeros_like(jumps, dtype=torch.bool)
    at[[x - 1 for x in range(tile, len(jumps) + 1, tile)]] = True
    return (jumps[at].mean() / jumps[~at].mean()).item()


def windows(image: Image.Image, starts: Sequence[int], size: int = TILE) -> list[Image.Image]:
    return [image.crop((x, 0, x + size, size)) for x in starts]


def colour_reads(judge, images: Sequence[Image.Image], scene: Scene) -> dict[str, torch.Tensor]:
    """Per image: {"object": [N] bool, "background": [N] bool}, the colour toy-clip reads is the scene's."""
    from common.toyworld.judge import colour_candidates, read_choice

    colours = list(COLORS)
    obj = read_choice(judge, images, [colour_candidates(scene)] * len(images))
    bg = read_choice(judge, images, [[caption_of(scene.objects, c) for c in colours]] * len(images))
    return {"object": obj == colours.index(scene.objects[0].color),
            "background": bg == colours.index(scene.background)}


@dataclass
class Figures:
    """One sampler's figures over the prompts: seam ratio (pooled over images), colour read rates, windows
    judged, seconds; for the app also the seam ratio of its synchronised latent canvas g(X_0) decoded whole."""

    seam: float
    object: float
    background: float
    windows: int
    seconds: float
    seams: list[float]  # per wide image
    canvas_seam: float | None = None

    def fmt(self) -> str:
        return (f"seam {self.seam:.2f}, object colour {self.object:.3f}, background {self.background:.3f} "
                f"({self.windows} windows)")


def _figures(wides: list[Image.Image], reads: list[dict[str, torch.Tensor]], seconds: float,
             canvases: list[Image.Image] | None = None) -> Figures:
    cat = {k: torch.cat([r[k] for r in reads]).float() for k in ("object", "background")}
    return Figures(seam_ratio(wides), cat["object"].mean().item(), cat["background"].mean().item(),
                   len(cat["object"]), seconds, [seam_ratio([w]) for w in wides],
                   seam_ratio(canvases) if canvases else None)


def decode_canvas(pipe, out: dict) -> Image.Image:
    """The app's synchronised latent canvas g(X_0) [1, 4, 16, 64] decoded in one piece (the app instead decodes
    each window and averages them in RGB, as the original)."""
    from common.pipelines.latents import decode_latents
    from common.pipelines.text2image import to_pil

    with torch.no_grad():
        z = out["projection"].inverse(out["latent_views"])
        return to_pil(decode_latents(pipe.vae, z).float().clamp(-1, 1))[0]


def measure(pipe, judge, scenes: Sequence[Scene], *, seed: int = 0, out_dir: Path,
            cases: Sequence[int] = (2,), prefix: bool = True) -> dict[str, Figures]:
    """{"tiles": base, "case<k>": the wide app with --case_num k} over `scenes` (prompt i: app --seed seed + i,
    tiles' noise seed seed + i)."""
    results: dict[str, Figures] = {}
    wides, reads, t0 = [], [], time.perf_counter()
    for i, scene in enumerate(scenes):
        tiles = independent_tiles(pipe, scene, seed + i, prefix=prefix)
        wides.append(side_by_side(tiles))
        reads.append(colour_reads(judge, tiles, scene))
    results["tiles"] = _figures(wides, reads, time.perf_counter() - t0)
    for case in cases:
        wides, reads, canvases, t0 = [], [], [], time.perf_counter()
        for i, scene in enumerate(scenes):
            out = run_wide_app(pipe, scene, seed + i, out_dir, case_num=case, prefix=prefix)
            starts = [left for _, left in out["projection"].scaled(pipe.vae_scale_factor).offsets]
            wides.append(out["pil"])
            reads.append(colour_reads(judge, windows(out["pil"], starts), scene))
            canvases.append(decode_canvas(pipe, out))
        results[f"case{case}"] = _figures(wides, reads, time.perf_counter() - t0, canvases)
    return results


def synctweedies_lines(pipe=None, judge=None, *, num_prompts: int = 16, seed: int = 0, ablation: bool = True,
                       prefixes: Sequence[bool] = (False, True)) -> list[str]:
    """Print (and return) the "base vs after the method" lines of SyncTweedies wide images on toy-sd.

    prefixes: False = the captions as toy-sd was trained on them (the app's fixed prefix patched away, as
    tests/toyworld/test_toy_synctweedies.py runs it); True = the app as shipped (prefix on)."""
    from common.toyworld.judge import toy_clip_extractor

    if pipe is None:
        from common.models.loading import load_pipeline

        pipe = load_pipeline("toy-sd")
        pipe.set_progress_bar_config(disable=True)
    judge = judge or toy_clip_extractor()
    scenes = wide_scenes(num_prompts)
    lines = []
    for prefix in prefixes:
        with tempfile.TemporaryDirectory() as tmp:
            res = measure(pipe, judge, scenes, seed=seed, out_dir=Path(tmp), prefix=prefix,
                          cases=(2, 0) if ablation and not prefix else (2,))
        base, st = res["tiles"], res["case2"]
        which = ("app as shipped, prompt prefix 'Best quality, extremely detailed '" if prefix else
                 "caption alone, the app's prompt prefix patched away")
        head = f"synctweedies wide image on toy-sd ({which})"
        if not prefix:
            head += (f" [{num_prompts} prompts, {WIDTH}x{HEIGHT} px = latent {WIDTH // 2}x{HEIGHT // 2}, 7 windows "
                     f"of 16x16 latent px stride {STRIDE}, {STEPS} DDIM steps, guidance {GUIDANCE}, seeds "
                     f"{seed}..{seed + num_prompts - 1}]")
        lines.append(
            f"{head}: seam ratio at the 32-px tile boundaries (1 = no seam): 4 independent toy-sd tiles side by side "
            f"{base.seam:.2f} | SyncTweedies (case 2) {st.seam:.2f}, its latent canvas g(X_0) decoded whole "
            f"{st.canvas_seam:.2f} [per image: tiles {min(base.seams):.2f}-{max(base.seams):.2f}, case 2 "
            f"{min(st.seams):.2f}-{max(st.seams):.2f}]; toy-clip reads the prompt's object colour: tiles "
            f"{base.object:.3f} ({base.windows}) | SyncTweedies windows {st.object:.3f} ({st.windows}); background "
            f"colour {base.background:.3f} | {st.background:.3f} (chance 0.125) [{st.seconds / num_prompts:.1f} s "
            f"per wide image, {base.seconds / num_prompts:.1f} s per 4 tiles, {torch.get_num_threads()} thread(s)]")
        if "case0" in res:
            c0 = res["case0"]
            lines.append(f"synctweedies wide image ablation (caption alone): the same app with --case_num 0 (windows "
                         f"averaged, never synchronised): {c0.fmt()}, canvas decoded whole {c0.canvas_seam:.2f} | "
                         f"case 2: {st.fmt()}, canvas {st.canvas_seam:.2f}")
    for line in lines:
        print(line, flush=True)
    return lines


def weights_line() -> str:
    """Which toy-sd UNet was measured (its file's size and modification time)."""
    from datetime import datetime, timezone

    from common.toyworld.judge import TOY_SD_DIR

    f = TOY_SD_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    if not f.exists():
        return f"toy-sd UNet missing: {f}"
    st = f.stat()
    when = datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat(timespec="seconds")
    return f"toy-sd UNet: {f} ({st.st_size:,} bytes, modified {when})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_prompts", type=int, default=16, help="wide images (one prompt and seed each)")
    p.add_argument("--seed", type=int, default=0, help="first seed (prompt i uses seed + i)")
    p.add_argument("--no_ablation", action="store_true", help="skip the --case_num 0 ablation")
    p.add_argument("--no_shipped_prefix", action="store_true", help="skip the line of the app as shipped (with its "
                   "'Best quality, extremely detailed ' prompt prefix)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (tiny models: 1 is fastest)")
    args = p.parse_args()
    from common.toyworld.judge import weights_available

    if args.threads:
        torch.set_num_threads(args.threads)
    if not weights_available():
        print("toy-world weights missing in assets/toyworld: train them with scripts/train_toyworld.py")
        return
    print(weights_line())
    synctweedies_lines(num_prompts=args.num_prompts, seed=args.seed, ablation=not args.no_ablation,
                       prefixes=(False,) if args.no_shipped_prefix else (False, True))


if __name__ == "__main__":
    main()
