"""Benchmark layouts (CustomConcept101, DreamBench) loaded into one typed description.

A `Benchmark` is a list of `Task`s; a task is what one folder of generated images is scored against: its
concepts (each with reference images and the words that name it) and its prompt templates. Templates use
`{}` (one concept) or `{0}`/`{1}` (two concepts; DreamBench: unique token, class word) placeholders, filled
by `Task.prompts(with_token=...)` — generation prompts keep the modifier tokens, the CLIP-T text of the
Custom Diffusion protocol drops them.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data import list_images
from common.errors import UsageError

TOKEN_RE = re.compile(r"<[^<>\s]+>")
DREAMBENCH_TOKEN = "sks"
DREAMBENCH_LIVE_CLASSES = ("cat", "dog")


@dataclass(frozen=True)
class Concept:
    """One subject: `name` (its folder), `class_word` ("barn"), optional modifier `token` ("<new1>")."""

    name: str
    class_word: str
    references: tuple[Path, ...]
    token: str | None = None

    def word(self, with_token: bool = True) -> str:
        return f"{self.token} {self.class_word}" if with_token and self.token else self.class_word


@dataclass(frozen=True)
class Task:
    """A unit of evaluation: concepts, prompt templates and how to fill them."""

    name: str
    index: int
    concepts: tuple[Concept, ...]
    templates: tuple[str, ...]
    slots: str = "concepts"  # "concepts": one word per concept; "token_class": DreamBench ({0}=token, {1}=class)

    def format_args(self, with_token: bool = True) -> tuple[str, ...]:
        if self.slots == "token_class":
            c = self.concepts[0]
            return ((c.token or "") if with_token else "", c.class_word)
        return tuple(c.word(with_token) for c in self.concepts)

    def prompts(self, with_token: bool = True) -> list[str]:
        """The filled templates, whitespace collapsed."""
        args = self.format_args(with_token)
        return [fill_prompt(t, args) for t in self.templates]


@dataclass(frozen=True)
class Benchmark:
    name: str
    root: Path
    tasks: tuple[Task, ...]

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise UsageError(f"{self.name} has no concept/combination named {name!r}; known: "
                         + ", ".join(t.name for t in self.tasks[:8]) + (", ..." if len(self.tasks) > 8 else ""))


def fill_prompt(template: str, words: tuple[str, ...] | list[str]) -> str:
    """'photo of a {} in snow' + ('<new1> cat',) -> 'photo of a <new1> cat in snow'; `{0}`/`{1}` by position."""
    try:
        text = template.format(*words)
    except (IndexError, KeyError, ValueError) as e:
        raise UsageError(f"cannot fill prompt template {template!r} with {list(words)}: {e}; "
                         "templates use {} or {0} {1} placeholders") from None
    return " ".join(text.split())


def strip_tokens(prompt: str) -> str:
    """Remove modifier tokens like `<new1>` (Custom Diffusion's CLIP-T text) and collapse whitespace."""
    return " ".join(TOKEN_RE.sub(" ", prompt).split())


# ------------------------------------------------------------------------------------------------ CustomConcept101


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"{path.name} not found in {path.parent}; is this the customconcept101/ folder?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def read_prompt_file(path: Path) -> tuple[str, ...]:
    """Non-empty lines of a prompt file."""
    if not path.is_file():
        raise UsageError(f"prompt file not found: {path}")
    lines = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not lines:
        raise UsageError(f"prompt file {path} is empty")
    return lines


def _cc101_concept(root: Path, entry: dict, where: str) -> Concept:
    for key in ("class_prompt", "instance_data_dir"):
        if not isinstance(entry.get(key), str):
            raise UsageError(f"{where}: missing {key!r}")
    folder = (root / entry["instance_data_dir"]).resolve()
    tokens = TOKEN_RE.findall(entry.get("instance_prompt", ""))
    return Concept(folder.name, entry["class_prompt"], tuple(list_images(folder)), tokens[0] if tokens else None)


def load_customconcept101(root: str | os.PathLike, multi: bool = False) -> Benchmark:
    """`root/dataset.json` (single) or `root/dataset_multiconcept.json` (pairs) with `prompts/*.txt` and
    `benchmark_dataset/<concept>/` images; paths in the JSON are relative to `root`."""
    root = Path(root)
    name = "dataset_multiconcept.json" if multi else "dataset.json"
    data = _read_json(root / name)
    if not isinstance(data, list) or not data:
        raise UsageError(f"{root / name} must be a non-empty JSON list")
    tasks = []
    for i, entry in enumerate(data):
        where = f"{name}[{i}]"
        if multi:
            if not (isinstance(entry, list) and len(entry) >= 3 and isinstance(entry[-1], dict)
                    and "prompt_filename_compose" in entry[-1]):
                raise UsageError(f"{where}: expected [concept, concept, {{prompt_filename_compose: ...}}]")
            concepts = tuple(_cc101_concept(root, c, where) for c in entry[:-1])
            templates = read_prompt_file(root / entry[-1]["prompt_filename_compose"])
            task_name = "+".join(c.name for c in concepts)
        else:
            if not isinstance(entry, dict) or "prompt_filename" not in entry:
                raise UsageError(f"{where}: expected a concept dict with 'prompt_filename'")
            concepts = (_cc101_concept(root, entry, where),)
            templates = read_prompt_file(root / entry["prompt_filename"])
            task_name = concepts[0].name
        tasks.append(Task(task_name, i, concepts, templates))
    return Benchmark("customconcept101-" + ("multi" if multi else "single"), root, tuple(tasks))


# ------------------------------------------------------------------------------------------------------ DreamBench


def _dreambench_prompts(text: str) -> tuple[dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """Parse DreamBooth's `dataset/prompts_and_classes.txt`: (subject -> class, object prompts, live prompts)."""
    classes: dict[str, str] = {}
    head, _, prompts = text.partition("Prompts")
    for line in head.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and all(parts) and parts != ["subject_name", "class"]:
            classes[parts[0]] = parts[1]
    obj, _, live = prompts.partition("Live Subject Prompts")
    pattern = re.compile(r"""['"](.*?)['"]\s*\.format""")
    return classes, tuple(pattern.findall(obj)), tuple(pattern.findall(live))


def load_dreambench(root: str | os.PathLike, token: str = DREAMBENCH_TOKEN) -> Benchmark:
    """DreamBench: `root/dataset/<subject>/*.jpg` and `root/dataset/prompts_and_classes.txt` (subject,class
    lines; object and live-subject prompt lists with `{0}` = unique token, `{1}` = class). Subjects whose class
    is cat or dog get the live prompts."""
    root = Path(root)
    data = root / "dataset" if (root / "dataset").is_dir() else root
    spec = data / "prompts_and_classes.txt"
    if not spec.is_file():
        raise UsageError(f"prompts_and_classes.txt not found in {data}; is this the DreamBooth dataset folder?")
    classes, obj, live = _dreambench_prompts(spec.read_text(encoding="utf-8"))
    if not classes or not obj or not live:
        raise UsageError(f"{spec}: could not find the classes and both prompt lists (object, live subject)")
    tasks = []
    for i, (subject, cls) in enumerate(classes.items()):
        concept = Concept(subject, cls, tuple(list_images(data / subject)), token)
        templates = live if cls in DREAMBENCH_LIVE_CLASSES else obj
        tasks.append(Task(subject, i, (concept,), templates, slots="token_class"))
    return Benchmark("dreambench", root, tuple(tasks))
