"""Checkpoint folders `output_dir/checkpoint-N`, written atomically so a crash never leaves a half checkpoint.

A checkpoint is first written to `checkpoint-N.tmp` and renamed only when complete; anything named `*.tmp`
is therefore a crash leftover, which resume ignores and the next run deletes.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator

from common.errors import UsageError

_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_SUFFIX = ".tmp"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a checkpoint folder was saved at, read from its name `checkpoint-N`."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise UsageError(f"{path} is not a checkpoint folder (expected a name like checkpoint-500)")
    return int(match.group(1))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=checkpoint_step)


def resolve_resume(output_dir: str | os.PathLike, spec: str | None) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: None, "latest" (None when there is none) or a path.

    A bare name such as `checkpoint-500` is also looked up in `output_dir`, as diffusers does.
    """
    if spec is None:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    for candidate in (Path(spec), Path(output_dir) / spec):
        if candidate.is_dir():
            checkpoint_step(candidate)
            return candidate
    raise UsageError(f"checkpoint {spec} not found; pass an existing checkpoint folder or 'latest'")


def remove_incomplete(output_dir: str | os.PathLike) -> None:
    """Delete `checkpoint-N.tmp` folders left by a run that crashed while saving."""
    root = Path(output_dir)
    if root.is_dir():
        for path in root.glob(f"checkpoint-*{_TMP_SUFFIX}"):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | os.PathLike, step: int, save_extra: Callable[[Path], None]
) -> Path:
    """Save the accelerate state (models, optimizer, scheduler, scaler, every process's RNG) plus `save_extra`.

    Call on every process: each one writes its own random state. The main process runs `save_extra(folder)`
    and renames the finished folder into place.
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + _TMP_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        save_extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    found = list_checkpoints(output_dir)
    for path in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(path)
