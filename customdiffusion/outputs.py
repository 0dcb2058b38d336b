"""Where Custom Diffusion's scripts write, so that no earlier result is replaced or mixed silently.

* `claim_run_dir`: a new numbered folder (`sample-001`, `sample-002`, ...) taken atomically (mkdir), the
  default of the sampler -- two runs never share one;
* `refuse_existing`: an explicit output that already holds something is refused unless `--overwrite`;
* `SampleRecord`: the sample folder's `prompts.json` ({image stem: prompt}, CustomConcept101's layout),
  rewritten atomically after every image, so an interrupted run leaves each written image with its record;
* `check_in_step`: images and records must match one to one before a folder is scored.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from common.data import IMAGE_EXTENSIONS
from common.errors import UsageError
from common.io import atomic_write_json

PROMPTS_FILE = "prompts.json"
SAMPLES_DIR = "samples"


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when `a` and `b` name the same file or folder (symlinks and hard links included)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def claim_run_dir(base: str | os.PathLike, prefix: str = "sample-") -> Path:
    """Create and return `base/<prefix>NNN`, one past the highest number there (never an existing folder)."""
    base = Path(base)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create output folder {base}: {err.strerror or err}") from None
    taken = [int(p.name[len(prefix):]) for p in base.iterdir() if p.name.startswith(prefix)
             and p.name[len(prefix):].isdigit()]
    n = max(taken, default=0) + 1
    while True:
        run = base / f"{prefix}{n:03d}"
        try:
            run.mkdir()
            return run
        except FileExistsError:
            n += 1  # another run took it first
        except OSError as err:
            raise UsageError(f"cannot create output folder {run}: {err.strerror or err}") from None


def refuse_existing(path: str | os.PathLike, overwrite: bool, what: str = "output") -> None:
    """Refuse an output path that exists (a file, or a folder with anything in it) unless `overwrite`."""
    path = Path(path)
    if overwrite or not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise UsageError(f"{what} {path} already exists; pass --overwrite to replace it, or choose another path")


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def holds_samples(folder: str | os.PathLike) -> bool:
    """Whether `folder` already holds a sample run (a prompts.json or images in samples/)."""
    folder = Path(folder)
    return (folder / PROMPTS_FILE).exists() or bool(_image_files(folder / SAMPLES_DIR))


class SampleRecord:
    """The images of one sample folder and their prompts, kept in step on disk.

    `start(overwrite)` refuses a folder that already holds samples (or, with overwrite, removes the old record
    first and then the old images, so no stale image keeps a record); `add(path, prompt)` is called after each
    image is written and rewrites prompts.json atomically.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.entries: dict[str, str] = {}

    @property
    def path(self) -> Path:
        return self.folder / PROMPTS_FILE

    def start(self, overwrite: bool = False) -> None:
        if holds_samples(self.folder):
            if not overwrite:
                raise UsageError(f"{self.folder} already holds samples ({PROMPTS_FILE} or {SAMPLES_DIR}/); pass "
                                 "--overwrite to replace them, or leave --outdir out for a new numbered folder")
            self.path.unlink(missing_ok=True)
            for old in _image_files(self.folder / SAMPLES_DIR):
                old.unlink()
        try:
            (self.folder / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {})
        except OSError as err:
            raise UsageError(f"cannot write to {self.folder}: {err.strerror or err}") from None

    def add(self, image: Path, prompt: str) -> None:
        self.entries[image.stem] = prompt
        atomic_write_json(self.path, self.entries)


def read_record(folder: str | os.PathLike) -> dict[str, str] | None:
    """The folder's {image stem: prompt} table, or None when it has none (or an unreadable one)."""
    path = Path(folder) / PROMPTS_FILE
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return table if isinstance(table, dict) else None


def check_in_step(folder: str | os.PathLike) -> None:
    """Every image has a record and every record an image (images in `samples/` or the folder itself)."""
    folder = Path(folder)
    table = read_record(folder)
    if table is None:
        raise UsageError(f"{folder / PROMPTS_FILE} is missing or not a JSON object {{image name: prompt}}")
    image_dir = folder / SAMPLES_DIR if (folder / SAMPLES_DIR).is_dir() else folder
    images = _image_files(image_dir)
    names = {p.name for p in images} | {p.stem for p in images}
    orphans = [k for k in table if k not in names]
    unrecorded = [p.name for p in images if p.name not in table and p.stem not in table]
    problems: Iterable[str] = [
        *([f"{len(orphans)} prompt record(s) without an image (e.g. {orphans[0]})"] if orphans else []),
        *([f"{len(unrecorded)} image(s) without a prompt record (e.g. {unrecorded[0]})"] if unrecorded else []),
    ]
    problems = list(problems)
    if problems:
        raise UsageError(f"{folder}: images and {PROMPTS_FILE} are out of step: {'; '.join(problems)}; the sampling "
                         "run was interrupted or mixed with another -- sample again with --overwrite")
