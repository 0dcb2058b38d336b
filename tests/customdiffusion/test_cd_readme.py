"""README's "load it in diffusers" lines, run exactly as written (only model, folder, device, dtype and step
count swapped for the tiny ones) on a folder our trainer's save writes: diffusers ends with the concept."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from customdiffusion.apply import apply_customdiffusion
from customdiffusion.formats import save_diffusers

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- customdiffusion: load in diffusers -->"


def _snippet() -> str:
    text = README.read_text(encoding="utf-8")
    assert MARKER in text, "README lost its diffusers loading snippet"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.S)
    return block.group(1)


def test_readme_diffusers_loading_lines_work(tiny, concept, tmp_path):
    base = tiny()
    base.save_pretrained(tmp_path / "base")
    weights = concept(base)
    save_diffusers(weights, tmp_path / "cd_cat")  # the trainer's default output layout (.safetensors)
    code = _snippet()
    swaps = {'"CompVis/stable-diffusion-v1-4", "runs/cd_cat"': f'"{tmp_path / "base"}", "{tmp_path / "cd_cat"}"',
             'torch_dtype=torch.float16).to("cuda")': 'torch_dtype=torch.float32).to("cpu")',
             "num_inference_steps=100": "num_inference_steps=2"}
    for old, new in swaps.items():
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 -- our own README
    pipe = namespace["pipe"]
    assert namespace["image"].size == (64, 64)
    # diffusers' pipeline now computes what ours does with the concept applied
    ours = tiny()
    apply_customdiffusion(ours, tmp_path / "cd_cat")
    tok_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[tok_id], weights.tokens["<new1>"][0])
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        theirs_out = pipe.unet(x, 10, ctx).sample
        ours_out = ours.unet(x, 10, ctx).sample
        plain = tiny().unet(x, 10, ctx).sample
    assert (theirs_out - ours_out).abs().max() < 1e-5 and (theirs_out - plain).abs().max() > 1e-3
