"""toy-clip as a judge: the eval FeatureExtractor (`--clip toy-clip`) and zero-shot colour / shape reading.

Zero-shot reading follows CLIP's recipe: an image gets the candidate caption with the highest cosine. To read
an attribute (the colour, say) the candidates differ in that attribute only, the rest of the caption being
the truth ("a {c} circle on a blue background" for every colour c), so each attribute is measured on its own.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from common.eval.extractor import CLIP_MEAN, CLIP_STD, FeatureExtractor, Preprocess
from common.toyworld.scenes import BASE_SHAPES, COLORS, IMAGE_SIZE, Scene, caption_of, single_object_scene

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "toyworld"
TOY_CLIP_DIR = ASSETS / "toy-clip"
TOY_SD_DIR = ASSETS / "toy-sd"
TOY_CLIP_PREPROCESS = Preprocess(IMAGE_SIZE, IMAGE_SIZE, CLIP_MEAN, CLIP_STD)


def weights_available() -> bool:
    """True when the trained toy-clip and toy-sd weights are in assets/toyworld."""
    return (TOY_CLIP_DIR / "config.json").exists() and (TOY_SD_DIR / "model_index.json").exists()


@functools.lru_cache(maxsize=2)
def _load_clip_model(path: str):
    from transformers import CLIPModel

    from common.errors import UsageError

    if not os.path.isdir(path):
        raise UsageError(f"toy-clip weights not found in {path}: train them with scripts/train_toyworld.py "
                         "(see assets/toyworld/MODEL_CARD.md)")
    return CLIPModel.from_pretrained(path, dtype=torch.float32).eval()


def load_toy_clip(path: str | os.PathLike | None = None):
    """The trained toy-clip `CLIPModel` (float32, eval mode; cached per path)."""
    return _load_clip_model(str(path or TOY_CLIP_DIR))


def toy_clip_extractor(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, batch_size: int = 64) -> FeatureExtractor:
    """toy-clip wrapped like the real CLIP backbones (image and text features, 32 px CLIP-normalised input)."""
    from common.eval.extractor import weights_tag
    from common.toyworld.data import toy_tokenizer

    model = load_toy_clip(path).to(device=device, dtype=dtype)
    dev = torch.device(device)

    def text_fn(texts: list[str]) -> torch.Tensor:
        ids = toy_tokenizer()(texts, padding="longest", truncation=True, max_length=77, return_tensors="pt")
        return model.get_text_features(input_ids=ids.input_ids.to(dev), attention_mask=ids.attention_mask.to(dev))

    def image_fn(pixels: torch.Tensor) -> torch.Tensor:
        return model.get_image_features(pixel_values=pixels)

    name = f"toy-clip:{weights_tag(Path(path or TOY_CLIP_DIR))}"
    return FeatureExtractor(name, TOY_CLIP_PREPROCESS, _features(image_fn), _features(text_fn), device=dev,
                            dtype=dtype, batch_size=batch_size, module=model)


def _features(fn):
    """transformers 5 may return a model output instead of a tensor from get_*_features: take the embeds."""

    def call(x):
        out = fn(x)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return call


# ---------------------------------------------------------------------------------------------- zero-shot reading


def read_choice(extractor: FeatureExtractor, images: Sequence[Image.Image], candidates: Sequence[Sequence[str]]
                ) -> torch.Tensor:
    """images: N; candidates: N lists of K captions -> [N] index of the best caption for each image."""
    img = torch.nn.functional.normalize(extractor.encode_images(list(images)), dim=-1)
    flat = [c for cands in candidates for c in cands]
    txt = torch.nn.functional.normalize(extractor.encode_texts(flat), dim=-1)
    k = len(candidates[0])
    scores = torch.einsum("nd,nkd->nk", img, txt.view(len(images), k, -1))
    return scores.argmax(-1)


def colour_candidates(scene: Scene, obj: int = 0) -> list[str]:
    """Captions of `scene` with object `obj`'s colour swapped for every colour (the true one included)."""
    from dataclasses import replace

    out = []
    for c in COLORS:
        objs = tuple(replace(o, color=c) if i == obj else o for i, o in enumerate(scene.objects))
        out.append(caption_of(objs, scene.background))
    return out


