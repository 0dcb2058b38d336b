"""Apps by name (threestudio-style): `@register_app("wide_image")` on an app's `run(args) -> dict`.

`get_app(name)` imports `synctweedies.apps.<name>` on first use (so `--help` and one app's run do not load
the others' dependencies) and returns the registered runner; a new app is a module with a decorated `run`
plus its parser in synctweedies/config.py.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Any, Callable

Runner = Callable[[argparse.Namespace], Any]
_APPS: dict[str, Runner] = {}


def register_app(name: str) -> Callable[[Runner], Runner]:
    """Decorator: register `run` under `name` (a name registered twice is a programming error)."""
    def decorate(run: Runner) -> Runner:
        if name in _APPS and _APPS[name] is not run:
            raise ValueError(f"app {name!r} is registered twice")
        _APPS[name] = run
        return run
    return decorate


def get_app(name: str) -> Runner:
    """The runner of app `name`, importing synctweedies.apps.<name> when it is not registered yet."""
    if name not in _APPS:
        importlib.import_module(f"synctweedies.apps.{name}")
    if name not in _APPS:
        raise KeyError(f"synctweedies.apps.{name} registers no app {name!r}")
    return _APPS[name]


def registered() -> tuple[str, ...]:
    return tuple(_APPS)
