"""The shared adapter seam finds Custom Diffusion concepts through the entry point and applies them anywhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UsageError
from common.models.adapters import adapter_kinds, apply_adapters
from common.models.tiny import build_tiny
from customdiffusion.formats import save, save_diffusers


def test_entry_point_registers_customdiffusion():
    assert "customdiffusion" in adapter_kinds()


@pytest.mark.parametrize("layout", ["diffusers", "delta"])
def test_apply_adapters_writes_the_concept_into_the_pipeline(tmp_path, concept, layout):
    pipe = build_tiny("tiny-sd")
    weights = concept(pipe)
    path = tmp_path / "concept"
    if layout == "diffusers":
        save_diffusers(weights, path)
    else:
        path = save(weights, tmp_path / "delta.safetensors", fmt="delta")
    assert apply_adapters(pipe, [path]) == ["customdiffusion"]
    params = dict(pipe.unet.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in weights.unet.items())
    assert pipe.tokenizer.convert_tokens_to_ids("<new1>") == 49408


def test_unknown_adapter_is_one_clear_line(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(UsageError, match="not a trained adapter of a known kind"):
        apply_adapters(build_tiny("tiny-sd"), [junk])
    with pytest.raises(UsageError, match="does not exist"):
        apply_adapters(build_tiny("tiny-sd"), [tmp_path / "missing"])


def test_plain_sampler_runs_with_a_concept(tmp_path, concept):
    from common.sample import main

    save_diffusers(concept(build_tiny("tiny-sd"), scale=1.0), tmp_path / "concept")
    base = ["--model", "tiny-sd", "--prompt", "a <new1> toy", "--num_inference_steps", "2"]
    main([*base, "--output", str(tmp_path / "plain.png")])
    main([*base, "--output", str(tmp_path / "concept.png"), "--adapters", str(tmp_path / "concept")])
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "concept"))
    assert a.shape == b.shape and not np.array_equal(a, b)
