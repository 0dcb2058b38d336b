"""Offline CLIP tokenizer.

No model hub is reachable here, but open_clip ships the BPE vocabulary that OpenAI's CLIP (and so
every Stable Diffusion / SDXL / FLUX CLIP tokenizer) uses. We rebuild the exact vocab/merges tables
from it, so token ids equal the hub tokenizer's (e.g. "a photo of a dog" ->
49406 320 1125 539 320 1929 49407).
"""
from __future__ import annotations

import functools
import gzip
import os

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
_NUM_MERGES = 49152 - 256 - 2


def _bpe_path() -> str:
    import open_clip

    return os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (the alphabet of the base vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (token -> id) and ordered merge rules, from open_clip's BPE file."""
    with gzip.open(_bpe_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : _NUM_MERGES + 1]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77, pad_token: str = EOS) -> CLIPTokenizer:
    """A CLIPTokenizer equal to `openai/clip-vit-large-patch14`'s, built without network.

    SDXL's second tokenizer pads with "!" (id 0) instead of <|endoftext|>; pass `pad_token="!"` for it.
    """
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], pad_token=pad_token, model_max_length=model_max_length)
