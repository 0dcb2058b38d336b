"""The synchronisation cases 0-6 of the paper's Table 1 (repo `one_step_process`), as data.

`space` is where the state lives (instance X_t or canonical z_t), `quantity` what is averaged through the
canonical space: eps, the Tweedie estimate x0|t, or the next state x_{t-1}. Case 2 is SyncTweedies.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from common.errors import UsageError


@dataclass(frozen=True)
class Case:
    id: int
    space: str  # "instance" | "canonical"
    quantity: str | None  # None (no sync) | "eps" | "x0" | "x_prev"
    description: str

    @property
    def canonical(self) -> bool:
        return self.space == "canonical"


CASES: dict[int, Case] = {c.id: c for c in [
    Case(0, "instance", None, "no synchronisation (independent instances)"),
    Case(1, "instance", "eps", "instance denoising, averaged noise (Visual Anagrams)"),
    Case(2, "instance", "x0", "instance denoising, averaged Tweedie x0|t (SyncTweedies)"),
    Case(3, "instance", "x_prev", "instance denoising, averaged x_{t-1} (MultiDiffusion / SyncMVD)"),
    Case(4, "canonical", "eps", "canonical denoising, averaged noise"),
    Case(5, "canonical", "x0", "canonical denoising, averaged Tweedie x0|t"),
    Case(6, "canonical", "x_prev", "canonical denoising, averaged x_{t-1}"),
]}


def case_id(text: str | int) -> int:
    """argparse `type` of --case_num: the case as an int 0-6, checked when the flags are parsed."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = None
    if value not in CASES:
        raise argparse.ArgumentTypeError(f"unknown case {text!r}: use 0-6 (2 = SyncTweedies); the original's research "
                                         "variants 7-59 are not part of the paper's analysis")
    return value


def get_case(case_num: str | int) -> Case:
    """'2' -> Case 2. Ids 7-59 of the original are research variants outside the paper's analysis."""
    try:
        return CASES[int(case_num)]
    except (ValueError, KeyError):
        raise UsageError(f"unknown --case_num {case_num!r}: use 0-6 (2 = SyncTweedies); the original's research "
                         "variants 7-59 are not part of the paper's analysis") from None
