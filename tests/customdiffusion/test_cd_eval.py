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


def test_out_of_step_folder_is_refused_and_generate_redoes_an_interrupted_one(tmp_path, concept, capsys, cli):
    bench = write_customconcept101(tmp_path / "cc101")
    save_diffusers(concept(build_tiny("tiny-sd")), tmp_path / "concepts" / "pet_cat1")
    gen = ["--generate", "--ckpt", "tiny-sd", "--concepts_root", str(tmp_path / "concepts"),
           "--num_inference_steps", "1", "--samples_per_prompt", "1", "--sample_batch_size", "1"]
    main(_args(bench, tmp_path, *gen))
    folder = tmp_path / "samples" / "pet_cat1"
    (folder / "samples" / "1.png").unlink()  # as if the run had been killed between an image and its record
    code, err = cli(main, _args(bench, tmp_path, "--numgen", "2"))
    assert code == 2 and len(err) == 1 and "out of step" in err[0] and "1 prompt record(s) without an image" in err[0]
    capsys.readouterr()
    result = main(_args(bench, tmp_path, *gen))  # --generate samples the incomplete concept again
    assert "pet_cat1: 1 of 2 images (interrupted run or other settings), sampling again" in capsys.readouterr().out
    assert result["n_images"] == 2 and len(json.loads((folder / "prompts.json").read_text())) == 2


def test_generate_validates_sampling_flags_before_loading(tmp_path, cli):
    bench = write_customconcept101(tmp_path / "cc101")
    (tmp_path / "concepts" / "pet_cat1").mkdir(parents=True)
    for extra, needle in ((["--num_inference_steps", "0"], "positive integer"), (["--height", "63"], "multiple of 8")):
        code, err = cli(main, _args(bench, tmp_path, "--generate", "--concepts_root", str(tmp_path / "concepts"),
                                    *extra))
        assert code == 2 and len(err) == 1 and needle in err[0], err
