"""Runners end to end on written fixtures with tiny random backbones; bad inputs give one-line errors."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import UsageError
from common.eval import tiny
from mipadapter.eval_protocol import main as main_mipadapter
from customdiffusion.eval_protocol import main as main_customdiffusion
from common.eval.similarity import paired_cosine, pairwise_mean
from eval_fixtures import random_image, write_customconcept101, write_samples

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(tmp_path):
    return write_customconcept101(tmp_path / "cc101")


def _args(bench, samples, tmp_path, *extra):
    return ["--benchmark_root", str(bench), "--sample_root", str(samples), "--tiny_backbones", "--device", "cpu",
            "--feature_cache", str(tmp_path / "cache"), "--no-progress", *extra]


def test_customdiffusion_single_end_to_end(bench, tmp_path, capsys):
    samples = tmp_path / "samples"
    prompts = ["photo of a <new1> cat", "<new1> cat in the snow"]
    paths = write_samples(samples / "pet_cat1", prompts, per_prompt=2)
    res = main_customdiffusion(_args(bench, samples, tmp_path, "--numgen", "4"))
    # CLIP-T is computed on the prompt with the modifier token removed
    clip = tiny.tiny_clip()
    img = clip.encode_images(paths)
    cos = paired_cosine(img, clip.encode_texts(["photo of a cat"] * 2 + ["cat in the snow"] * 2))
    assert res["mean"]["clip_t"] == pytest.approx(float(2.5 * cos.clamp(min=0).mean()), abs=1e-5)
    assert res["mean"]["clip_t_cos"] == pytest.approx(float(cos.mean()), abs=1e-5)
    with_token = paired_cosine(img, clip.encode_texts([p for p in prompts for _ in range(2)]))
    assert abs(float(with_token.mean() - cos.mean())) > 1e-4  # so the check above does see the stripping
    refs = sorted((bench / "benchmark_dataset" / "pet_cat1").iterdir())
    assert res["mean"]["clip_i"] == pytest.approx(float(pairwise_mean(img, clip.encode_images(refs)).mean()), abs=1e-5)
    dino = tiny.tiny_vit()
    d = pairwise_mean(dino.encode_images(paths), dino.encode_images(refs)).mean()
    assert res["mean"]["dino"] == pytest.approx(float(d), abs=1e-5)
    out = samples / "eval"
    summary = (out / "summary.md").read_text()
    assert "| Custom Diffusion (paper) | 0.7602 | 0.7440 | 0.5311 |" in summary and "(ours)" in summary
    rows = list(csv.DictReader(open(out / "per_concept.csv")))
    assert [r["task"] for r in rows] == ["pet_cat1"] and rows[0]["n_images"] == "4"
    assert (out / "contact_sheet.png").stat().st_size > 0
    assert "6 computed" in summary  # 3 references x (CLIP, DINO)
    # re-running takes the reference features from the cache
    main_customdiffusion(_args(bench, samples, tmp_path, "--paper_steps", "50"))
    summary = (out / "summary.md").read_text()
    assert "0 computed" in summary and "0.7583" in summary


def test_mipadapter_averages_over_both_concepts(bench, tmp_path):
    samples = tmp_path / "mip"
    paths = write_samples(samples / "comb_0", ["cat sitting on chair.", "chair next to cat on the beach."],
                          per_prompt=1, samples_dir=False)
    res = main_mipadapter(_args(bench, samples, tmp_path))
    clip = tiny.tiny_clip()
    gen = clip.encode_images(paths)
    parts = [float(pairwise_mean(gen, clip.encode_images(sorted((bench / "benchmark_dataset" / c).iterdir()))).mean())
             for c in ("pet_cat1", "furniture_chair1")]
    task = res["per_task"]["pet_cat1+furniture_chair1"]
    assert task["clip_i_0"] == pytest.approx(parts[0], abs=1e-5) and task["clip_i_1"] == pytest.approx(parts[1], abs=1e-5)
    assert res["mean"]["clip_i"] == pytest.approx(sum(parts) / 2, abs=1e-5)
    assert "| MIP-Adapter (sdxl_plus), original data (paper) | 0.7765 | 0.6950 | 0.4397 |" in (
        samples / "eval" / "summary.md").read_text()


def test_bad_inputs_are_usage_errors(bench, tmp_path):
    samples = tmp_path / "samples"
    folder = samples / "pet_cat1"
    write_samples(folder, ["photo of a <new1> cat"], per_prompt=2)
    with pytest.raises(UsageError, match="100 were expected"):
        main_customdiffusion(_args(bench, samples, tmp_path, "--numgen", "100"))
    random_image(folder / "samples" / "extra.png", 5)
    with pytest.raises(UsageError, match=r"without a prompt record \(e\.g\. extra\.png\)"):
        main_customdiffusion(_args(bench, samples, tmp_path))
    table = json.loads((folder / "prompts.json").read_text())
    (folder / "prompts.json").write_text(json.dumps({**table, "extra": "x"}))
    (folder / "samples" / "extra.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match="cannot read image .*extra.png"):
        main_customdiffusion(_args(bench, samples, tmp_path))
    with pytest.raises(UsageError, match="no generated images for furniture_chair1"):
        main_customdiffusion(_args(bench, samples, tmp_path, "--concepts", "furniture_chair1"))
    with pytest.raises(UsageError, match="--generate needs the Custom Diffusion sampler"):
        main_customdiffusion(_args(bench, samples, tmp_path, "--generate"))
    with pytest.raises(UsageError, match="no concept folders"):
        main_mipadapter(_args(bench, samples, tmp_path))


@pytest.mark.parametrize("script", ["eval_customdiffusion.py", "eval_mipadapter.py"])
def test_scripts_answer_help_and_one_line_errors(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, whatever `pip install -e` points at
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    assert out.returncode == 0 and "--sample_root" in out.stdout and "--generate" in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--sample_root", str(tmp_path),
                          "--benchmark_root", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "dataset" in bad.stderr


def test_dreambench_runner_drops_the_token_for_clip_t(tmp_path):
    from common.eval.runners import main_dreambench
    from eval_fixtures import write_dreambench

    bench = write_dreambench(tmp_path / "db")
    samples = tmp_path / "samples"
    prompts = ["a sks dog in the jungle", "a sks dog swimming"]
    paths = write_samples(samples / "dog", prompts, per_prompt=1)
    res = main_dreambench(_args(bench, samples, tmp_path))
    assert list(res["per_task"]) == ["dog"] and res["n_images"] == 2
    clip = tiny.tiny_clip()
    img = clip.encode_images(paths)
    txt = clip.encode_texts(["a dog in the jungle", "a dog swimming"])
    expected = (2.5 * paired_cosine(img, txt).clamp(min=0)).mean().item()
    assert res["mean"]["clip_t"] == pytest.approx(expected, abs=1e-5)
    assert "DreamBench" in (samples / "eval" / "summary.md").read_text()
