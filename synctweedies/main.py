"""`python -m synctweedies --app ...` / scripts/sample_synctweedies.py: the original main.py interface."""
from __future__ import annotations

import sys
from typing import Any, Sequence

from common.cli import parse_args
from common.errors import UsageError
from synctweedies.config import APPS, PARSERS
from synctweedies.registry import get_app


def _print_all_help() -> None:
    print("usage: main.py --app {" + ",".join(APPS) + "} [flags]\n\nSyncTweedies: synchronized diffusion "
          "sampling. The flags of each app follow.\n")
    for app in APPS:
        print("=" * 100)
        PARSERS[app]().print_help()
        print()


def _app_of(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--app" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--app="):
            return a.split("=", 1)[1]
    return None


def main(argv: Sequence[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    app = _app_of(argv)
    if app is None and any(a in ("-h", "--help") for a in argv):
        _print_all_help()
        return None
    if app is None:
        if "--config" in argv or any(a.startswith("--config=") for a in argv):
            app = _app_from_config(argv)
        if app is None:
            raise UsageError(f"--app is required: one of {', '.join(APPS)} (see --help)")
        argv = ["--app", app, *argv]
    if app not in PARSERS:
        raise UsageError(f"unknown --app {app!r}: choose from {', '.join(APPS)}")
    args = parse_args(PARSERS[app](), argv)
    return get_app(app)(args)


def _app_from_config(argv: list[str]) -> str | None:
    import yaml

    path = next((argv[i + 1] for i, a in enumerate(argv) if a == "--config" and i + 1 < len(argv)), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError:
        raise UsageError(f"config file not found: {path}; check the --config path") from None
    return data.get("app") if isinstance(data, dict) else None
