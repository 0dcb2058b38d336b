"""Bad input to scripts/sample.py (issue 14 §5): one `error: ...` line, exit code 2, earlier outputs untouched,
and every check that can fail runs before sampling (most before the model loads)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from common.cli import run
from plainsample import sample as plain

ROOT = Path(__file__).resolve().parents[1]
OK = ["--model", "tiny-sd", "--prompt", "a dog", "--num_inference_steps", "1"]


@pytest.fixture
def earlier(tmp_path) -> Path:
    """An earlier result at the output path every bad command names."""
    out = tmp_path / "out.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the pipeline loads: these refusals must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("common.models.loading.load_pipeline", refuse)


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started before the input was checked")

    monkeypatch.setattr("common.pipelines.text2image.generate", refuse)


def one_line_exit_2(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(plain.main, argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.mark.parametrize("flags, needle", [
    (["--num_inference_steps", "0"], "argument --num_inference_steps/--steps: must be a positive integer (>= 1)"),
    (["--num_inference_steps", "-5"], "got -5"),
    (["--steps", "0"], "got 0"),
    (["--num_images", "0"], "argument --num_images: must be a positive integer (>= 1), got 0"),
    (["--height", "0"], "argument --height: must be a positive integer"),
    (["--height", "63"], "--height must be a positive multiple of 8 for this model, got 63"),
])
def test_bad_counts_are_refused_before_the_model_loads(capsys, earlier, no_model_load, flags, needle):
    before = earlier.read_bytes()
    line = one_line_exit_2(capsys, [*OK, "--output", str(earlier), *flags])
    assert needle in line
    assert earlier.read_bytes() == before


def test_output_under_an_existing_file(capsys, tmp_path, earlier, no_model_load):
    line = one_line_exit_2(capsys, [*OK, "--output", str(earlier / "sub" / "x.png")])
    assert line == f"error: cannot write {earlier / 'sub' / 'x.png'}: {earlier} is a file, not a folder; " \
                   "choose another path"
    assert earlier.is_file()


def test_output_that_is_a_folder(capsys, tmp_path, no_model_load):
    (tmp_path / "d.png").mkdir()
    assert "it is a folder" in one_line_exit_2(capsys, [*OK, "--output", str(tmp_path / "d.png")])


def test_output_on_a_read_only_location_is_found_before_sampling(capsys, tmp_path, no_model_load, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    line = one_line_exit_2(capsys, [*OK, "--output", str(tmp_path / "a" / "x.png")])
    assert "is not writable (Read-only file system)" in line
    assert list(tmp_path.iterdir()) == []  # not even the folder was created


def test_output_in_a_folder_without_write_permission(capsys, no_model_load):
    # /sys refuses new files even to root, as a read-only mount would
    line = one_line_exit_2(capsys, [*OK, "--output", "/sys/sample.png"])
    assert "cannot write /sys/sample.png: /sys is not writable" in line


def test_a_size_that_cannot_fit_is_refused_before_sampling(capsys, earlier, no_sampling):
    before = earlier.read_bytes()
    line = one_line_exit_2(capsys, [*OK, "--output", str(earlier), "--height", "65536", "--width", "65536"])
    assert "image(s) of 65536x65536 needs at least" in line and "use a smaller --height/--width" in line
    assert earlier.read_bytes() == before


def test_memory_estimate_is_a_lower_bound_that_scales_with_pixels_and_images():
    from common.models.tiny import build_tiny
    from plainsample.memory import check_fits, estimate_sampling_bytes

    import torch

    pipe = build_tiny("tiny-sd")
    c = pipe.vae.config.block_out_channels[0]
    one = estimate_sampling_bytes(pipe, 64, 64, 1, torch.float32)
    assert one == 64 * 64 * (3 * c + 3) * 4
    assert estimate_sampling_bytes(pipe, 128, 64, 3, torch.float16) == one * 2 * 3 // 2
    check_fits(pipe, 1024, 1024, 1, "cpu", torch.float32)  # an ordinary size passes


def test_the_real_script_prints_one_line(tmp_path, earlier):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "scripts/sample.py", *OK, "--num_images", "0", "--output", str(earlier)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == ("error: argument --num_images: must be a positive integer (>= 1), got 0 "
                           "(see sample.py --help)\n")


def test_flag_mistakes_answer_without_loading_torch_or_diffusers():
    code = ("import sys; from common.cli import run; from plainsample.sample import main\n"
            "try:\n    run(main, ['--num_inference_steps', '0'])\n"
            "except SystemExit as e:\n    print(e.code, sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