def shape_candidates(scene: Scene, shapes: Sequence[str] = BASE_SHAPES, obj: int = 0) -> list[str]:
    """Captions of `scene` with object `obj`'s shape swapped for each of `shapes`."""
    from dataclasses import replace

    out = []
    for s in shapes:
        objs = tuple(replace(o, shape=s) if i == obj else o for i, o in enumerate(scene.objects))
        out.append(caption_of(objs, scene.background))
    return out


def attribute_accuracy(extractor: FeatureExtractor, images: Sequence[Image.Image], scenes: Sequence[Scene],
                       shapes: Sequence[str] = BASE_SHAPES) -> dict[str, torch.Tensor]:
    """Per image: {"color": [N] bool, "shape": [N] bool, "both": [N] bool} — object 0 read right by toy-clip.

    `scenes[i]` is what image i should show (the prompt's scene for generated images).
    """
    colors = list(COLORS)
    col = read_choice(extractor, images, [colour_candidates(s) for s in scenes])
    shp = read_choice(extractor, images, [shape_candidates(s, shapes) for s in scenes])
    col_ok = col == torch.tensor([colors.index(s.objects[0].color) for s in scenes])
    shp_ok = shp == torch.tensor([list(shapes).index(s.objects[0].shape) for s in scenes])
    return {"color": col_ok, "shape": shp_ok, "both": col_ok & shp_ok}


def held_in_scenes(shapes: Sequence[str] = BASE_SHAPES) -> list[Scene]:
    """Every large centred single-object scene: shape x colour x background (background != colour)."""
    return [single_object_scene(s, c, b) for s in shapes for c in COLORS for b in COLORS if b != c]


def eval_scenes(n: int = 400, seed: int = 1) -> list[Scene]:
    """`n` single-object scenes drawn like the training data (any size and position) but from another dataset
    seed: held-in colours and shapes, unseen pictures."""
    from common.toyworld.scenes import make_scene

    out, i = [], 0
    while len(out) < n:
        scene = make_scene(i, seed, two_object_prob=0.0)
        out.append(scene)
        i += 1
    return out


def prompt_scenes(every: int = 1) -> list[Scene]:
    """The prompts toy-sd is judged on: held-in scenes (every `every`-th, a fixed spread over the grid)."""
    return held_in_scenes()[::every]


@torch.no_grad()
def generate_scenes(pipe, scenes: Sequence[Scene], *, seed: int = 0, num_inference_steps: int = 20,
                    guidance_scale: float = 4.0, batch_size: int = 32, prompts: Sequence[str] | None = None
                    ) -> list[Image.Image]:
    """One toy-sd sample per scene (prompt = the scene's short caption unless `prompts` is given); the noise of
    sample i depends only on (seed, i), so a subset of prompts gives the same images as the full run."""
    prompts = list(prompts) if prompts is not None else [caption_of(s.objects, s.background) for s in scenes]
    size = pipe.unet.config.sample_size
    channels = pipe.unet.config.in_channels
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        latents = torch.stack([
            torch.randn(channels, size, size, generator=torch.Generator().manual_seed(seed * 100_003 + start + i))
            for i in range(len(chunk))
        ]).to(pipe.device, pipe.unet.dtype)
        out = pipe(chunk, latents=latents, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   output_type="pil")
        images.extend(out.images)
    return images


def prompt_accuracy(pipe, extractor: FeatureExtractor, scenes: Sequence[Scene], **kwargs) -> dict[str, float]:
    """Fraction of toy-sd samples toy-clip reads as the prompt's colour, shape, and both (see `generate_scenes`)."""
    images = generate_scenes(pipe, scenes, **kwargs)
    acc = attribute_accuracy(extractor, images, scenes)
    return {k: v.float().mean().item() for k, v in acc.items()}


# ------------------------------------------------------------------------------------------ personalisation


def concept_scenes(shape: str, color: str, background: str) -> list[Scene]:
    """Four reference pictures of one concept (a held-out `shape` in `color` on `background`), as a user's
    photos would vary: large centred, small centred, small on the left, small on the right."""
    return [single_object_scene(shape, color, background),
            single_object_scene(shape, color, background, size="small"),
            single_object_scene(shape, color, background, size="small", position="left"),
            single_object_scene(shape, color, background, size="small", position="right")]
