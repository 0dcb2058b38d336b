"""The toy-world effect tests assert on the very measurement code whose figures MODEL_CARD.md prints:
`benchmarks/toyworld_<method>.py`, loaded from its file (benchmarks/ is not a package)."""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


@functools.cache
def load_benchmark(method: str) -> ModuleType:
    """benchmarks/toyworld_<method>.py as the module `toyworld_<method>` (registered before it runs: its
    dataclasses look their module up)."""
    name = f"toyworld_{method}"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
