"""Install, remove and restore attention processors on a UNet or a FLUX transformer by layer name.

Names are diffusers' processor names without the trailing ".processor", e.g.
"down_blocks.1.attentions.0.transformer_blocks.0.attn2" (UNet) or "single_transformer_blocks.3.attn" (FLUX).
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable

import torch

Where = str | Callable[[str], bool]

_SHORTCUTS = {
    "all": lambda n: True,
    "attn1": lambda n: n.endswith("attn1"),  # UNet self-attention
    "attn2": lambda n: n.endswith("attn2"),  # UNet cross-attention
    "self": lambda n: n.endswith("attn1"),
    "cross": lambda n: n.endswith("attn2"),
    "joint": lambda n: n.startswith("transformer_blocks."),  # FLUX double-stream blocks
    "single": lambda n: n.startswith("single_transformer_blocks."),  # FLUX single-stream blocks
}


def _matcher(where: Where) -> Callable[[str], bool]:
    """'attn1' | 'attn2' | 'all' | 'joint' | 'single' | a glob ('up_blocks.*attn2') | 're:<regex>' | callable."""
    if callable(where):
        return where
    if where in _SHORTCUTS:
        return _SHORTCUTS[where]
    if where.startswith("re:"):
        pattern = re.compile(where[3:])
        return lambda n: pattern.search(n) is not None
    return lambda n: fnmatch.fnmatchcase(n, where)


def attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Layer name -> Attention module, for every module that owns a processor."""
    names = {k[: -len(".processor")] for k in model.attn_processors}
    return {name: module for name, module in model.named_modules() if name in names}


def matching_layers(model: torch.nn.Module, where: Where) -> list[str]:
    match = _matcher(where)
    return [name for name in attention_modules(model) if match(name)]


class ProcessorHandle:
    """The processors that were in place before `set_processors`; `restore()` puts them back."""

    def __init__(self, model: torch.nn.Module, previous: dict[str, Any], installed: dict[str, Any]):
        self.model, self.previous, self.installed = model, previous, installed

    def restore(self) -> None:
        self.model.set_attn_processor(dict(self.previous))

    def __enter__(self) -> "ProcessorHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def set_processors(model: torch.nn.Module, make_processor: Callable[[str, torch.nn.Module], Any | None],
                   where: Where = "attn2") -> ProcessorHandle:
    """Replace the processors of the layers matching `where` by `make_processor(name, attention_module)`.

    A `None` from make_processor keeps that layer's processor. Returns a handle that restores the
    previous processors (also usable as a context manager). Processors that are nn.Modules become
    submodules of their Attention layer, so their parameters train and save with the model.
    """
    previous = {k[: -len(".processor")]: v for k, v in model.attn_processors.items()}
    match = _matcher(where)
    installed = {}
    for name, module in attention_modules(model).items():
        if match(name):
            proc = make_processor(name, module)
            if proc is not None:
                installed[name] = proc
    if not installed:
        raise ValueError(f"no attention layer of {type(model).__name__} matches {where!r}")
    new = {f"{k}.processor": installed.get(k, v) for k, v in previous.items()}
    model.set_attn_processor(new)
    return ProcessorHandle(model, {f"{k}.processor": v for k, v in previous.items()}, installed)


def default_processor(module: torch.nn.Module) -> Any:
    """The processor diffusers gives a fresh layer of this kind (SDPA; added-KV for IF; FLUX's own)."""
    from diffusers.models.attention_processor import AttnAddedKVProcessor2_0, AttnProcessor2_0

    cls = getattr(module, "_default_processor_cls", None)
    if cls is not None:
        return cls()
    if getattr(module, "added_kv_proj_dim", None) is not None:
        return AttnAddedKVProcessor2_0()
    return AttnProcessor2_0()


def remove_processors(model: torch.nn.Module, where: Where = "all") -> None:
    """Back to diffusers' default processors on the matching layers (drops any trained processor state)."""
    set_processors(model, lambda name, module: default_processor(module), where)


def processors_of(model: torch.nn.Module, where: Where = "all") -> dict[str, Any]:
    """Layer name -> current processor, for the layers matching `where`."""
    match = _matcher(where)
    return {k[: -len(".processor")]: v for k, v in model.attn_processors.items() if match(k[: -len(".processor")])}
