"""eval_customdiffusion.py --generate: samples each trained concept into the sample layout, then scores it."""
from __future__ import annotations

import json

import pytest

from common.errors import UsageError
from common.models.tiny import build_tiny
from customdiffusion.eval import main
from customdiffusion.formats import save_diffusers
from eval_fixtures import write_customconcept101


def _args(bench, tmp_path, *extra):
    return ["--benchmark_root", str(bench), "--sample_root", str(tmp_path / "samples"), "--tiny_backbones",
            "--device", "cpu", "--feature_cache", str(tmp_path / "cache"), "--no-progress", *extra]


def test_generate_then_score_and_skip_existing(tmp_path, concept, capsys):
    bench = write_customconcept101(tmp_path / "cc101")
    save_diffusers(concept(build_tiny("tiny-sd")), tmp_path / "concepts" / "pet_cat1")
    gen = ["--generate", "--ckpt", "tiny-sd", "--concepts_root", str(tmp_path / "concepts"),
           "--num_inference_steps", "1", "--samples_per_prompt", "2", "--sample_batch_size", "2"]
    result = main(_args(bench, tmp_path, *gen))
    prompts = json.loads((tmp_path / "samples" / "pet_cat1" / "prompts.json").read_text())
    assert sorted(prompts.values()) == sorted(["photo of a <new1> cat"] * 2 + ["<new1> cat in the snow"] * 2)
    assert result["n_images"] == 4 and list(result["per_task"]) == ["pet_cat1"]
    main(_args(bench, tmp_path, *gen))
    assert "pet_cat1: images exist, skipped" in capsys.readouterr().out


def test_generate_needs_trained_concepts(tmp_path):
    bench = write_customconcept101(tmp_path / "cc101")
    with pytest.raises(UsageError, match="--concepts_root"):
        main(_args(bench, tmp_path, "--generate"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no trained concept"):
        main(_args(bench, tmp_path, "--generate", "--concepts_root", str(tmp_path / "empty")))
