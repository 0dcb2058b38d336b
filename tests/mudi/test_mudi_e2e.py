"""End to end on tiny-sdxl through the four scripts: prior (tiny OWLv2 + SAM) -> train 3 steps with Seg-Mix and
prior preservation -> sample with the mean-shifted init -> Detect-and-Compare."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from common.cli import run
from mudi import eval as mudi_eval
from mudi import prior, sample, train
from mudi.metadata import read_metadata


@pytest.mark.slow
def test_prior_train_sample_eval(dataset_dir, tmp_path, fresh_accelerate_state, capsys):
    reg = tmp_path / "reg"
    for cid, name in (("a", "red toy"), ("b", "blue toy")):
        run(prior.main, ["--gen_class", name, "--class_id", cid, "--model", "tiny-sdxl", "--gen_mask",
                         "--owl_model", "tiny-single", "--threshold", "0", "--sam_checkpoint", "tiny",
                         "--num_images", "2", "--num_inference_steps", "2", "--out_dir", str(tmp_path / cid),
                         "--class_data_dir", str(reg), "--device", "cpu", "--dtype", "fp32"])
    class_meta = read_metadata(reg, "class_metadata.jsonl")
    assert class_meta.id_map == {"a": "red toy", "b": "blue toy"} and len(class_meta.records) == 4
    for r in class_meta.records:
        assert set(np.unique(np.asarray(Image.open(r.mask)))) <= {0, 255}

    out = tmp_path / "run"
    trainer = run(train.main, ["--model", "tiny-sdxl", "--instance_data_dir", str(dataset_dir), "--output_dir", str(out),
                               "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "3",
                               "--save_steps", "3", "--segmix_prob", "0.6", "--with_prior_preservation",
                               "--class_data_dir", str(reg), "--lr_warmup_steps", "0", "--report_to", "none",
                               "--checkpointing_steps", "0", "--seed", "1"])
    assert len(trainer.history) == 3 and (out / "save-3" / "pytorch_lora_weights.safetensors").is_file()

    samples = tmp_path / "samples"
    prompt = "a olis red toy and a hta blue toy on a beach"
    paths = run(sample.main, ["--model", "tiny-sdxl", "--lora", str(out), "--instance_data_dir", str(dataset_dir),
                              "--prompt", prompt, "--num_images", "2", "--num_inference_steps", "2",
                              "--output_dir", str(samples), "--device", "cpu"])
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    assert (samples / "a_olis_red_toy_and_a_hta_blue_toy_on_a_beach_init.png").is_file()
    (samples / "prompts.json").write_text(json.dumps({p.name: prompt for p in paths}))

    summary = run(mudi_eval.main, ["--sample_dir", str(samples), "--instance_data_dir", str(dataset_dir),
                                   "--tiny_backbones", "--threshold", "0.5", "--output", str(tmp_path / "eval"),
                                   "--device", "cpu"])
    rows = list(csv.DictReader((tmp_path / "eval" / "per_image.csv").open()))
    assert len(rows) == 2 and {"dnc", "detections", "fidelity", "clip_t"} <= set(rows[0])
    for row in rows:
        assert (float(row["dnc"]) == 0.0) == (int(row["detections"]) != 2)
    assert summary["num_images"] == 2 and (tmp_path / "eval" / "contact_sheet.png").is_file()
