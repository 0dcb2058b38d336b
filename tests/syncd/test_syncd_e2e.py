"""SynCD end to end on tiny-flux: generate a 3-image deformable tuple and a 2-view rigid pair from
assets/render/torus.obj -> train 3 steps -> sample with 2 references -> evaluate with tiny backbones; bad
inputs as one line; the data generator resumes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.cli import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval_fixtures import write_dreambench  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TORUS = ROOT / "assets" / "render" / "torus.obj"


def _one_line_error(capsys, fn, argv, match):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(fn, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "\n" not in err and match in err, err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from syncd.generate import main as gen

    root = tmp_path_factory.mktemp("syncd_data")
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps([{"category": "cat", "background": ["a cat in a garden", "a cat on a sofa",
                                                                      "a cat on a beach"], "description": "a tabby cat"}]))
    common = ["--model", "tiny-flux", "--height", "64", "--inference_steps", "3"]
    gen([*common, "--outdir", str(root / "deformable"), "--prompts", str(prompts), "--score", "--tiny_backbones"])
    gen([*common, "--mode", "rigid", "--num", "2", "--mesh_dir", str(TORUS), "--outdir", str(root / "rigid")])
    return root


@pytest.mark.slow
def test_generated_layout(data):
    d = data / "deformable"
    meta = json.loads((d / "metadata_0.json").read_text())
    assert len(meta) == 1 and len(meta[0]["filenames"]) == 3 and meta[0]["category"] == "deformable"
    for name in meta[0]["filenames"]:
        assert (d / name).is_file() and (d / "masks" / name).is_file()
        assert Image.open(d / name).size == (64, 64)
    scored = json.loads((d / "metadata_with_scores.json").read_text())[0]
    assert len(scored["dino_scores"]) == 3 and set(scored["aesthetics_scores"]) == {"0_0_0", "0_0_1", "0_0_2"}
    r = json.loads((data / "rigid" / "metadata_0.json").read_text())[0]
    assert r["category"] == "rigid" and r["objaverse_id"] == "torus" and len(r["filenames"]) == 2
    assert r["warp_steps"][:1] == [0] and 2 not in r["warp_steps"]  # only while t > 0.8 (not the last step)
    mask = np.asarray(Image.open(data / "rigid" / "masks" / r["filenames"][0]).convert("L")) > 127
    assert 0.02 < mask.mean() < 0.9  # the rendered torus


@pytest.mark.slow
def test_generation_resumes(data, capsys):
    from syncd.generate import main as gen

    d = data / "deformable"
    before = {p.name: p.stat().st_mtime_ns for p in d.glob("*.jpg")}
    gen(["--model", "tiny-flux", "--height", "64", "--inference_steps", "3", "--outdir", str(d),
         "--prompts", str(data / "prompts.json")])
    assert {p.name: p.stat().st_mtime_ns for p in d.glob("*.jpg")} == before


@pytest.mark.slow
def test_train_sample_eval(data, tmp_path, capsys, fresh_accelerate_state):
    from syncd.eval import main as evaluate
    from syncd.sample import main as sample
    from syncd.train import main as train

    out = tmp_path / "model"
    trainer = train(["--model", "flux", "--pretrained_model_name_or_path", "tiny-flux", "--train_data_dir",
                     str(data / "deformable"), str(data / "rigid"), "--resolution", "64", "--max_train_steps", "3",
                     "--gradient_accumulation_steps", "1", "--output_dir", str(out), "--report_to", "none",
                     "--rank", "4", "--checkpointing_steps", "0"])
    assert trainer.global_step == 3 and (out / "pytorch_model.safetensors").is_file()
    assert json.loads((out / "adapter.json").read_text())["kind"] == "syncd"
    from common.models.adapters import apply_adapter
    from common.models.loading import load_pipeline
    from common.train.lora import lora_state_dict

    pipe = load_pipeline("tiny-flux")
    apply_adapter(pipe, out / "lora")  # the diffusers-format copy loads through the adapter seam
    from common.io import load_weights
    ours = load_weights(out / "pytorch_model.safetensors")
    loaded = lora_state_dict(pipe.transformer, adapter_name=next(iter(pipe.transformer.peft_config)))
    assert len(loaded) == len(ours)
    bench = write_dreambench(tmp_path / "db")
    samples = tmp_path / "samples"
    argv = ["--model", "tiny-flux", "--prompt", "a sks dog in the jungle", "--ref_images",
            str(bench / "dataset" / "dog"), "--numref", "2", "--finetuned_path", str(out), "--inference_steps", "2",
            "--num_images_per_prompt", "2", "--height", "64", "--true_cfg_scale", "1.5", "--outdir", str(samples)]
    paths = sample(argv)
    assert [p.name for p in paths] == ["a_sks_dog_in_the_jungle_0.png", "a_sks_dog_in_the_jungle_1.png"]
    _one_line_error(capsys, sample, argv, "exists")  # never silently overwrite
    for folder, names in ((samples / "dog", [p.name for p in paths]), (bench / "dataset" / "dog", ["00.png", "01.png"])):
        (folder / "masks").mkdir(exist_ok=True)
        for n in names:
            Image.fromarray(np.full((64, 64), 255, np.uint8)).save(folder / "masks" / n)
    capsys.readouterr()
    result = evaluate(["--sample_root", str(samples), "--benchmark_root", str(bench), "--tiny_backbones",
                       "--feature_cache", str(tmp_path / "cache"), "--no-progress"])
    assert set(result["mean"]) >= {"clip_t", "clip_i", "dino"} and "mdino" in result
    assert 0 < result["mdino"]["mean"] <= 1.0 + 1e-6


def test_bad_inputs_one_line(tmp_path, capsys):
    import torch

    from syncd.sample import main as sample
    from syncd.train import main as train

    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (i * 100, 0, 0)).save(refs / f"{i}.png")
    _one_line_error(capsys, sample, ["--model", "tiny-flux", "--ref_images", str(refs), "--numref", "3",
                                     "--outdir", str(tmp_path / "o")], "--numref 3 but --ref_images gives 2")
    bad = tmp_path / "bad.bin"
    torch.save({"transformer.transformer_blocks.0.attn.to_q.lora_A.default.weight": torch.zeros(4, 32)}, bad)
    _one_line_error(capsys, sample, ["--model", "tiny-flux", "--ref_images", str(refs), "--numref", "1",
                                     "--finetuned_path", str(bad), "--outdir", str(tmp_path / "o")],
                    "0 of 1 LoRA keys start with 'transformer.base_model.model.'")
    data = tmp_path / "data"
    (data / "masks").mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (64, 64)).save(data / f"0_0_{k}.jpg")
        Image.new("RGB", (32, 32)).save(data / "masks" / f"0_0_{k}.jpg")
    (data / "metadata_0.json").write_text(json.dumps([{"filenames": ["0_0_0.jpg", "0_0_1.jpg"], "prompts": ["a", "b"]}]))
    _one_line_error(capsys, train, ["--model", "tiny-flux", "--train_data_dir", str(data), "--output_dir",
                                    str(tmp_path / "m"), "--report_to", "none"], "is 32x32, its image 64x64")


@pytest.mark.slow
def test_sdxl_train_and_sample_with_kv_bank(data, tmp_path, capsys, fresh_accelerate_state):
    from common.io import load_weights
    from syncd.sample import main as sample
    from syncd.train import main as train

    out = tmp_path / "sdxl"
    train(["--model", "sdxl", "--pretrained_model_name_or_path", "tiny-sdxl", "--train_data_dir",
           str(data / "deformable"), "--resolution", "64", "--max_train_steps", "1", "--gradient_accumulation_steps",
           "1", "--output_dir", str(out), "--report_to", "none", "--masked", "--optimizer", "adamw",
           "--checkpointing_steps", "0"])
    assert all(k.startswith("unet.") and ".base_model." not in k for k in load_weights(out / "pytorch_model.safetensors"))
    paths = sample(["--model", "tiny-sdxl", "--ref_images", str(data / "deformable"), "--numref", "2",
                    "--finetuned_path", str(out), "--inference_steps", "2", "--num_images_per_prompt", "1",
                    "--height", "64", "--ref_category", "cat", "--outdir", str(tmp_path / "s")])
    assert Image.open(paths[0]).size == (64, 64)
