"""Toy-world fixtures: the committed trained models, loaded once per session through the real loading paths.

Tests that need them skip, saying why, while assets/toyworld holds no trained weights.
"""
from __future__ import annotations

import pytest
import torch

from common.toyworld.judge import TOY_CLIP_DIR, TOY_SD_DIR, weights_available


@pytest.fixture(scope="session")
def _weights() -> None:
    if not weights_available():
        pytest.skip(f"toy-world weights not trained yet ({TOY_CLIP_DIR}, {TOY_SD_DIR}): run "
                    "scripts/train_toyworld.py as assets/toyworld/MODEL_CARD.md says")


@pytest.fixture(scope="session")
def toy_clip(_weights):
    """toy-clip as the eval code sees it: `load_clip("toy-clip")` (a FeatureExtractor)."""
    from common.eval.clip import load_clip

    return load_clip("toy-clip")


@pytest.fixture(scope="session")
def toy_sd(_weights):
    """toy-sd through the preset: `load_pipeline("toy-sd")` (float32 on the CPU)."""
    from common.models.loading import load_pipeline

    pipe = load_pipeline("toy-sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is fastest, and on a busy machine several threads per process stall
    (a 30-step sample took 42 s with 2 threads on a loaded 2-core box, 2.3 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
