"""On-disk cache of reference-image features, keyed by (file content hash, backbone, preprocessing).

Reference sets are scored against every evaluation run (and, in multi-concept benchmarks, against several
combinations), so their features are computed once. The key uses the file's bytes, not its path: a moved file
still hits, an edited file misses.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from common.errors import UsageError
from common.eval.extractor import FeatureExtractor
from common.io import atomic_write_text, load_weights, save_weights

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "customization_suite" / "eval_features"


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        raise UsageError(f"image not found: {path}; check the path") from None


class FeatureCache:
    """`root/<hash of extractor.key>/<file sha256>.safetensors` holding one [D] row each.

    `encode(extractor, paths)` returns [N, D] like `extractor.encode_images`, calling the backbone only for
    files not cached yet; `hits`/`misses` count what happened (for tests and logs).
    """

    def __init__(self, root: str | os.PathLike = DEFAULT_CACHE) -> None:
        self.root = Path(os.path.expanduser(root))
        self.hits = 0
        self.misses = 0

    def folder(self, extractor: FeatureExtractor) -> Path:
        folder = self.root / hashlib.sha256(extractor.key.encode()).hexdigest()[:20]
        if not (folder / "key.txt").exists():
            atomic_write_text(folder / "key.txt", extractor.key + "\n")
        return folder

    def encode(
        self, extractor: FeatureExtractor, paths: Sequence[str | os.PathLike], *, progress: bool = False
    ) -> torch.Tensor:
        """N image files -> [N, D] float32, from the cache where possible."""
        folder = self.folder(extractor)
        hashes = [file_hash(p) for p in paths]
        rows: dict[str, torch.Tensor] = {}
        todo: list[int] = []
        for i, h in enumerate(hashes):
            if h in rows:
                continue
            entry = folder / f"{h}.safetensors"
            if entry.exists():
                try:
                    rows[h] = load_weights(entry)["features"]
                    self.hits += 1
                    continue
                except (UsageError, KeyError):
                    pass  # a corrupt entry is recomputed and overwritten
            rows[h] = None  # type: ignore[assignment]
            todo.append(i)
        if todo:
            self.misses += len(todo)
            feats = extractor.encode_images([paths[i] for i in todo], progress=progress, desc=f"{extractor.name} refs")
            for i, f in zip(todo, feats):
                rows[hashes[i]] = f.clone()
                save_weights({"features": f.clone()}, folder / f"{hashes[i]}.safetensors")
        return torch.stack([rows[h] for h in hashes]) if hashes else torch.zeros(0, 0)
