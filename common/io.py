"""Safe, atomic file IO for weights, images, text and JSON.

Weights load without running pickled code (safetensors, or `torch.load(weights_only=True)`), every write goes
to a temp file that replaces the target only once complete, and every user-fixable failure is a UsageError.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import secrets
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from common.errors import UsageError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
_MAX_LISTED = 5


# ----------------------------------------------------------------------------------------------- atomic writes


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; move it onto `path` only if the block succeeds.

    A crash or exception mid-write therefore never leaves a half-written file under the final name, and an
    existing file stays intact. The temp name keeps the suffix so writers that infer the format from it
    (PIL, safetensors) still work.
    """
    final = Path(path)
    _make_parent(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{final.suffix}")
    try:
        yield tmp
        if tmp.exists():  # some writers (safetensors) create 0600 files; give the usual umask permissions
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (`.` at worst)."""
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _make_parent(final: Path) -> None:
    """Create the folder of `final`; a file in the way or a read-only location is a one-line UsageError."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _nearest_existing(final.parent)
        raise UsageError(f"cannot write {final}: {blocker} is a file, not a folder; choose another path") from None
    except PermissionError as e:
        raise UsageError(f"cannot create the folder of {final}: {e.strerror}; choose a writable location") from None
    except OSError as e:
        raise UsageError(f"cannot create the folder of {final}: {e.strerror or e}; choose another location") from None


def check_writable(path: str | os.PathLike) -> None:
    """Refuse early (before minutes of work) an output that cannot be written: under a file, a folder in its
    place, or a read-only / permission-less location. Probes with a real temp file, since permission bits
    do not show a read-only mount; creates nothing that stays."""
    final = Path(path)
    if final.is_dir():
        raise UsageError(f"cannot write {final}: it is a folder; name a file inside it")
    anchor = _nearest_existing(final.parent)
    if not anchor.is_dir():
        raise UsageError(f"cannot write {final}: {anchor} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=anchor, prefix=".write-probe-")
    except OSError as e:
        raise UsageError(
            f"cannot write {final}: {anchor} is not writable ({e.strerror or e}); choose another location"
        ) from None
    os.close(fd)
    os.unlink(probe)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write `obj` as JSON (with a trailing newline) to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_save_image(img: Any, path: str | os.PathLike, **save_kwargs: Any) -> None:
    """Save a PIL image atomically; the format comes from the extension of `path`."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    if suffix not in Image.registered_extensions():
        raise UsageError(f"cannot save image {path}: unknown image extension '{suffix}'; use .png or .jpg")
    with atomic_write(path) as tmp:
        img.save(tmp, **save_kwargs)


# ----------------------------------------------------------------------------------------------------- weights


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    raise UsageError(
        f"unknown weights extension '{suffix}' for {path}; "
        f"use {SAFETENSORS_SUFFIXES[0]} (or {'/'.join(TORCH_SUFFIXES)} for torch pickles)"
    )


def _safetensors_ready(tensors: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Detached, contiguous tensors with no two sharing storage (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(
                f"safetensors stores a flat dict[str, Tensor]; {key!r} holds {type(value).__name__} "
                "(flatten nested dicts with common.io.flatten_state_dict)"
            )
        t = value.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        elif ptr != 0:
            seen.add(ptr)
        out[key] = t
    return out


def _compact_nested(obj: Any, where: str = "") -> Any:
    """Torch pickles may nest dicts, but leaves must be tensors so weights_only loading accepts them.

    A view into a larger tensor is copied, or torch.save would write the whole underlying storage.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        return t if whole else t.clone(memory_format=torch.contiguous_format)
    if isinstance(obj, Mapping):
        return {k: _compact_nested(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    raise TypeError(f"weights must be (nested dicts of) tensors; {where or 'the top level'} holds {type(obj).__name__}")


def save_weights(
    tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Save a state dict atomically; `.safetensors` or a torch pickle (`.bin/.pt/.ckpt/.pth`) by extension.

    Torch pickles may hold nested dicts of tensors (original layouts such as Custom Diffusion's `delta.bin`);
    safetensors needs a flat dict. `metadata` (str -> str) is stored only in safetensors files.
    """
    path = Path(path)
    fmt = _format_of(path)
    if fmt == "safetensors":
        ready = _safetensors_ready(tensors)
        meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
        with atomic_write(path) as tmp:
            safetensors.torch.save_file(ready, str(tmp), metadata=meta)
        return
    compact = _compact_nested(tensors)
    if metadata:
        warnings.warn(f"metadata is only stored in .safetensors files; not saved in {path}", stacklevel=2)
    with atomic_write(path) as tmp:
        torch.save(compact, tmp)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_REASON = 200


def short_reason(error: object) -> str:
    """The gist of a library error on one short line.

    PyTorch's weights-only refusals are a paragraph of advice (re-run with weights_only=False, allowlist the
    global, read the docs); only the sentence after "WeightsUnpickler error:" says what is wrong.
    """
    text = _ANSI.sub("", str(error))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        text = re.split(r"(?<=[a-z0-9)\]])\.\s|\n", text.strip(), maxsplit=1)[0]
    else:
        text = text.strip().split("\n", 1)[0]
    text = " ".join(text.split()) or type(error).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _corrupt(path: Path, reason: object) -> UsageError:
    reason = short_reason(reason)
    return UsageError(f"{path} is corrupt or not a weights file: {reason}; re-download or re-save it")


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"weights file not found: {path}; check the path")
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a weights file; pass the weights file inside it")


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)` whose failures become UsageErrors.

    A checkpoint holding pickled Python objects is refused rather than executed: unpickling arbitrary classes
    can run arbitrary code.
    """
    path = Path(path)
    _check_readable(path)
    try:
        with warnings.catch_warnings():  # its multi-line note on pickle protocols adds nothing to a refusal
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:
            raise _corrupt(path, e) from None
        raise UsageError(
            f"{path} holds pickled Python objects ({found.group(1)}), not only tensors, and loading them could "
            "run code; if you trust its source, re-save its tensors (a state_dict of tensors only) as "
            ".safetensors with the tool that wrote it and pass that file"
        ) from None
    except (EOFError, RuntimeError, ValueError, OSError) as e:
        raise _corrupt(path, e) from None


def check_safetensors(path: str | os.PathLike) -> None:
    """Read only the header of a .safetensors file, so that a corrupt or truncated one is a one-line UsageError
    before a library (e.g. diffusers' `load_lora_weights`) fails on it with a traceback."""
    path = Path(path)
    _check_readable(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            f.keys()
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(path, e) from None


def load_weights(
    path: str | os.PathLike,
    *,
    expect_keys: Iterable[str] | None = None,
    expect_shapes: Mapping[str, Sequence[int | None]] | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a state dict by extension and, when expectations are given, check its keys and shapes.

    Nested dicts in torch pickles come back as saved; see `flatten_state_dict`.
    """
    path = Path(path)
    _check_readable(path)
    if _format_of(path) == "safetensors":
        try:
            sd = safetensors.torch.load_file(str(path), device=str(map_location))
        except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise _corrupt(path, e) from None
    else:
        sd = safe_torch_load(path, map_location=map_location)
    if not isinstance(sd, dict):
        raise UsageError(f"{path} holds a {type(sd).__name__}, not a dict of tensors; save a state dict instead")
    if expect_keys is not None or expect_shapes is not None:
        check_state_dict(sd, expect_keys, expect_shapes, strict, source=str(path))
    return sd


def flatten_state_dict(d: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """Join nested dict keys with `sep` ({"unet": {"w": t}} -> {"unet.w": t}); leaves are kept as they are."""
    out: dict[str, Any] = {}

    def visit(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}{sep}{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                visit(name, value)
            elif name in out:
                raise ValueError(f"flattening gives the key {name!r} twice; choose another separator than {sep!r}")
            else:
                out[name] = value

    visit("", d)
    return out


def _shape_str(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def _listing(one: str, many: str, items: list[str], sep: str = ", ") -> str:
    """'2 missing keys [a, b]', naming at most the first few."""
    shown = sep.join(items[:_MAX_LISTED]) + (f"{sep}..." if len(items) > _MAX_LISTED else "")
    return f"{len(items)} {one if len(items) == 1 else many} [{shown}]"


def check_state_dict(
    sd: Mapping[str, Any],
    expect_keys: Iterable[str] | None = None,
    expect_shapes: Mapping[str, Sequence[int | None]] | None = None,
    strict: bool = True,
    *,
    source: str = "state dict",
) -> None:
    """Raise one UsageError describing missing keys, unexpected keys (if `strict`) and shape mismatches.

    Keys of `expect_shapes` count as expected keys; a `None` dimension matches any size (e.g. a token count).
    """
    if expect_keys is None and expect_shapes is None:
        return
    expected = list(dict.fromkeys([*(expect_keys or ()), *(expect_shapes or {})]))
    expected_set = set(expected)
    problems = []
    missing = [k for k in expected if k not in sd]
    if missing:
        problems.append(_listing("missing key", "missing keys", missing))
    if strict:
        unexpected = [k for k in sd if k not in expected_set]
        if unexpected:
            problems.append(_listing("unexpected key", "unexpected keys", unexpected))
    mismatched = []
    for key, shape in (expect_shapes or {}).items():
        if key not in sd:
            continue
        got = sd[key]
        ok = (
            isinstance(got, torch.Tensor)
            and got.dim() == len(shape)
            and all(e is None or e == g for g, e in zip(got.shape, shape))
        )
        if not ok:
            got_str = _shape_str(got.shape) if isinstance(got, torch.Tensor) else f"a {type(got).__name__}"
            mismatched.append(f"{key}: got {got_str} expected {_shape_str(shape)}")
    if mismatched:
        problems.append(_listing("shape mismatch", "shape mismatches", mismatched, sep="; "))
    if problems:
        raise UsageError(
            f"{source} does not match the expected layout: " + "; ".join(problems)
            + "; check that it was saved by this method for this base model"
        )
