"""MuDI sampling, bad input from a hurried user: one `error: ...` line, exit 2, and nothing written.

Each case here was a traceback, a silent fallback or a left-over output folder before it was fixed.
"""
from __future__ import annotations

import json

import pytest
from PIL import Image

from common.cli import run
from mudi import sample

PROMPT = "a olis red toy and a hta blue toy on a beach"


def lora_folder(path, id_map, weights: bytes | None = None):
    """A MuDI output folder as far as sampling checks it: `mudi_config.json` (+ raw weight bytes when given)."""
    path.mkdir(parents=True)
    (path / "mudi_config.json").write_text(json.dumps({"family": "sdxl", "id_map": id_map, "rank": 4}))
    if weights is not None:
        (path / "pytorch_lora_weights.safetensors").write_bytes(weights)
    return path


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        run(sample.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def argv(data, out, lora=None, *extra):
    return ["--model", "tiny-sdxl", "--instance_data_dir", str(data), "--prompt", PROMPT, "--num_images", "1",
            "--num_inference_steps", "1", "--height", "64", "--width", "64", "--output_dir", str(out),
            *(["--lora", str(lora)] if lora else []), *extra]


def test_lora_trained_on_other_subjects(make_data, tmp_path, capsys):
    """A collage folder with another number of subjects than the LoRA's (the collage silently fell back)."""
    data = make_data("one", ids=("a",))
    lora = lora_folder(tmp_path / "lora", {"a": "olis red toy", "b": "hta blue toy"})
    err = one_line_error(capsys, argv(data, tmp_path / "out", lora))
    assert "has 1 subject(s)" in err and "trained on 2" in err
    assert not (tmp_path / "out").exists()


def test_init_image_index_out_of_range(dataset_dir, tmp_path, capsys):
    """--init_image_index beyond a subject's images (it was clamped to the last image silently)."""
    err = one_line_error(capsys, argv(dataset_dir, tmp_path / "out", None, "--init_image_index", "2"))
    assert "--init_image_index 2" in err and "has 2 image(s)" in err
    err = one_line_error(capsys, argv(dataset_dir, tmp_path / "out", None, "--init_image_index", "-1"))
    assert "must be >= 0" in err
    assert not (tmp_path / "out").exists()


def test_corrupt_lora_weights(dataset_dir, tmp_path, capsys):
    """Garbage bytes in pytorch_lora_weights.safetensors (diffusers' OSError traceback before)."""
    lora = lora_folder(tmp_path / "lora", {"a": "olis red toy", "b": "hta blue toy"}, weights=b"\xff" * 3000)
    err = one_line_error(capsys, argv(dataset_dir, tmp_path / "out", lora))
    assert "is corrupt or not a weights file" in err and "pytorch_lora_weights.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_bad_reference_mask_leaves_no_output_folder(make_data, tmp_path, capsys):
    """A reference mask of the wrong size is refused before the output folder is made (an empty one was left)."""
    data = make_data()
    Image.new("L", (10, 10), 255).save(data / "mask_a00.png")
    err = one_line_error(capsys, argv(data, tmp_path / "out"))
    assert "is 10x10 but its image is 96x128" in err
    assert not (tmp_path / "out").exists()


def test_train_unreadable_image(make_data, tmp_path, capsys, fresh_accelerate_state):
    """Garbage bytes in a training image (PIL's UnidentifiedImageError traceback before), refused before any
    model loads or the output folder is made."""
    from mudi import train

    data = make_data()
    (data / "a00.png").write_bytes(b"garbage" * 20)
    with pytest.raises(SystemExit) as e:
        run(train.main, ["--model", "tiny-sdxl", "--instance_data_dir", str(data), "--resolution", "64",
                         "--max_train_steps", "1", "--report_to", "none", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: cannot read image") and "a00.png" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_sample_writes_prompts_for_eval(dataset_dir, tmp_path):
    """prompts.json maps each sample to its prompt (eval_mudi.py's CLIP-T found none before); a second prompt
    into the same folder adds to it."""
    out = tmp_path / "out"
    first = run(sample.main, argv(dataset_dir, out, None, "--gamma", "0"))
    second = run(sample.main, argv(dataset_dir, out, None, "--gamma", "0", "--prompt", "a olis red toy"))
    table = json.loads((out / "prompts.json").read_text())
    assert table == {first[0].name: PROMPT, second[0].name: "a olis red toy"}
