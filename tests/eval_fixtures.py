"""Small benchmark and sample trees written by the eval tests themselves (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def random_image(path: Path, seed: int, size: tuple[int, int] = (64, 48), shift: float = 0.0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.integers(0, 256, (size[1], size[0], 3)) + shift, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_customconcept101(root: Path) -> Path:
    """Two concepts (pet_cat1 with 3 refs, furniture_chair1 with 2), one pair, `{}` and `{0}/{1}` prompts."""
    for i in range(3):
        random_image(root / "benchmark_dataset" / "pet_cat1" / f"{i}.jpg", 100 + i)
    for i in range(2):
        random_image(root / "benchmark_dataset" / "furniture_chair1" / f"{i}.png", 200 + i)
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "prompts" / "cat.txt").write_text("photo of a {}\n{} in the snow\n\n")
    (root / "prompts" / "chair.txt").write_text("a {} in a garden\n")
    (root / "prompts" / "pet_furniture.txt").write_text("{0} sitting on {1}\n{1} next to {0} on the beach\n")
    cat = {"instance_prompt": "photo of a <new1> cat", "class_prompt": "cat",
           "instance_data_dir": "./benchmark_dataset/pet_cat1", "class_data_dir": "./regularization/cat",
           "prompt_filename": "prompts/cat.txt"}
    chair = {"instance_prompt": "photo of a <new2> chair", "class_prompt": "chair",
             "instance_data_dir": "./benchmark_dataset/furniture_chair1", "class_data_dir": "./regularization/chair",
             "prompt_filename": "prompts/chair.txt"}
    (root / "dataset.json").write_text(json.dumps([cat, chair]))
    (root / "dataset_multiconcept.json").write_text(
        json.dumps([[cat, chair, {"prompt_filename_compose": "prompts/pet_furniture.txt"}]]))
    return root


def write_dreambench(root: Path) -> Path:
    data = root / "dataset"
    for subject in ("dog", "backpack"):
        for i in range(2):
            random_image(data / subject / f"{i:02d}.jpg", hash(subject) % 1000 + i)
    (data / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\nbackpack,backpack\ndog,dog\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token),\n"
        "'a {0} {1} in the snow'.format(unique_token, class_token),\n]\n\nLive Subject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token),\n"
        "'a {0} {1} wearing a red hat'.format(unique_token, class_token),\n"
        "'a {0} {1} swimming'.format(unique_token, class_token),\n]\n")
    return root


def write_samples(folder: Path, prompts: list[str], per_prompt: int = 2, seed: int = 0, samples_dir: bool = True) -> list[Path]:
    """`folder/samples/<k>.png` + `folder/prompts.json` {stem: prompt}."""
    image_dir = folder / "samples" if samples_dir else folder
    table, paths = {}, []
    for p_i, prompt in enumerate(prompts):
        for s in range(per_prompt):
            stem = f"{p_i:03d}_{s}"
            paths.append(random_image(image_dir / f"{stem}.png", seed * 1000 + p_i * 10 + s))
            table[stem] = prompt
    (folder / "prompts.json").write_text(json.dumps(table))
    return paths
