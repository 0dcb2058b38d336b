"""Checkpoint folders `output_dir/checkpoint-N`, written atomically so a crash never leaves a half checkpoint.

A checkpoint is first written to `checkpoint-N.tmp` and renamed only when complete; anything named `*.tmp`
is therefore a crash leftover, which resume ignores and the next run deletes.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
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


# ------------------------------------------------------------------------------- output folder guard and lock

#: Files that mark an output folder as holding a result: trained weights at its top level.
RESULT_SUFFIXES = (".safetensors", ".bin")
LOCK_NAME = ".train.lock"


def _results(output_dir: Path) -> list[str]:
    found = [p.name for p in list_checkpoints(output_dir)]
    if output_dir.is_dir():
        found += sorted(p.name for p in output_dir.iterdir() if p.is_file() and p.suffix in RESULT_SUFFIXES)
    return found


def check_output_dir(output_dir: str | os.PathLike, *, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a new run over an earlier one's checkpoints or weights (they would be replaced, or mixed
    with the new run's checkpoints so that "latest" picks the wrong one). `overwrite` deletes the earlier
    checkpoints instead; resuming from one of them is what the folder is for."""
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--output_dir {root} is a file, not a folder; choose another path")
    results = _results(root)
    if not results:
        return
    if overwrite:
        for path in list_checkpoints(root):
            shutil.rmtree(path)
        return
    if resume is not None and (resume != "latest" or list_checkpoints(root)):
        return
    shown = ", ".join(results[:3]) + (", ..." if len(results) > 3 else "")
    if resume == "latest":
        raise UsageError(
            f"--output_dir {root} has no checkpoint to resume from but holds an earlier run's results ({shown}); "
            "start over with --overwrite_output_dir, or choose another --output_dir"
        )
    raise UsageError(
        f"--output_dir {root} already holds an earlier run's results ({shown}); continue it with "
        "--resume_from_checkpoint latest, start over with --overwrite_output_dir, or choose another --output_dir"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputDirLock:
    """`output_dir/.train.lock` holding "pid host" while a run uses the folder, so a second run at the same time
    is refused instead of interleaving its checkpoints. A lock left by a process that no longer exists (killed)
    is taken over; one from another host cannot be checked and is reported with the command to remove it."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False
        self._mine = f"{os.getpid()} {socket.gethostname()}"

    def acquire(self) -> OutputDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _folder_guard(self.path.parent):
            return self._acquire()

    def _acquire(self) -> OutputDirLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    break
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self._mine + "\n")
            self.held = True
            return self
        owner = self._owner() or "unknown"
        raise UsageError(
            f"--output_dir {self.path.parent} is in use by another training run (pid/host {owner}); wait for it "
            f"to finish or choose another --output_dir (if no run uses it, delete {self.path})"
        )

    def _owner(self) -> str | None:
        try:
            return self.path.read_text().strip()
        except OSError:
            return None

    def _stale(self) -> bool:
        """True when the lock's process is gone (or is this process: an earlier, unfinished Trainer)."""
        owner = self._owner()
        if owner is None:
            return True  # vanished or unreadable between the two calls: try again
        pid_text, _, host = owner.partition(" ")
        if not pid_text.isdigit():
            return True  # a half-written lock from a crash
        if host and host != socket.gethostname():
            return False
        pid = int(pid_text)
        return pid == os.getpid() or not _pid_alive(pid)

    def release(self) -> None:
        if self.held and self.path.parent.is_dir():
            with _folder_guard(self.path.parent):
                if self._owner() == self._mine:
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
        self.held = False


@contextlib.contextmanager
def _folder_guard(folder: Path) -> Iterator[None]:
    """Serialise lock checks and take-overs between processes with `flock` on the folder itself (no extra file;
    the kernel drops it if the process dies). Without it, two runs could both judge a dead run's lock stale and
    both take it, or read a lock that another run has created but not yet written. Where flock is unavailable
    (no fcntl, or a filesystem without locks) the lock file alone decides, as before."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. ENOLCK on a filesystem without locks
            pass
        yield
    finally:
        os.close(fd)  # also releases the flock


def _load_state_file(file: Path) -> None:
    """Read a checkpoint's optimizer / scheduler / random-state file the way accelerate will (weights only, with
    the numpy types it allows), turning every failure into one line. Accelerate itself skips an unreadable
    random-state file with a log message, which would silently break exact resume."""
    from accelerate.utils import load

    from common.io import short_reason

    if not file.is_file():
        raise UsageError(f"checkpoint {file.parent} lacks {file.name}; it is incomplete, resume from another")
    try:
        load(file, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = found.group(1) if found else short_reason(e)
        raise UsageError(f"{file} holds pickled Python objects ({what}), not only tensors, and loading them could "
                         "run code; resume from another checkpoint") from None
    except (EOFError, RuntimeError, ValueError, OSError, KeyError) as e:
        raise UsageError(f"{file} is corrupt: {short_reason(e)}; resume from another checkpoint") from None


def check_resumable(path: Path, models: list[torch.nn.Module], num_optimizers: int, max_train_steps: int,
                    process_index: int = 0) -> None:
    """Check a checkpoint before accelerate reads it, so each problem is one line and not a traceback: its step
    beyond `max_train_steps`, a missing or unreadable file, pickled objects, and weights of another model or
    another token set (keys or shapes that do not match what this run trains)."""
    from common.io import load_weights

    step = checkpoint_step(path)
    if step > max_train_steps:
        raise UsageError(
            f"{path} is at step {step}, beyond --max_train_steps {max_train_steps}; pass --max_train_steps "
            f"{step} or more to continue it"
        )
    for i, model in enumerate(models):
        ending = f"_{i}" if i else ""
        candidates = [path / f"model{ending}.safetensors", path / f"pytorch_model{ending}.bin"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise UsageError(f"checkpoint {path} lacks {candidates[0].name}; it is incomplete, resume from another")
        saved = load_weights(found)
        own = model.state_dict()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        problems = [f"unexpected {k}" for k in saved if k not in own][:3]
        problems += [f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}" for k in saved
                     if k in own and tuple(saved[k].shape) != tuple(own[k].shape)][:3]
        problems += [f"{k} missing" for k in trainable if k not in saved][:3]
        if problems:
            raise UsageError(
                f"checkpoint {found} does not fit this run's model ({'; '.join(problems)}); it was saved for "
                "another base model or another set of tokens: resume with the same flags, or start over"
            )
    names = ["optimizer.bin" if i == 0 else f"optimizer_{i}.bin" for i in range(num_optimizers)]
    for name in [*names, "scheduler.bin", f"random_states_{process_index}.pkl"]:
        _load_state_file(path / name)
