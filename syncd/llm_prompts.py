"""LLM prompt generation (SynCD §1.1, the original's `gen_prompts.py`) with any local transformers causal LM.

What is asked (the original's three requests, same wording): background captions of a deformable category
(25 per request), appearance descriptions of it (25 per request), each sent `batch_size` (6) times per
category; for rigid objects, background captions of an object caption (10 per request, 10 objects a batch).
Sampling: temperature 0.6, top-p 0.9, up to 2048 new tokens, left padding, the model's chat template.
Each reply is split into lines and cleaned (`clean_prompt`); a category's list is the concatenation of its
replies' cleaned lines (de-duplicated within each reply, as the original).

Prompt files (JSON, what `--prompts` reads): deformable `[{category, background: [...], description: [...]}]`,
rigid `{object id: [captions]}`. Written atomically after every category / batch, so an interrupted run
resumes: categories (ids) already in the file are not asked again.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from common.errors import UsageError
from common.io import atomic_write_json



def _indented(text: str, spaces: int, tail: str) -> str:
    """The original's triple-quoted templates: every line after the first indented by `spaces` (blank lines stay
    empty), plus its trailing whitespace `tail`."""
    first, *rest = text.split("\n")
    return "\n".join([first] + [" " * spaces + line if line else "" for line in rest]) + tail


SYSTEM = "You are a language model expert in suggesting image captions for different object categories."
_NO_SPECULATION = (
    'DO NOT add any unnecessary speculation about the things that are not part of the image such as "the image is '
    'inspiring to viewers" or "seeing this makes you feel joy". DO NOT add things such as "creates a unique and '
    'entertaining visual", as these descriptions are interpretations and not a part of the image itself.')
BG_DEFORMABLE = _indented(
    'Suggest {n} caption for images of a {cat}. Make sure "{cat}" word is in the caption. The caption should provide '
    'a brief description of the background. DO NOT add any unnecessary adjectives or emotion words in the caption. '
    'Please keep the caption factual and terse but complete. ' + _NO_SPECULATION + ' The description should be '
    'purely factual, with no subjective speculation. Follow these guidance for the captions:\n'
    '1. generate captions of {cat} in different backgrounds and scenes.\n'
    '2. generate captions of {cat} with another object in the scene.\n'
    '3. generate captions of {cat} with different stylistic representations.\n\n'
    'Example captions for the category "cat" are:\n'
    '1. A photo of a siamese cat playing in a garden. The garden is filled with wildflowers.\n'
    '2. A cat is sitting beside a book in a library.\n'
    '4. Painting of a cat in watercolor style.', 28, " ")
DESC_DEFORMABLE = _indented(
    'Suggest {n} caption for images of a {cat}. Make sure "{cat}" word is in the caption. The caption should provide '
    'detailed visual information of the {cat} including color and subspecies. DO NOT add any unnecessary adjectives '
    'or emotion words in the caption or background scene details. Please keep the caption factual and terse but '
    'complete. ' + _NO_SPECULATION + ' The description should be purely factual, with no subjective speculation.\n\n'
    'Example captions for the category "cat" are:\n'
    '1. The siamese cat has blue almond-shaped eyes and cream-colored fur with dark chocolate points on the ears, '
    'face, paws, and tail.\n'
    '2. The white fluffy Maine Coon cat with long, and bushy tail spread out beside it, and its thick fur has a mix '
    'of brown, black, and white stripes.\n'
    '3. The bengal cat with marbled coat features a pattern of vivid orange and black spots.', 28, " ")
BG_RIGID = _indented(
    'Suggest {n} caption for images of a {cat}. The caption should provide a description of the background. DO NOT '
    'add any unnecessary adjectives or emotion words in the caption. Please keep the caption factual and terse but '
    'complete. ' + _NO_SPECULATION + ' The description should be purely factual, with no subjective speculation. '
    'Follow these guidance for the captions:\n'
    '1. Generate captions of {cat} in different backgrounds and scenes.\n'
    '2. Generate captions of {cat} with another object in the scene.\n\n'
    'Example captions for "White plastic bottle" are:\n'
    '1. A white plastic bottle on a roadside cobblestone with stone bricks.\n'
    '2. A white plastic bottle is placed next to a steaming cup of coffee on a polished wooden table.\n\n'
    'Example captions for "a blue truck" are:\n'
    '1. A blue tank in a military storage facility with metal walls.\n'
    '2. A blue tank on a desert battlefield ground, with palm trees in the background.', 32, "\n" + " " * 32)

#: lines containing any of these are LLM chatter, not captions (the original's list)
CHATTER = ("suggestions", "note:", "captions", "**", "brief description", "detailed visual", "additional captions",
           "meet your requirements!")

Messages = list[dict[str, str]]
Generate = Callable[[list[Messages]], list[str]]


def clean_prompt(text: str) -> list[str]:
    """One LLM reply -> captions: per line, every digit removed, leading dots removed, lower-cased, stripped,
    double quotes removed; empty and chatter lines dropped; duplicates dropped (first occurrence kept)."""
    out = []
    for line in text.split("\n"):
        line = re.sub(r"^\.+", "", re.sub(r"[0-9]+", "", line))
        line = line.lower().strip().replace('"', "")
        if line and not any(c in line for c in CHATTER):
            out.append(line)
    return list(dict.fromkeys(out))


def messages(template: str, n: int, cat: str) -> Messages:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": template.format(n=n, cat=cat)}]


class LocalLLM:
    """A local transformers causal LM answering batches of chat requests (the original's `get_output`)."""

    def __init__(self, path: str, *, device: str | None = None, max_new_tokens: int = 2048, temperature: float = 0.6,
                 top_p: float = 0.9, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
            raise UsageError(f"--llm {path}: no such model folder")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--llm {path}: not a local transformers causal LM folder ({first})") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.generator_seed = seed
        stop = [self.tokenizer.eos_token_id]
        eot = self.tokenizer.convert_tokens_to_ids("<|eot_id|>") if "<|eot_id|>" in self.tokenizer.get_vocab() else None
        self.eos = [t for t in stop + [eot] if t is not None] or None

    def render(self, msgs: Messages) -> str:
        """The chat template with the generation prompt; without one, the turns as plain paragraphs."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return "\n\n".join(m["content"] for m in msgs) + "\n\n"

    def __call__(self, batch: list[Messages]) -> list[str]:
        import torch

        texts = [self.render(m) for m in batch]
        enc = self.tokenizer(texts, padding="longest", return_tensors="pt", add_special_tokens=False).to(self.device)
        torch.manual_seed(self.generator_seed)
        self.generator_seed += 1
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=True,
                                      temperature=self.temperature, top_p=self.top_p,
                                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos)
        new = out[:, enc["input_ids"].shape[1]:]  # left padding: the reply starts at the same column for all
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


def _read(path: Path, kind: type) -> Any:
    if not path.is_file():
        return kind()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not a prompt file ({e.msg})") from None
    if not isinstance(data, kind):
        raise UsageError(f"{path}: a {'list' if kind is list else 'dict'} prompt file expected")
    return data


def deformable_prompt_file(generate: Generate, categories: Sequence[str], path: Path, *, num_prompts: int = 25,
                           batch_size: int = 6, progress: bool = True) -> list[dict[str, Any]]:
    """For each category not yet in `path`: `batch_size` background and `batch_size` description requests;
    the file gains {category, background, description} after each category."""
    path = Path(path)
    data = _read(path, list)
    have = {e.get("category") for e in data}
    for cat in tqdm([c for c in categories if c not in have], desc="LLM prompts", disable=not progress):
        bg = [x for reply in generate([messages(BG_DEFORMABLE, num_prompts, cat)] * batch_size)
              for x in clean_prompt(reply)]
        desc = [x for reply in generate([messages(DESC_DEFORMABLE, num_prompts, cat)] * batch_size)
                for x in clean_prompt(reply)]
        data.append({"category": cat, "background": bg, "description": desc})
        atomic_write_json(path, data)
    return data


def rigid_prompt_file(generate: Generate, captions: dict[str, str], path: Path, *, num_prompts: int = 10,
                      batch_size: int = 10, progress: bool = True) -> dict[str, list[str]]:
    """Background captions for each object id (its caption as the 'category') not yet in `path`, `batch_size`
    objects per request batch; the file gains {id: [captions]} after each batch."""
    path = Path(path)
    data = _read(path, dict)
    todo = [(k, c) for k, c in captions.items() if k not in data]
    bar = tqdm(total=len(todo), desc="LLM prompts", disable=not progress)
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        replies = generate([messages(BG_RIGID, num_prompts, c) for _, c in chunk])
        for (k, _), reply in zip(chunk, replies):
            data[k] = clean_prompt(reply)
        atomic_write_json(path, data)
        bar.update(len(chunk))
    bar.close()
    return data


def read_captions(path: str) -> dict[str, str]:
    """The Cap3D captions CSV (no header: object id, caption) -> {id: caption}."""
    import csv

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--captions {path}: no such file")
    with p.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows or any(len(r) < 2 for r in rows):
        raise UsageError(f"--captions {path}: rows of 'object id,caption' expected")
    return {r[0]: r[1] for r in rows}
