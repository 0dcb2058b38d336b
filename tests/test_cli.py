"""common.cli: config precedence and validation, one-line errors with exit code 2, shared argument groups."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import cli
from common.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def _parser(required_model=False):
    parser = cli.ArgumentParser(prog="train.py")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="lr")
    parser.add_argument("--max_train_steps", type=int, default=10, help="steps")
    parser.add_argument("--freeze_model", choices=["crossattn_kv", "crossattn"], default="crossattn_kv", help="which")
    parser.add_argument("--with_prior_preservation", action="store_true", help="prior")
    parser.add_argument("--instance_prompt", default="a photo", help="prompt")
    cli.add_model_args(parser, required=required_model)
    return parser


def _yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_precedence_cli_over_config_over_defaults(tmp_path):
    config = _yaml(tmp_path, 'learning_rate: "1e-4"\nmax-train-steps: 20\nwith_prior_preservation: true\n')
    args = cli.parse_args(_parser(), ["--config", config, "--max_train_steps", "30"])
    assert args.learning_rate == pytest.approx(1e-4) and isinstance(args.learning_rate, float)
    assert args.max_train_steps == 30  # command line beats config
    assert args.with_prior_preservation is True  # config beats default
    assert args.instance_prompt == "a photo"  # default stays
    assert args.dtype == "fp32"


def test_unknown_config_key_suggests_close_names(tmp_path):
    config = _yaml(tmp_path, "learning_rat: 1.0e-5\n")
    with pytest.raises(UsageError, match=r"unknown key in config .*learning_rat \(did you mean learning_rate\?\)"):
        cli.parse_args(_parser(), ["--config", config])


def test_required_flag_satisfied_by_config_or_alias(tmp_path):
    parser = _parser(required_model=True)
    config = _yaml(tmp_path, "model: tiny-sd\n")  # the alias --model works as a key too
    assert cli.parse_args(parser, ["--config", config]).pretrained_model_name_or_path == "tiny-sd"
    assert cli.parse_args(parser, ["--model", "tiny-sd15"]).pretrained_model_name_or_path == "tiny-sd15"
    with pytest.raises(UsageError, match="required: --pretrained_model_name_or_path/--model"):
        cli.parse_args(parser, [])
    assert all(a.required for a in parser._actions if a.dest == "pretrained_model_name_or_path")


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("freeze_model: everything\n", r"freeze_model: invalid choice: 'everything'"),
        ("max_train_steps: 1.5\n", r"max_train_steps: invalid int value: '1.5'"),
        ("with_prior_preservation: yes please\n", "must be true or false"),
        ("learning_rate: [1, 2]\n", "takes a single value"),
        ("learning_rate: 1\n  bad: indent\n", "not valid YAML at line 2"),
        ("- a list\n", "must map flag names to values"),
        ("model: a\npretrained_model_name_or_path: b\n", "sets pretrained_model_name_or_path twice"),
    ],
)
def test_bad_config_values_are_usage_errors(tmp_path, text, pattern):
    with pytest.raises(UsageError, match=pattern):
        cli.parse_args(_parser(), ["--config", _yaml(tmp_path, text)])


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="config file not found: .*nope.yaml"):
        cli.parse_args(_parser(), ["--config", str(tmp_path / "nope.yaml")])


def _run_script(*argv):
    code = (
        "from common import cli\n"
        "def main(argv=None):\n"
        "    p = cli.ArgumentParser(prog='train.py')\n"
        "    p.add_argument('--freeze_model', choices=['crossattn_kv', 'crossattn'], default='crossattn_kv')\n"
        "    p.add_argument('--fail', action='store_true')\n"
        "    cli.add_sampling_args(p)\n"
        "    args = cli.parse_args(p, argv)\n"
        "    if args.fail:\n"
        "        raise cli.UsageError('first line\\nsecond line')\n"
        "cli.run(main)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_invalid_choice_is_one_line_and_exit_code_2():
    result = _run_script("--freeze_model", "x")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: argument --freeze_model: invalid choice: 'x' (choose from")


def test_multiline_usage_error_prints_one_line():
    result = _run_script("--fail")
    assert result.returncode == 2 and result.stderr == "error: first line second line\n"


def test_help_exits_zero_and_lists_defaults():
    result = _run_script("--help")
    assert result.returncode == 0, result.stderr
    assert "--num_inference_steps" in result.stdout and "(default: 50)" in result.stdout
    assert "--config" in result.stdout


def test_keyboard_interrupt_exits_130(capsys):
    def main(argv=None):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, [])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.count("\n") == 1


def test_shared_groups_defaults():
    parser = cli.ArgumentParser()
    cli.add_sampling_args(parser, steps=30, guidance_scale=5.0, height=512)
    cli.add_output_args(parser, "out.png")
    args = cli.parse_args(parser, ["--prompt", "a cat"])
    assert (args.num_inference_steps, args.guidance_scale, args.height, args.width) == (30, 5.0, 512, None)
    assert (args.seed, args.eta, args.negative_prompt, args.output) == (0, 0.0, "", "out.png")
    for action in parser._actions:
        assert action.help, action.dest


def test_torch_dtype_from_name():
    assert cli.torch_dtype_from_name("bf16") is torch.bfloat16
    assert cli.torch_dtype_from_name("float16") is torch.float16
    assert cli.torch_dtype_from_name("no") is torch.float32
    with pytest.raises(UsageError, match="unknown dtype 'fp8'"):
        cli.torch_dtype_from_name("fp8")


def test_append_flags_from_config_keep_their_shape_and_the_command_line_replaces_them(tmp_path):
    parser = cli.ArgumentParser()
    parser.add_argument("--camera_azims", type=int, nargs="*", action="append")
    parser.add_argument("--tag", action="append")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("camera_azims: [10, 20]\ntag: [a, b]\n")
    args = cli.parse_args(parser, ["--config", str(cfg)])
    assert args.camera_azims == [[10, 20]] and args.tag == ["a", "b"]
    cfg.write_text("camera_azims: [[10, 20], [30]]\n")
    assert cli.parse_args(parser, ["--config", str(cfg)]).camera_azims == [[10, 20], [30]]
    args = cli.parse_args(parser, ["--config", str(cfg), "--camera_azims", "5"])
    assert args.camera_azims == [[5]]


# ------------------------------------------------------------------------------------- dialect and configs


def test_model_aliases_and_a_scripts_own_flag_wins():
    parser = cli.ArgumentParser()
    cli.add_model_args(parser, default="tiny-sd")
    for flag in ("--pretrained_model_name_or_path", "--model", "--ckpt", "--sd_path"):
        assert cli.parse_args(parser, [flag, "x"]).pretrained_model_name_or_path == "x"
    own = cli.ArgumentParser()
    own.add_argument("--ckpt", default="mine", help="a method's own checkpoint flag")
    cli.add_model_args(own)
    args = cli.parse_args(own, ["--ckpt", "c", "--model", "m"])
    assert (args.ckpt, args.pretrained_model_name_or_path) == ("c", "m")


def test_sampling_defaults_by_flag_name_and_steps_alias():
    parser = cli.ArgumentParser()
    cli.add_sampling_args(parser, num_inference_steps=30, guidance_scale=None, seed=5, negative_prompt="bad")
    args = cli.parse_args(parser, ["--steps", "4"])
    assert (args.num_inference_steps, args.guidance_scale, args.seed, args.negative_prompt) == (4, None, 5, "bad")
    with pytest.raises(TypeError, match="num_inference_step"):
        cli.add_sampling_args(cli.ArgumentParser(), num_inference_step=3)


@pytest.mark.parametrize("argv, pattern", [
    (["--steps", "0"], r"--num_inference_steps/--steps: must be a positive integer \(>= 1\), got 0"),
    (["--num_inference_steps", "-2"], "got -2"),
    (["--width", "-8"], "--width: must be a positive integer"),
    (["--steps", "two"], "invalid int value: 'two'"),
])
def test_bad_sampling_flags_are_one_line_usage_errors(argv, pattern):
    parser = cli.ArgumentParser()
    cli.add_sampling_args(parser)
    with pytest.raises(UsageError, match=pattern):
        cli.parse_args(parser, argv)


def test_config_files_go_through_the_same_checks(tmp_path):
    parser = cli.ArgumentParser()
    cli.add_sampling_args(parser)
    with pytest.raises(UsageError, match="num_inference_steps: must be a positive integer"):
        cli.parse_args(parser, ["--config", _yaml(tmp_path, "num_inference_steps: 0\n")])
    assert cli.parse_args(parser, ["--config", _yaml(tmp_path, "steps: 3\n")]).num_inference_steps == 3


def test_typed_configs_validate_once():
    parser = cli.ArgumentParser()
    cli.add_model_args(parser, default="tiny-sd")
    cli.add_sampling_args(parser, height=64)
    args = cli.parse_args(parser, ["--prompt", "p", "--dtype", "bf16"])
    model, sampling = cli.ModelConfig.from_args(args), cli.SamplingConfig.from_args(args)
    assert model.torch_dtype is torch.bfloat16 and model.pretrained_model_name_or_path == "tiny-sd"
    assert (sampling.prompt, sampling.height, sampling.num_inference_steps, sampling.num_images) == ("p", 64, 50, 1)
    with pytest.raises(UsageError, match="--num_inference_steps must be at least 1, got 0"):
        cli.SamplingConfig(num_inference_steps=0)
    with pytest.raises(UsageError, match="--num_images must be at least 1, got 0"):
        cli.SamplingConfig(num_images=0)
    with pytest.raises(UsageError, match="--width must be a positive multiple of 16 for this model, got 72"):
        cli.SamplingConfig(width=72, factor=16)
    cli.SamplingConfig(width=72).check_size(8)
    with pytest.raises(UsageError, match="multiple of 16"):
        cli.SamplingConfig(width=72).check_size(16)
    with pytest.raises(UsageError, match="no model"):
        cli.ModelConfig("")
    with pytest.raises(UsageError, match="unknown --device 'gpu'"):
        cli.ModelConfig("tiny-sd", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            cli.ModelConfig("tiny-sd", device="cuda")
    with pytest.raises(UsageError, match="finite"):
        cli.SamplingConfig(guidance_scale=float("nan"))
