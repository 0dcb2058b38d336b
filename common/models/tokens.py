"""Add new tokens (e.g. Custom Diffusion's `<new1>`, a textual-inversion word) to a pipeline's tokenizer(s)
and text encoder(s), initialised from existing tokens or from saved vectors.

Every (tokenizer, text encoder) pair of a pipeline gets the token (SDXL: both CLIPs), so prompts mean the
same to both. Errors a user can fix (token already known, initializer of several tokens) are UsageErrors.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from common.errors import UsageError


def text_pairs(pipe: Any) -> list[tuple[Any, torch.nn.Module]]:
    """The (tokenizer, text_encoder) pairs of a pipeline: SD one, SDXL two."""
    pairs = []
    for suffix in ("", "_2"):
        tok, enc = getattr(pipe, f"tokenizer{suffix}", None), getattr(pipe, f"text_encoder{suffix}", None)
        if tok is not None and enc is not None:
            pairs.append((tok, enc))
    if not pairs:
        raise UsageError(f"{type(pipe).__name__} has no tokenizer/text encoder to add tokens to")
    return pairs


def initializer_id(tokenizer: Any, word: str) -> int:
    """The vocabulary id an initializer word stands for.

    As upstream diffusers (whose slow-tokenizer `encode([word])` looked the word up as a vocabulary entry), a
    word that is itself a vocabulary entry is used as that entry -- so the default "ktn", "pll" give the LDM
    code's ids 42170, 47629. Any other word must encode to exactly one token.
    """
    vocab = tokenizer.get_vocab()
    if word in vocab:
        return int(vocab[word])
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise UsageError(f"the initializer token {word!r} encodes to {len(ids)} tokens; pass a single-token word")
    return int(ids[0])


def check_new(tokenizer: Any, token: str) -> None:
    """Refuse a token the tokenizer already knows (as an added token, a vocabulary entry or a one-token word)."""
    if not token or token.strip() != token or " " in token:
        raise UsageError(f"modifier token {token!r} must be one word without spaces, e.g. <new1>")
    vocab = tokenizer.get_vocab()
    known = token in vocab or f"{token}</w>" in vocab
    if known:
        raise UsageError(
            f"the tokenizer already contains the token {token!r}; pass a different modifier token (e.g. <new1>)")


def add_tokens(tokenizer: Any, text_encoder: torch.nn.Module, tokens: Sequence[str],
               init: Sequence[str] | torch.Tensor) -> list[int]:
    """Add `tokens` to one tokenizer/encoder pair; rows start as `init` (words, or vectors [N, D]). Returns ids.

    Checks everything before changing anything, so a refused call leaves the pair as it was.
    """
    tokens = list(tokens)
    if len(set(tokens)) != len(tokens):
        raise UsageError(f"modifier tokens {tokens} repeat a token; give each concept its own")
    for tok in tokens:
        check_new(tokenizer, tok)
    emb = text_encoder.get_input_embeddings()
    if isinstance(init, torch.Tensor):
        if init.dim() != 2 or init.shape[0] != len(tokens) or init.shape[1] != emb.weight.shape[1]:
            raise UsageError(f"embeddings for {tokens} have shape {tuple(init.shape)}; expected "
                             f"({len(tokens)}, {emb.weight.shape[1]}) for this text encoder")
        rows = init
    else:
        init = list(init)
        if len(init) < len(tokens):
            raise UsageError(f"{len(tokens)} modifier tokens but only {len(init)} initializer tokens {init}; "
                             "give one initializer per modifier (joined with '+')")
        rows = emb.weight.detach()[[initializer_id(tokenizer, w) for w in init[: len(tokens)]]].clone()
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise UsageError(f"the tokenizer already contains one of {tokens}; pass different modifier tokens")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    size = max(len(tokenizer), emb.weight.shape[0])
    if size > emb.weight.shape[0]:
        # mean_resizing would draw from the global RNG; the new rows are overwritten just below anyway.
        text_encoder.resize_token_embeddings(size, mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = rows.to(device=weight.device, dtype=weight.dtype)
    return list(ids)


def add_tokens_to_pipeline(pipe: Any, tokens: Sequence[str], init: Sequence[str] | Sequence[torch.Tensor]) -> list[list[int]]:
    """Add `tokens` to every tokenizer/encoder pair of `pipe`. Returns the ids per pair.

    `init` is a list of initializer words (shared by all pairs) or one tensor [N, D_pair] per pair.
    """
    pairs = text_pairs(pipe)
    if init and isinstance(init[0], torch.Tensor):
        if len(init) != len(pairs):
            raise UsageError(f"got embeddings for {len(init)} text encoders; this pipeline has {len(pairs)}")
        inits: list[Any] = list(init)
    else:
        inits = [list(init)] * len(pairs)
    for tok, _ in pairs:  # validate on every pair first: never leave one pair changed and the other not
        for t in tokens:
            check_new(tok, t)
    return [add_tokens(tok, enc, tokens, i) for (tok, enc), i in zip(pairs, inits)]


def token_embeddings(pipe: Any, tokens: Sequence[str]) -> dict[str, list[torch.Tensor]]:
    """Current rows of `tokens` in every text encoder: token -> [vector [D_pair] per pair]."""
    out: dict[str, list[torch.Tensor]] = {t: [] for t in tokens}
    for tok, enc in text_pairs(pipe):
        weight = enc.get_input_embeddings().weight.detach()
        for t in tokens:
            idx = tok.convert_tokens_to_ids(t)
            if idx is None or idx == tok.unk_token_id:
                raise UsageError(f"token {t!r} is not in the tokenizer")
            out[t].append(weight[idx].clone())
    return out


def mask_embedding_grad(text_encoder: torch.nn.Module, ids: Sequence[int]) -> torch.utils.hooks.RemovableHandle:
    """Let only rows `ids` of the token-embedding table receive gradient (all ids, the last one included).

    Returns the hook handle; `.remove()` undoes it. Other rows then change only through weight decay.
    """
    weight = text_encoder.get_input_embeddings().weight
    keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[list(ids)] = 1
    return weight.register_hook(lambda g: g * keep.to(g.dtype))


def split_plus(value: str | Sequence[str] | None) -> list[str]:
    """'<new1>+<new2>' -> ['<new1>', '<new2>'] (the original scripts' '+'-joined lists)."""
    if value is None:
        return []
    items = value.split("+") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s.strip()]
