"""Argument parsing shared by every entry point: YAML configs under CLI flags, one-line usage errors.

Precedence is command line > `--config` file > parser defaults. Scripts build their own parser (with the
original repository's flags), add the shared groups below, call `parse_args`, and run through `run(main)`.
"""
from __future__ import annotations

import argparse
import difflib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from common.errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ArgumentParser",
    "ModelConfig",
    "SamplingConfig",
    "UsageError",
    "add_model_args",
    "add_output_args",
    "add_sampling_args",
    "nonnegative_int",
    "parse_args",
    "positive_int",
    "run",
    "torch_dtype_from_name",
]

DTYPE_CHOICES = ("fp32", "fp16", "bf16")
_DTYPE_NAMES = {
    "fp32": "float32", "float32": "float32", "no": "float32",
    "fp16": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}
_BOOL_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError (one line under `run`) and whose help shows every default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> Any:
    """Call `main(argv)`; a UsageError becomes one `error: ...` line on stderr and exit code 2."""
    try:
        return main(argv)
    except UsageError as e:
        print(f"error: {' '.join(str(e).split()) or 'invalid usage'}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


# ------------------------------------------------------------------------------------------------------ config


def _config_action(parser: argparse.ArgumentParser) -> argparse.Action:
    for action in parser._actions:
        if "--config" in action.option_strings:
            return action
    return parser.add_argument(
        "--config", metavar="FILE.yaml", default=None,
        help="YAML file of flag values (keys are flag names); flags on the command line override it "
        "(default: %(default)s)",
    )


def _load_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}; check the --config path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config {path}: {e}; pass a UTF-8 YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UsageError(f"config {path} is not valid YAML{where}: {problem}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"config {path} must map flag names to values, not be a {type(data).__name__}; "
            "write lines like `learning_rate: 1e-5`"
        )
    return data


def _norm(name: object) -> str:
    return str(name).lstrip("-").replace("-", "_")


def _config_keys(parser: argparse.ArgumentParser, skip: argparse.Action) -> dict[str, argparse.Action]:
    """Every name a config may use for an optional flag: its dest and its long option names."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action is skip or not action.option_strings or action.dest == argparse.SUPPRESS:
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        for name in [action.dest, *(o for o in action.option_strings if o.startswith("--"))]:
            keys[_norm(name)] = action
    return keys


def _convert_scalar(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """Convert like the command line does: through the flag's `type` from a string, then check `choices`."""
    if isinstance(value, (dict, list)):
        raise UsageError(f"config {path}: {key} takes a single value, not a {type(value).__name__}; fix the config")
    raw = value if isinstance(value, str) else str(value)
    convert = action.type or str
    try:
        out = convert(raw)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"config {path}: {key}: {e}; fix the value in the config") from None
    except (TypeError, ValueError):
        name = getattr(convert, "__name__", repr(convert))
        raise UsageError(f"config {path}: {key}: invalid {name} value: {raw!r}; fix the value in the config") from None
    if action.choices is not None and out not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise UsageError(f"config {path}: {key}: invalid choice: {out!r} (choose from {choices})")
    return out


