"""Which reference images go with which entity word: `--ref word=a.jpg[,b.jpg]`, the original's two flags and its
"file stem is the entity word" folder convention (`cat.jpg`; here also `cat/` holding several images).
Every mistake is one line: a word missing from the prompt, two references sharing a word, an unreadable image."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from common.data import list_images, load_rgb
from common.errors import UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class Reference:
    """One object: its entity word and its image files (several are averaged after projection)."""

    word: str
    paths: list[Path]

    def images(self) -> list[Image.Image]:
        return [load_rgb(p) for p in self.paths]


def parse_pair(text: str, flag: str) -> tuple[str, str]:
    word, sep, value = text.partition("=")
    if not sep or not word.strip() or not value.strip():
        raise UsageError(f"{flag} takes WORD=PATH, got {text!r}")
    return word.strip(), value.strip()


def from_flags(refs: Sequence[str] = (), paths: Sequence[str | None] = (), folder: str | None = None
               ) -> list[Reference]:
    """References from `--ref word=p1[,p2]`, the original's `--reference_image{1,2}_path` (stem = word) and a
    `--ref_dir` folder (image stems, or sub-folders, are the words), in that order."""
    out: list[Reference] = []
    for text in refs:
        word, value = parse_pair(text, "--ref")
        out.append(Reference(word, [Path(p) for p in value.split(",") if p]))
    for p in paths:
        if p:  # inference.py: the file name up to its first '.' is the word
            out.append(Reference(Path(p).name.split(".")[0], [Path(p)]))
    if folder:
        root = Path(folder)
        if not root.is_dir():
            raise UsageError(f"--ref_dir {root} is not a folder")
        for entry in sorted(root.iterdir()):
            if entry.is_dir():
                imgs = list_images(entry)
                if imgs:
                    out.append(Reference(entry.name, list(imgs)))
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                out.append(Reference(entry.stem, [entry]))
    return out


def word_in_prompt(word: str, prompt: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", prompt.lower()) is not None


def check(references: Sequence[Reference], prompt: str) -> None:
    """At least one reference; distinct words, each in the prompt; every image readable."""
    if not references:
        raise UsageError("no reference images: pass --ref WORD=PATH (or --reference_image1_path / --ref_dir)")
    seen: dict[str, Reference] = {}
    for ref in references:
        key = ref.word.lower()
        if key in seen:
            raise UsageError(f"two references share the word {ref.word!r} ({seen[key].paths[0]} and "
                             f"{ref.paths[0]}); give one --ref {ref.word}=a.jpg,b.jpg for several images of one object")
        seen[key] = ref
        if not word_in_prompt(ref.word, prompt):
            raise UsageError(f"the entity word {ref.word!r} (of {ref.paths[0]}) is not in the prompt {prompt!r}; "
                             "name each reference's object in the prompt (the file stem is the word)")
        if not ref.paths:
            raise UsageError(f"--ref {ref.word}= names no image")
        for p in ref.paths:
            load_rgb(p)  # unreadable or missing: one line naming the file


def masks_for(references: Sequence[Reference], mask_flags: Sequence[str]) -> dict[str, Path]:
    """`--ref_mask word=mask.png` -> {word: path}; the word must be one of the references'."""
    words = {r.word.lower() for r in references}
    out = {}
    for text in mask_flags:
        word, value = parse_pair(text, "--ref_mask")
        if word.lower() not in words:
            raise UsageError(f"--ref_mask {word}=...: no reference has the word {word!r}")
        out[word.lower()] = Path(value)
    return out
