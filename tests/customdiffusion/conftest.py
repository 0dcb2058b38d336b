"""Fixtures for the Custom Diffusion tests: fresh tiny pipelines (built in code, ~0.2 s each) and a fake
fine-tuned concept (base K/V plus a seeded perturbation, one modifier token)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tiny():
    from common.models.loading import load_pipeline

    def _load(name: str = "tiny-sd"):
        pipe = load_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return _load


def fake_concept(pipe, seed: int = 0, tokens=("<new1>",), scale: float = 0.2, freeze_model: str = "crossattn_kv"):
    """A concept for `pipe`: every trained weight perturbed, one random embedding per token and encoder."""
    from common.models.tokens import text_pairs
    from customdiffusion.attention import trained_param_names
    from customdiffusion.formats import CustomDiffusionWeights

    gen = torch.Generator().manual_seed(seed)
    params = dict(pipe.unet.named_parameters())
    unet = {n: params[n].detach() + scale * torch.randn(params[n].shape, generator=gen)
            for n in trained_param_names(pipe.unet, freeze_model)}
    dims = [enc.get_input_embeddings().weight.shape[1] for _, enc in text_pairs(pipe)]
    toks = {t: [torch.randn(d, generator=gen) for d in dims] for t in tokens}
    return CustomDiffusionWeights(unet, toks)


@pytest.fixture
def concept():
    return fake_concept
