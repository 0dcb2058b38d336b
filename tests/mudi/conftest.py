"""Fixtures for the MuDI tests: synthetic multi-subject data (mudi_helpers) and tiny pipelines built once per module."""
from __future__ import annotations

import pytest

from mudi_helpers import make_dataset


@pytest.fixture
def dataset_dir(tmp_path):
    return make_dataset(tmp_path / "data")


@pytest.fixture
def make_data(tmp_path):
    def _make(name="data", **kw):
        return make_dataset(tmp_path / name, **kw)

    return _make


@pytest.fixture(scope="module")
def tiny_pipe():
    """Tiny pipelines built once per module by name (build only what a module uses)."""
    from common.models.loading import load_pipeline

    cache = {}

    def _get(name: str):
        if name not in cache:
            cache[name] = load_pipeline(name)
            cache[name].set_progress_bar_config(disable=True)
        return cache[name]

    return _get
