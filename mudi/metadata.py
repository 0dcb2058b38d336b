"""MuDI's `metadata.jsonl` / `class_metadata.jsonl`: line 1 maps ids to placeholder phrases, then one line per image.

    {"id": {"a": "olis harry potter toy", "b": "hta corgi"}}
    {"id": "a", "file_name": "a00.jpg", "mask_path": "mask_a00.jpg", "text": "A photo of a olis harry potter toy ..."}

Paths are relative to the folder. The original stops reading silently at the first line that is not JSON;
we ignore only an unparsable *last* line (an interrupted write) and refuse one in the middle, and every
other mistake (a missing image or mask, an id absent from the map) is a one-line UsageError.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from common.errors import UsageError

METADATA_FILE = "metadata.jsonl"
CLASS_METADATA_FILE = "class_metadata.jsonl"


@dataclass(frozen=True)
class Record:
    """One training image of subject `id` with its mask and caption (absolute paths)."""

    id: str
    image: Path
    mask: Path
    text: str


@dataclass(frozen=True)
class Metadata:
    """`id_map`: id -> placeholder phrase (insertion order kept); `records` in file order."""

    folder: Path
    id_map: dict[str, str]
    records: tuple[Record, ...]

    @property
    def ids(self) -> list[str]:
        return list(self.id_map)

    def by_id(self) -> dict[str, list[Record]]:
        """Records grouped per id (ids with no image are absent)."""
        groups: dict[str, list[Record]] = {}
        for r in self.records:
            groups.setdefault(r.id, []).append(r)
        return groups


def _parse_lines(path: Path) -> list[tuple[int, dict]]:
    lines = [(n, s) for n, s in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1) if s.strip()]
    rows = []
    for k, (lineno, text) in enumerate(lines):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            if k == len(lines) - 1 and k > 0:
                warnings.warn(f"{path}:{lineno}: ignoring an unparsable last line ({e.msg})", stacklevel=3)
                break
            raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


def read_metadata(folder: str | os.PathLike, filename: str = METADATA_FILE, *, need_masks: bool = True) -> Metadata:
    """Parse `folder/filename`; every image (and mask, when `need_masks`) must exist and every id be in the map."""
    folder = Path(folder)
    path = folder / filename
    if not path.is_file():
        raise UsageError(
            f"no {filename} in {folder}; its first line maps ids to phrases, e.g. "
            '{"id": {"a": "olis harry potter toy", "b": "hta corgi"}}, then one line per image'
        )
    rows = _parse_lines(path)
    if not rows or not isinstance(rows[0][1].get("id"), dict):
        raise UsageError(f'{path}:1: the first line must map ids to phrases, e.g. {{"id": {{"a": "olis toy"}}}}')
    id_map = {str(k): str(v) for k, v in rows[0][1]["id"].items()}
    if not id_map:
        raise UsageError(f"{path}:1: the id map is empty")
    records = []
    for lineno, row in rows[1:]:
        where = f"{path}:{lineno}"
        ident = row.get("id")
        if ident not in id_map:
            raise UsageError(f"{where}: id {ident!r} is not in the id map of line 1 ({', '.join(id_map)})")
        for key in ("file_name", "text") + (("mask_path",) if need_masks else ()):
            if not isinstance(row.get(key), str):
                raise UsageError(f'{where}: missing "{key}"')
        image = folder / row["file_name"]
        if not image.is_file():
            raise UsageError(f"{where}: image not found: {image}")
        mask = folder / row.get("mask_path", "")
        if need_masks and not mask.is_file():
            raise UsageError(f"{where}: mask not found: {mask}")
        records.append(Record(ident, image, mask, row["text"]))
    if not records:
        raise UsageError(f"{path} lists no images; add one line per image after the id map")
    return Metadata(folder, id_map, tuple(records))


def write_class_metadata(folder: str | os.PathLike, id_map: dict[str, str], entries: list[dict[str, str]]) -> Path:
    """Write `class_metadata.jsonl` atomically (the original leaves this file to the user)."""
    from common.io import atomic_write_text

    lines = [json.dumps({"id": id_map}, ensure_ascii=False)]
    lines += [json.dumps(e, ensure_ascii=False) for e in entries]
    out = Path(folder) / CLASS_METADATA_FILE
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
