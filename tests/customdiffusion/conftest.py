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


def tokens_only(pipe, weights):
    """The same concept with the base model's K/V: its modifier tokens are added, nothing else changes.

    The reference for "the concept changes the images": a run with this differs from one with `weights` only
    through the K/V, so the comparison fails if the trained K/V are never applied.
    """
    from customdiffusion.formats import CustomDiffusionWeights

    params = dict(pipe.unet.named_parameters())
    return CustomDiffusionWeights({n: params[n].detach().clone() for n in weights.unet}, dict(weights.tokens))


def run_cli(main, argv, capsys):
    """Run an entry point as its script does (`common.cli.run`): returns (exit code, stderr lines)."""
    from common.cli import run

    capsys.readouterr()
    try:
        run(main, argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.splitlines()


def snapshot(folder):
    """{relative path: bytes} of every file under `folder` (to prove an earlier result was not touched)."""
    from pathlib import Path

    root = Path(folder)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(name="tokens_only")
def _tokens_only_fixture():
    return tokens_only


@pytest.fixture(name="cli")
def _cli_fixture(capsys):
    """cli(main, argv) -> (exit code, stderr lines), as the script would exit."""
    return lambda main, argv: run_cli(main, argv, capsys)


@pytest.fixture(name="snapshot")
def _snapshot_fixture():
    return snapshot
