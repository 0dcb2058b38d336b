"""Shared fixtures: tiny models built once per session, saved with save_pretrained and loaded back
through the real loading path (common.models.loading), with the hub switched off."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are dominated by per-op overhead: one thread per process is faster than two on a 2-core CI
# machine and stops the multi-process (torchrun) tests from oversubscribing it. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_accelerate_state():
    """Fresh accelerate singletons for an in-process training run, as a new process would have; none leak."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict[str, str]:
    """Tiny presets saved to disk once: name -> folder loadable with from_pretrained."""
    from common.models.tiny import BUILDERS, build_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    folders = {}
    for name in BUILDERS:
        folder = root / name
        build_tiny(name).save_pretrained(folder)
        folders[name] = str(folder)
    return folders


@pytest.fixture
def load_tiny(tiny_folders):
    """Load a fresh copy of a tiny pipeline from its saved folder (so tests may mutate it)."""
    from common.models.loading import load_pipeline

    def _load(name: str, **kwargs):
        pipe = load_pipeline(tiny_folders[name], **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return _load
