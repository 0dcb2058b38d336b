"""SynCD training, bad input from a hurried user: one `error: ...` line, exit 2, no output folder.

Each case was a traceback (or, for --resolution 0, a silent fall-back to the default) before it was fixed.
"""
from __future__ import annotations

import json

import pytest
from PIL import Image

from common.cli import run
from syncd import train


def tuple_folder(root, *, prompts: int = 3, garbage: str | None = None, text: str | None = None):
    """One SynCD tuple of three 64x64 views with masks, as the generator writes it."""
    (root / "masks").mkdir(parents=True)
    names = [f"0_0_{k}.jpg" for k in range(3)]
    for k, name in enumerate(names):
        Image.new("RGB", (64, 64), (40 * k, 90, 160)).save(root / name)
        Image.new("L", (64, 64), 255).save(root / "masks" / name)
    if garbage:
        (root / garbage).write_bytes(b"garbage" * 30)
    entry = {"filenames": names, "prompts": [f"a cat, view {k}" for k in range(prompts)], "objaverse_id": None,
             "category": "deformable"}
    (root / "metadata_0.json").write_text(text if text is not None else json.dumps([entry]))
    return root


def one_line_error(capsys, data, out, *extra) -> str:
    with pytest.raises(SystemExit) as e:
        run(train.main, ["--model", "flux", "--pretrained_model_name_or_path", "tiny-flux", "--train_data_dir",
                         str(data), "--max_train_steps", "1", "--report_to", "none", "--output_dir", str(out),
                         *(extra or ("--resolution", "64"))])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    assert not out.exists()
    return err


def test_unreadable_image(tmp_path, capsys, fresh_accelerate_state):
    err = one_line_error(capsys, tuple_folder(tmp_path / "d", garbage="0_0_1.jpg"), tmp_path / "out")
    assert "cannot read image" in err and "0_0_1.jpg" in err


def test_prompt_count_differs_from_images(tmp_path, capsys, fresh_accelerate_state):
    err = one_line_error(capsys, tuple_folder(tmp_path / "d", prompts=2), tmp_path / "out")
    assert "tuple 0 has 3 filenames but 2 prompts" in err


@pytest.mark.parametrize("text, match", [("[{bad", "is not valid JSON"), ('{"filenames": []}', "must hold a list"),
                                         ('[{"filenames": ["a.jpg"]}]', 'needs lists "filenames" and "prompts"')])
def test_bad_metadata_file(tmp_path, capsys, fresh_accelerate_state, text, match):
    assert match in one_line_error(capsys, tuple_folder(tmp_path / "d", text=text), tmp_path / "out")


@pytest.mark.parametrize("resolution", ["0", "60"])
def test_resolution_not_a_multiple(tmp_path, capsys, fresh_accelerate_state, resolution):
    """--resolution 0 fell back to 512 silently; 60 is not a multiple of FLUX's 16."""
    err = one_line_error(capsys, tuple_folder(tmp_path / "d"), tmp_path / "out", "--resolution", resolution)
    assert f"--resolution must be a positive multiple of 16 for flux, got {resolution}" in err
