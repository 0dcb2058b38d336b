"""Sampling with a loaded concept: deterministic per seed, changed by the trained K/V, files written in step
with their prompt records, earlier samples never overwritten, bad inputs one line and exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import UsageError
from customdiffusion import formats as F
from customdiffusion.outputs import check_in_step
from customdiffusion.sample import main, sample_to_folder

ROOT = Path(__file__).resolve().parents[2]


def _run(pipe, concept, out, **kw):
    paths = sample_to_folder(pipe, concept, prompts=["a <new1> dog"], outdir=out, num_images=2, batch_size=2,
                             num_inference_steps=3, seed=7, **kw)
    return [np.asarray(Image.open(p)) for p in paths]


def test_sampling_deterministic_and_personalised(tiny, concept, tokens_only, tmp_path):
    w = concept(tiny(), scale=0.5)
    F.save(w, tmp_path / "delta.safetensors")
    F.save(tokens_only(tiny(), w), tmp_path / "tokens_only.safetensors")
    a = _run(tiny(), tmp_path / "delta.safetensors", tmp_path / "a")
    b = _run(tiny(), tmp_path / "delta.safetensors", tmp_path / "b")
    # the same pipeline with <new1> added (same embedding) but K/V untouched: differs only through K/V
    ref = _run(tiny(), tmp_path / "tokens_only.safetensors", tmp_path / "c")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(not np.array_equal(x, y) for x, y in zip(a, ref))
    assert json.loads((tmp_path / "a" / "prompts.json").read_text()) == {"0": "a <new1> dog", "1": "a <new1> dog"}
    assert (tmp_path / "a" / "a-<new1>-dog.png").is_file()


def test_sample_cli_default_outdir_is_a_new_numbered_run(tiny, concept, tmp_path, snapshot):
    F.save(concept(tiny("tiny-sdxl")), tmp_path / "xl", "diffusers")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <new1> cat\n")
    argv = ["--ckpt", "tiny-sdxl", "--sdxl", "--delta_ckpt", str(tmp_path / "xl"), "--from-file", str(prompts),
            "--batch_size", "1", "--num_images", "2", "--num_inference_steps", "2", "--device", "cpu"]
    paths = main(argv)
    first = tmp_path / "xl" / "sample-001"
    assert len(paths) == 2 and all(p.parent == first / "samples" for p in paths)
    before = snapshot(first)
    again = main([*argv, "--seed", "3", "--num_images", "1"])
    assert all(p.parent == tmp_path / "xl" / "sample-002" / "samples" for p in again)
    assert snapshot(first) == before  # the earlier run is untouched
    with pytest.raises(UsageError, match="--prompt or --from-file"):
        main(["--ckpt", "tiny-sd"])


def test_outdir_with_samples_is_refused_unless_overwrite(tiny, concept, tmp_path, snapshot):
    F.save(concept(tiny()), tmp_path / "c.safetensors")
    out = tmp_path / "out"
    sample_to_folder(tiny(), tmp_path / "c.safetensors", prompts=["a <new1> dog"], outdir=out, num_images=3,
                     batch_size=3, num_inference_steps=1)
    before = snapshot(out)
    with pytest.raises(UsageError, match="already holds samples.*--overwrite"):
        _run(tiny(), tmp_path / "c.safetensors", out)
    assert snapshot(out) == before
    _run(tiny(), tmp_path / "c.safetensors", out, overwrite=True)
    # 3 old images replaced by 2 new ones: no stale image and its old record stays behind
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["0.png", "1.png"]
    assert json.loads((out / "prompts.json").read_text()) == {"0": "a <new1> dog", "1": "a <new1> dog"}


def test_interrupted_run_leaves_images_and_records_in_step(tiny, concept, tmp_path, monkeypatch):
    """Ctrl-C after the 3rd image: every image on disk has its record and no record lacks its image."""
    import customdiffusion.sample as S

    F.save(concept(tiny()), tmp_path / "c.safetensors")
    saved = []
    real = S.atomic_save_image

    def save_then_interrupt(im, path, **kw):
        real(im, path, **kw)
        saved.append(path)
        if len(saved) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(S, "atomic_save_image", save_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        sample_to_folder(tiny(), tmp_path / "c.safetensors", prompts=["a <new1> dog", "a <new1> cat"], outdir=out,
                         num_images=2, batch_size=2, num_inference_steps=1, skip_grid=True)
    # the 3rd image was written but Ctrl-C came before its record: the folder is refused, never mislabelled
    records = json.loads((out / "prompts.json").read_text())
    assert records == {"0": "a <new1> dog", "1": "a <new1> dog"}
    with pytest.raises(UsageError, match="out of step.*without a prompt record"):
        check_in_step(out)
    (out / "samples" / "2.png").unlink()
    check_in_step(out)  # a record for each image, an image for each record
    (out / "samples" / "1.png").unlink()
    with pytest.raises(UsageError, match="record.*without an image"):
        check_in_step(out)


def test_bad_input_is_one_line_exit_2_and_touches_nothing(tiny, concept, tmp_path, cli, snapshot):
    F.save(concept(tiny()), tmp_path / "concept", "diffusers")
    nan = concept(tiny())
    nan.tokens["<new1>"][0][:] = float("nan")
    F.save(nan, tmp_path / "nan", "diffusers")
    argv = ["--ckpt", "tiny-sd", "--delta_ckpt", str(tmp_path / "concept"), "--prompt", "a <new1> dog",
            "--num_inference_steps", "1", "--num_images", "1", "--device", "cpu"]
    main(argv)  # an earlier result: concept/sample-001
    before = {d: snapshot(tmp_path / d) for d in ("concept", "nan")}
    cases = [
        (["--num_inference_steps", "0"], "at least 1"),
        (["--num_inference_steps", "-3"], "at least 1"),
        (["--height", "63"], "multiple of 8"),
        (["--num_images", "0"], "positive integer"),
        (["--prompt", "a <new2> dog"], "<new2>, which the loaded concept does not define"),
        (["--delta_ckpt", str(tmp_path / "nan")], "NaN"),
        (["--outdir", str(tmp_path / "concept" / "sample-001")], "already holds samples"),
    ]
    for extra, needle in cases:
        code, err = cli(main, [*argv, *extra])
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (extra, err)
    # no new run folder, no file changed
    assert {d: snapshot(tmp_path / d) for d in ("concept", "nan")} == before


def test_exact_command_height_63():
    """The script itself (a fresh process): one line on stderr, exit 2, before any model loads."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample_customdiffusion.py"), "--ckpt", "tiny-sd",
                           "--prompt", "a dog", "--height", "63", "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--height" in proc.stderr, proc.stderr


@pytest.mark.parametrize("module", ["sample", "merge", "convert", "compress"])
def test_help_lists_every_flag(module, capsys):
    import importlib

    mod = importlib.import_module(f"customdiffusion.{module}")
    parser = mod.build_parser()
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    text = capsys.readouterr().out
    for action in parser._actions:
        for opt in action.option_strings:
            assert opt in text
