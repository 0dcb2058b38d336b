"""Sampling with a loaded concept: deterministic per seed, different from the base model, files written."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from common.errors import UsageError
from customdiffusion import formats as F
from customdiffusion.sample import main, sample_to_folder


def _run(pipe, concept, out):
    paths = sample_to_folder(pipe, concept, prompts=["a <new1> dog"], outdir=out, num_images=2, batch_size=2,
                             num_inference_steps=3, seed=7)
    return [np.asarray(Image.open(p)) for p in paths]


def test_sampling_deterministic_and_personalised(tiny, concept, tmp_path):
    w = concept(tiny(), scale=0.5)
    F.save(w, tmp_path / "delta.safetensors")
    a = _run(tiny(), tmp_path / "delta.safetensors", tmp_path / "a")
    b = _run(tiny(), tmp_path / "delta.safetensors", tmp_path / "b")
    base = _run(tiny(), None, tmp_path / "c")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, base))
    assert json.loads((tmp_path / "a" / "prompts.json").read_text()) == {"0": "a <new1> dog", "1": "a <new1> dog"}
    assert (tmp_path / "a" / "a-<new1>-dog.png").is_file()


def test_sample_cli(tiny, concept, tmp_path):
    F.save(concept(tiny("tiny-sdxl")), tmp_path / "xl", "diffusers")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <new1> cat\n")
    paths = main(["--ckpt", "tiny-sdxl", "--sdxl", "--delta_ckpt", str(tmp_path / "xl"), "--from-file", str(prompts),
                  "--batch_size", "1", "--num_images", "2", "--num_inference_steps", "2", "--device", "cpu"])
    assert len(paths) == 2 and all(p.parent == tmp_path / "xl" / "samples" for p in paths)
    with pytest.raises(UsageError, match="--prompt or --from-file"):
        main(["--ckpt", "tiny-sd"])


@pytest.mark.parametrize("module", ["sample", "merge", "convert", "compress"])
def test_help_lists_every_flag(module, capsys):
    import importlib

    mod = importlib.import_module(f"customdiffusion.{module}")
    parser = mod.build_parser()
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    text = capsys.readouterr().out
    for action in parser._actions:
        for opt in action.option_strings:
            assert opt in text