def _convert(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    if value is None:
        return None
    if isinstance(action, _BOOL_ACTIONS):
        if not isinstance(value, bool):
            raise UsageError(f"config {path}: {key} must be true or false, got {value!r}")
        return value
    if action.nargs == 0:  # store_const / count: the value is what the flag would store
        return value
    if action.nargs in (None, "?") and not isinstance(action, argparse._AppendAction):
        return _convert_scalar(action, key, value, path)
    items = value if isinstance(value, list) else [value]
    if isinstance(action, argparse._AppendAction) and action.nargs not in (None, "?"):
        # each occurrence of the flag stores a list: the config gives a list of groups (or one flat group)
        groups = items if all(isinstance(g, list) for g in items) else [items]
        return [[_convert_scalar(action, key, x, path) for x in g] for g in groups]
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise UsageError(f"config {path}: {key} takes {action.nargs} values, got {len(items)}")
    return [_convert_scalar(action, key, item, path) for item in items]


def _config_values(parser: argparse.ArgumentParser, path: str, config_action: argparse.Action) -> dict[str, Any]:
    """The config file as {dest: converted value}, refusing unknown keys with close-name suggestions."""
    data = _load_yaml(path)
    known = _config_keys(parser, skip=config_action)
    unknown = [str(k) for k in data if _norm(k) not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(_norm(key), list(known), n=3)
            hints.append(key + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise UsageError(
            f"unknown key{'s' if len(unknown) > 1 else ''} in config {path}: {', '.join(hints)}; "
            "keys are this script's flag names (see --help)"
        )
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, value in data.items():
        action = known[_norm(key)]
        if action.dest in values:
            raise UsageError(f"config {path} sets {action.dest} twice (as {source[action.dest]} and {key}); keep one")
        values[action.dest] = _convert(action, str(key), value, path)
        source[action.dest] = str(key)
    return values


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` with `--config FILE.yaml` support: command line > config > parser defaults.

    Required flags may come from the config: argparse would reject them before the config is read, so they
    are relaxed for parsing and checked afterwards.
    """
    config_action = _config_action(parser)
    relaxed = [a for a in parser._actions if a.required and a.option_strings]
    for action in relaxed:
        action.required = False
    try:
        first = parser.parse_args(argv)
        path = getattr(first, config_action.dest)
        values = _config_values(parser, path, config_action) if path else {}
        # Pre-set attributes keep argparse from applying defaults; flags on the command line still overwrite.
        # Append flags would add to a pre-set list, so theirs are applied only when the command line has none.
        appends = {a.dest: a for a in parser._actions if isinstance(a, argparse._AppendAction)}
        preset = {k: v for k, v in values.items() if k not in appends}
        args = parser.parse_args(argv, namespace=argparse.Namespace(**preset))
        for dest in appends.keys() & values.keys():
            if getattr(first, dest) == appends[dest].default:
                setattr(args, dest, values[dest])
    finally:
        for action in relaxed:
            action.required = True
    missing = [a for a in relaxed if getattr(args, a.dest, None) is None]
    if missing:
        parser.error(
            "the following arguments are required: "
            + ", ".join("/".join(a.option_strings) for a in missing)
            + " (give them on the command line or in --config)"
        )
    return args


# ------------------------------------------------------------------------------------------ shared arguments


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def positive_int(text: str) -> int:
    """argparse `type` for counts that must be at least 1 (steps, batch sizes, images)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse `type` for counts where 0 means "off" (checkpointing every N steps, workers)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def _missing_options(parser: argparse.ArgumentParser, names: Sequence[str]) -> list[str]:
    """The option strings in `names` that `parser` does not define yet (a script's own flag wins)."""
    taken = {o for a in parser._actions for o in a.option_strings}
    return [n for n in names if n not in taken]


#: The model flag's names: diffusers' examples first, then the originals' spellings.
MODEL_FLAG_ALIASES = ("--model", "--ckpt", "--sd_path")
#: The steps flag's names: diffusers' first, then the originals' spelling.
STEPS_FLAG_ALIASES = ("--steps",)


def add_model_args(
    parser: argparse.ArgumentParser, default: str | None = None, required: bool = False
) -> argparse._ArgumentGroup:
    """Base-model flags: name or path (aliases `--model --ckpt --sd_path`), revision, variant, dtype, device.

    An alias the script already defines itself (e.g. Custom Diffusion's own `--ckpt`) is left to the script.
    Read them into a `ModelConfig` with `ModelConfig.from_args(args)`.
    """
    group = parser.add_argument_group("model")
    names = _missing_options(parser, ("--pretrained_model_name_or_path", *MODEL_FLAG_ALIASES))
    group.add_argument(
        *names, dest="pretrained_model_name_or_path", metavar="NAME_OR_PATH",
        default=default, required=required,
        help="base model: a preset name (e.g. tiny-sd), a hub id or a local folder "
        + ("(required, here or in --config)" if required else "(default: %(default)s)"),
    )
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) (default: %(default)s)")
    group.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16 (default: %(default)s)")
    group.add_argument(
        "--dtype", default="fp32", choices=DTYPE_CHOICES, help="dtype of the model weights (default: %(default)s)"
    )
    group.add_argument("--device", default=None,
                       help="torch device to run on (default: cuda when available, else cpu)")
    group.add_argument("--adapters", nargs="*", default=[], metavar="PATH",
                       help="trained concepts to apply to the model, e.g. a Custom Diffusion output folder "
                            "(default: none)")
    return group


_SAMPLING_DEFAULTS = {
    "prompt": None, "negative_prompt": "", "num_inference_steps": 50, "guidance_scale": 7.5,
    "height": None, "width": None, "seed": 0, "eta": 0.0,
}


def add_sampling_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse._ArgumentGroup:
    """Sampling flags: prompts, steps (alias `--steps`), guidance, size, seed, eta.

    Keyword arguments are the caller's paper defaults, by flag name (`num_inference_steps=30`,
    `guidance_scale=None` for the pipeline's own); `steps=` is accepted for `num_inference_steps`.
    Read them into a `SamplingConfig` with `SamplingConfig.from_args(args)`.
    """
    if "steps" in defaults:
        defaults.setdefault("num_inference_steps", defaults.pop("steps"))
    unknown = sorted(set(defaults) - set(_SAMPLING_DEFAULTS))
    if unknown:
        raise TypeError(f"add_sampling_args got defaults for unknown flags: {', '.join(unknown)}")
    d = {**_SAMPLING_DEFAULTS, **defaults}
    group = parser.add_argument_group("sampling")
    group.add_argument("--prompt", default=d["prompt"], help="text prompt (default: %(default)s)")
    group.add_argument("--negative_prompt", default=d["negative_prompt"],
                       help="negative prompt for guidance (default: %(default)r)")
    group.add_argument(*_missing_options(parser, ("--num_inference_steps", *STEPS_FLAG_ALIASES)),
                       dest="num_inference_steps", type=positive_int, default=d["num_inference_steps"],
                       help="denoising steps, at least 1 (default: %(default)s)")
    group.add_argument(
        "--guidance_scale", type=float, default=d["guidance_scale"],
        help="classifier-free guidance scale; None = the pipeline's own default (SD 7.5, SDXL 5.0, FLUX 3.5, "
        "IF 7.0) (default: %(default)s)",
    )
    group.add_argument("--height", type=positive_int, default=d["height"],
                       help="image height in pixels; None = model default (default: %(default)s)")
    group.add_argument("--width", type=positive_int, default=d["width"],
                       help="image width in pixels; None = model default (default: %(default)s)")
    if not any("--seed" in a.option_strings for a in parser._actions):  # training args may define it
        group.add_argument("--seed", type=int, default=d["seed"], help="random seed (default: %(default)s)")
    group.add_argument("--eta", type=float, default=d["eta"],
                       help="DDIM eta; 0 is deterministic (default: %(default)s)")
    return group


# ---------------------------------------------------------------------------------------------- typed configs


def _check_device(name: str) -> None:
    """A device torch knows and this machine has (e.g. not --device cuda without a GPU)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how: what travels past the entry point instead of the Namespace."""

    pretrained_model_name_or_path: str
    revision: str | None = None
    variant: str | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    adapters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.pretrained_model_name_or_path or not str(self.pretrained_model_name_or_path).strip():
            raise UsageError("no model: pass --pretrained_model_name_or_path (or --model) with a preset, hub id "
                             "or folder")
        if self.dtype.lower() not in _DTYPE_NAMES:
            raise UsageError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
        _check_device(self.device)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> ModelConfig:
        """Read the `add_model_args` flags (validated here, once)."""
        return cls(
            pretrained_model_name_or_path=ns.pretrained_model_name_or_path,
            revision=getattr(ns, "revision", None),
            variant=getattr(ns, "variant", None),
            dtype=getattr(ns, "dtype", "fp32"),
            device=getattr(ns, "device", None) or _default_device(),
            adapters=tuple(getattr(ns, "adapters", None) or ()),
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype_from_name(self.dtype)


@dataclass(frozen=True)
class SamplingConfig:
    """What one sampling run asks for, validated once: steps and counts >= 1, sizes positive multiples of
    `factor` (the model's pixels per latent cell times its patch size; 8 until the model is known, then
    `check_size(model_factor)`)."""

    prompt: str | None = None
    negative_prompt: str = ""
    num_inference_steps: int = 50
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    eta: float = 0.0
    num_images: int = 1
    factor: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise UsageError(f"--num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if not isinstance(self.num_images, int) or self.num_images < 1:
            raise UsageError(f"--num_images must be at least 1, got {self.num_images}")
        if self.guidance_scale is not None and not math.isfinite(self.guidance_scale):
            raise UsageError(f"--guidance_scale must be a finite number, got {self.guidance_scale}")
        if not math.isfinite(self.eta) or self.eta < 0:
            raise UsageError(f"--eta must be 0 or more, got {self.eta}")
        self.check_size(self.factor)

    def check_size(self, factor: int) -> None:
        """Refuse a height/width that is not a positive multiple of `factor` (the model's spatial factor)."""
        for flag in ("height", "width"):
            value = getattr(self, flag)
            if value is not None and (value <= 0 or value % factor):
                raise UsageError(f"--{flag} must be a positive multiple of {factor} for this model, got {value}")

    @classmethod
    def from_args(cls, ns: argparse.Namespace, *, factor: int = 8) -> SamplingConfig:
        """Read the `add_sampling_args` flags (and `--num_images` when the script has it), validated here."""
        return cls(
            prompt=getattr(ns, "prompt", None),
            negative_prompt=getattr(ns, "negative_prompt", "") or "",
            num_inference_steps=ns.num_inference_steps,
            guidance_scale=getattr(ns, "guidance_scale", None),
            height=getattr(ns, "height", None),
            width=getattr(ns, "width", None),
            seed=getattr(ns, "seed", 0) if getattr(ns, "seed", None) is not None else 0,
            eta=getattr(ns, "eta", 0.0),
            num_images=getattr(ns, "num_images", 1),
            factor=factor,
        )


def add_output_args(parser: argparse.ArgumentParser, default: str) -> argparse._ArgumentGroup:
    """The `--output` flag: where a script writes its results."""
    group = parser.add_argument_group("output")
    group.add_argument("--output", default=default, help="where to write the results (default: %(default)s)")
    return group


def torch_dtype_from_name(name: str) -> torch.dtype:
    """Map fp32/fp16/bf16 (also float32/float16/bfloat16 and accelerate's "no") to a torch dtype."""
    import torch

    try:
        return getattr(torch, _DTYPE_NAMES[name.lower()])
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_CHOICES)}") from None
