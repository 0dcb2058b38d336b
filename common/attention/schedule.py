"""When an attention plan is on, and the install -> sample -> restore block, for every sampler.

SyncTweedies turns reference-view attention on for the first part of sampling; SynCD applies its token
masks only after the first step. Both are a hook on the shared loop that flips a field of the plan.
Processors must be put back even when sampling fails: `plan_installed` does that once.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from common.attention.plan import AttentionPlan, install_plan
from common.attention.processors import Where
from common.pipelines.loop import Hook, StepState


class ReferenceAttentionSchedule(Hook):
    """Reference-view attention on while t >= (1 - ref_attention_end) T (the first 20 % by default)."""

    def __init__(self, context: AttentionPlan, ref_attention_end: float, num_train_timesteps: int):
        self.context, self.end, self.T = context, ref_attention_end, num_train_timesteps

    def on_input(self, state: StepState) -> None:
        self.context.reference_enabled = float(state.t) >= (1 - self.end) * self.T


class PlanGate(Hook):
    """Sets `plan.<attribute> = when(state)` before every prediction; e.g. SynCD's mask gate
    `PlanGate(plan, lambda s: s.i > 0)` (no masks at the first step, where t = 1)."""

    def __init__(self, plan: AttentionPlan, when: Callable[[StepState], bool], attribute: str = "masks_enabled"):
        self.plan, self.when, self.attribute = plan, when, attribute

    def on_input(self, state: StepState) -> None:
        setattr(self.plan, self.attribute, bool(self.when(state)))


@contextmanager
def plan_installed(model: torch.nn.Module, plan: AttentionPlan | None = None, where: Where | None = None
                   ) -> Iterator[object]:
    """Plan processors on `model` (`plan` as their default, else the one each call brings) for the
    duration of the block; the previous processors come back even if the block raises."""
    handle = install_plan(model, where, default_plan=plan)
    try:
        yield handle
    finally:
        handle.restore()
