"""scripts/sample.py: writes a PNG atomically, answers --help, and bad input is one line with exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import UsageError
from plainsample.sample import main

ROOT = Path(__file__).resolve().parents[1]


def test_sample_writes_png_equal_across_runs_and_seed_sensitive(tmp_path):
    out = tmp_path / "a.png"
    main(["--model", "tiny-sd", "--prompt", "a dog", "--num_inference_steps", "2", "--output", str(out)])
    first = np.asarray(Image.open(out))
    main(["--model", "tiny-sd", "--prompt", "a dog", "--num_inference_steps", "2", "--output", str(out)])
    assert np.array_equal(first, np.asarray(Image.open(out)))
    main(["--model", "tiny-sd", "--prompt", "a dog", "--num_inference_steps", "2", "--seed", "1",
          "--output", str(out)])
    assert not np.array_equal(first, np.asarray(Image.open(out)))
    assert first.shape == (64, 64, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left behind


@pytest.mark.parametrize("argv,needle", [
    (["--prompt", "x", "--height", "63"], "multiple of 8"),
    (["--prompt", "x", "--output", "a.jpg"], ".png"),
    ([], "no prompt"),
    (["--prompt", "x", "--model", "no-such-model"], "unknown model"),
])
def test_bad_input_raises_usage_error(argv, needle):
    with pytest.raises(UsageError, match=needle):
        main(argv)


def test_cli_one_line_error_and_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # plainsample is found without reinstalling the editable package
    bad = subprocess.run([sys.executable, "scripts/sample.py", "--prompt", "x", "--dtype", "fp8"], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "fp8" in bad.stderr
    ok = subprocess.run([sys.executable, "scripts/sample.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                        env=env)
    assert ok.returncode == 0
    for flag in ["--prompt", "--negative_prompt", "--num_inference_steps", "--guidance_scale", "--height", "--width",
                 "--seed", "--output", "--config", "--steps", "--model", "--ckpt", "--sd_path", "--num_images"]:
        assert flag in ok.stdout


def test_flag_aliases_give_the_same_config():
    from common.cli import parse_args
    from plainsample.sample import SampleConfig, build_parser

    configs = {
        SampleConfig.from_args(parse_args(build_parser(), argv))
        for argv in (
            ["--pretrained_model_name_or_path", "tiny-sd", "--num_inference_steps", "7", "--prompt", "p"],
            ["--model", "tiny-sd", "--steps", "7", "--prompt", "p"],
            ["--ckpt", "tiny-sd", "--steps", "7", "--prompt", "p"],
            ["--sd_path", "tiny-sd", "--steps", "7", "--prompt", "p"],
        )
    }
    assert len(configs) == 1
    (cfg,) = configs
    assert (cfg.model.pretrained_model_name_or_path, cfg.sampling.num_inference_steps) == ("tiny-sd", 7)

