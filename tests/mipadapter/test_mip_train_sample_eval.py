"""Training (spec §5 test 23), the sampling CLI (one-line errors, weight maps, masks, step range), the metric
protocol (test 25) and the end-to-end chain train -> sample with K = 3 -> eval --generate --tiny_backbones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.cli import parse_args
from common.eval import tiny
from common.eval.similarity import paired_cosine
from common.models.ip_adapter import read_ip_adapter, save_ip_adapter
from common.models.tiny import build_tiny
from common.train import Trainer
from eval_fixtures import write_customconcept101, write_samples
from mipadapter.adapter import WEIGHTS, write_mip_manifest
from mipadapter.data import SubjectDataset, collate, write_synthetic_sample
from mipadapter.model import random_mip_state
from mipadapter.train import MIPTraining, build_parser, drop_masks

ROOT = Path(__file__).resolve().parents[2]


def train_argv(tmp_path, variant="sdxl", *extra):
    data = tmp_path / "data"
    for i in range(2):
        write_synthetic_sample(data, f"s{i}", seed=i)
    enc = {"sdxl": "tiny-clip-vision-g", "sdxl_plus": "tiny-clip-vision-h"}[variant]
    return ["--variant", variant, "--pretrained_model_name_or_path", "tiny-sdxl", "--image_encoder_path", enc,
            "--data_root", str(data), "--resolution", "64", "--train_batch_size", "2", "--report_to", "none",
            "--output_dir", str(tmp_path / "out"), "--seed", "0", *extra]


@pytest.mark.parametrize("variant", ["sdxl", "sdxl_plus"])
def test_two_steps_change_exactly_the_adapter(tmp_path, fresh_accelerate_state, variant):  # 23 (a-c)
    ip = tmp_path / "ip.safetensors"
    save_ip_adapter(random_mip_state(build_tiny("tiny-sdxl").unet, variant, gates=False), ip)
    args = parse_args(build_parser(), train_argv(tmp_path, variant, "--stop_step", "2", "--save_steps", "0",
                                                 "--pretrained_ip_adapter_path", str(ip)))
    method = MIPTraining(args)
    trainer = Trainer(args, method, SubjectDataset(args.data_root, resolution=64), collate_fn=collate)
    unet = method.adapter.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    proj_before = {k: v.clone() for k, v in method.adapter.image_proj.state_dict().items()}
    trainer.train()
    assert all(np.isfinite(loss) for _, loss in trainer.history) and len(trainer.history) == 2
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    trainable = {k for k in before if k.endswith(("to_k_ip.0.weight", "to_v_ip.0.weight", "text_to_weight.weight"))}
    assert changed == trainable and len(trainable) == 3 * 8
    assert all(torch.equal(v, proj_before[k]) for k, v in method.adapter.image_proj.state_dict().items())
    saved = read_ip_adapter(tmp_path / "out" / WEIGHTS)
    assert all(torch.equal(v, method.adapter.image_proj_state[k]) for k, v in saved["image_proj"].items())
    assert json.loads((tmp_path / "out" / "adapter.json").read_text())["kind"] == "mip_adapter"


def test_forced_drops_zero_images_and_empty_captions(tmp_path, fresh_accelerate_state):  # 23 (d)
    img, txt = drop_masks(torch.tensor([0.01, 0.07, 0.12, 0.5]), 0.05, 0.05, 0.05)
    assert img.tolist() == [True, False, True, False] and txt.tolist() == [False, True, True, False]
    from accelerate import Accelerator

    for variant in ("sdxl", "sdxl_plus"):
        args = parse_args(build_parser(), train_argv(tmp_path, variant, "--i_drop_rate", "0", "--t_drop_rate", "0",
                                                     "--ti_drop_rate", "1"))
        method = MIPTraining(args)
        method.setup(Accelerator(cpu=True))
        batch = collate([SubjectDataset(args.data_root, resolution=64)[0]])
        method._conditions(batch, torch.device("cpu"))
        seen = method.last_inputs
        assert seen["captions"] == [""] and seen["drop_image"].all()
        if variant == "sdxl":
            assert not seen["features"].any()  # zeroed pooled image embeds
        else:  # plus: the encoder saw zero pixels
            zero = method.encoder._features(torch.zeros(2, 3, 28, 28), "penultimate")
            torch.testing.assert_close(seen["features"], zero)


def _checkpoint(tmp_path, variant="sdxl"):
    folder = tmp_path / "ck"
    save_ip_adapter(random_mip_state(build_tiny("tiny-sdxl").unet, variant), folder / WEIGHTS)
    enc = {"sdxl": "tiny-clip-vision-g", "sdxl_plus": "tiny-clip-vision-h"}[variant]
    write_mip_manifest(folder, variant=variant, image_encoder=enc, scale=0.75)
    return folder


def _refs(folder, words):
    folder.mkdir(parents=True, exist_ok=True)
    for i, w in enumerate(words):
        Image.fromarray((np.random.RandomState(i).rand(40, 40, 3) * 255).astype("uint8")).save(folder / f"{w}.png")
    return folder


def test_sample_cli_one_line_errors(tmp_path):
    ck = _checkpoint(tmp_path)
    refs = _refs(tmp_path / "refs", ["cat", "dog"])
    (tmp_path / "bad.png").write_text("not an image")
    plus = tmp_path / "plus.bin"
    save_ip_adapter(random_mip_state(build_tiny("tiny-sdxl").unet, "sdxl_plus"), plus)
    from common.errors import UsageError
    from mipadapter.sample import build_parser as sample_parser, main

    base = ["--base_model_path", "tiny-sdxl", "--output_dir", str(tmp_path / "o")]
    cases = [
        (["--ip_ckpt", str(ck), "--ref", f"cat={refs / 'cat.png'}", "--prompt", "a dog"], "is not in the prompt"),
        (["--ip_ckpt", str(ck), "--ref", f"cat={refs / 'cat.png'}", "--ref", f"cat={refs / 'dog.png'}", "--prompt",
          "a cat"], "two references share the word 'cat'"),
        (["--ip_ckpt", str(ck), "--ref", f"cat={tmp_path / 'bad.png'}", "--prompt", "a cat"], "cannot read image"),
        (["--ip_ckpt", str(plus), "--is_plus", "False", "--ref", f"cat={refs / 'cat.png'}", "--prompt", "a cat"],
         "is a sdxl_plus checkpoint but sdxl was asked for"),
    ]
    for argv, message in cases:
        with pytest.raises(UsageError, match=message):
            main(base + argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # and through the script: one line, exit code 2
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample_mipadapter.py"), *base, *cases[0][0]],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and cases[0][1] in out.stderr, out.stderr
    helped = sample_parser().format_help()
    for flag in ("--ref", "--ref_dir", "--ref_mask", "--ip_step_range", "--save_weight_maps", "--scale", "--is_plus",
                 "--reference_image1_path", "--num_samples", "--ip_ckpt", "--image_encoder_path"):
        assert flag in helped


def test_sample_weight_maps_masks_and_step_range(tmp_path):
    from mipadapter.sample import main

    ck = _checkpoint(tmp_path)
    refs = _refs(tmp_path / "refs", ["cat", "dog", "hat"])
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--base_model_path", "tiny-sdxl", "--ip_ckpt", str(ck), "--ref_dir", str(refs), "--height", "64",
              "--width", "64", "--num_inference_steps", "2", "--prompt", "a cat and a dog with a hat/cap",
              "--no-progress"]
    written = main([*common, "--output_dir", str(tmp_path / "a"), "--save_weight_maps", "--ref_mask",
                    f"cat={tmp_path / 'mask.png'}"])
    assert [p.name for p in written] == ["a cat and a dog with a hat_cap_gen_0.png"]
    for w in ("cat", "dog", "hat"):
        assert (tmp_path / "a" / f"a cat and a dog with a hat_cap_gen_0_weights_{w}.png").is_file()
    from mipadapter.sample import main as again
    with pytest.raises(Exception, match="exists"):
        again([*common, "--output_dir", str(tmp_path / "a")])
    # the image branch off for the whole schedule = the base model's image
    off = main([*common, "--output_dir", str(tmp_path / "off"), "--ip_step_range", "0", "0.01"])
    zero = main([*common, "--output_dir", str(tmp_path / "zero"), "--scale", "0"])
    assert np.array_equal(np.asarray(Image.open(off[0])), np.asarray(Image.open(zero[0])))
    on = main([*common, "--output_dir", str(tmp_path / "on")])
    assert not np.array_equal(np.asarray(Image.open(on[0])), np.asarray(Image.open(zero[0])))


def test_protocol_averages_per_combination_then_over_combinations(tmp_path):  # 25
    from mipadapter.eval_protocol import main

    bench = write_customconcept101(tmp_path / "cc101")
    pairs = json.loads((bench / "dataset_multiconcept.json").read_text())
    cat, chair, compose = pairs[0]
    (bench / "dataset_multiconcept.json").write_text(json.dumps([[cat, chair, compose], [chair, cat, compose]]))
    samples = tmp_path / "s"
    p0 = write_samples(samples / "comb_0", ["cat sitting on chair."], per_prompt=1, samples_dir=False)
    p1 = write_samples(samples / "comb_1", ["chair sitting on cat.", "cat next to chair."], per_prompt=2,
                       samples_dir=False, seed=3)
    res = main(["--benchmark_root", str(bench), "--sample_root", str(samples), "--tiny_backbones", "--device", "cpu",
                "--feature_cache", str(tmp_path / "cache"), "--no-progress"])
    clip = tiny.tiny_clip()
    per = []
    for paths, texts in ((p0, ["cat sitting on chair."]), (p1, ["chair sitting on cat."] * 2 + ["cat next to chair."] * 2)):
        cos = paired_cosine(clip.encode_images(paths), clip.encode_texts(texts))
        per.append(float((2.5 * cos.clamp(min=0)).mean()))
    assert res["per_task"]["pet_cat1+furniture_chair1"]["clip_t"] == pytest.approx(per[0], abs=1e-5)
    assert res["mean"]["clip_t"] == pytest.approx(sum(per) / 2, abs=1e-5)  # mean of per-combination means
    assert "| MIP-Adapter (sdxl), small 10k data (paper) | 0.7694 | 0.6967 | 0.4108 |" in (
        samples / "eval" / "summary.md").read_text()


@pytest.mark.slow
def test_end_to_end_train_sample_k3_eval(tmp_path, fresh_accelerate_state):
    from mipadapter.eval import main as eval_main
    from mipadapter.sample import main as sample_main
    from mipadapter.train import main as train_main

    trainer = train_main(train_argv(tmp_path, "sdxl", "--stop_step", "3", "--save_steps", "2"))
    out = tmp_path / "out"
    assert len(trainer.history) == 3 and (out / "checkpoint-2" / WEIGHTS).is_file()
    refs = _refs(tmp_path / "refs", ["cat", "dog", "hat"])
    written = sample_main(["--base_model_path", "tiny-sdxl", "--ip_ckpt", str(out), "--ref_dir", str(refs),
                           "--prompt", "a cat and a dog wearing a hat", "--height", "64", "--width", "64",
                           "--num_inference_steps", "2", "--output_dir", str(tmp_path / "samples"), "--no-progress"])
    assert len(written) == 1 and Image.open(written[0]).size == (64, 64)
    bench = write_customconcept101(tmp_path / "cc101")
    argv = ["--generate", "--benchmark_root", str(bench), "--sample_root", str(tmp_path / "gen"), "--ip_ckpt", str(out),
            "--base_model_path", "tiny-sdxl", "--height", "64", "--width", "64", "--num_inference_steps", "2",
            "--sample_batch_size", "1", "--tiny_backbones", "--device", "cpu", "--feature_cache",
            str(tmp_path / "cache"), "--no-progress"]
    res = eval_main(argv)
    files = sorted(p.name for p in (tmp_path / "gen" / "comb_0").glob("*.png"))
    assert files == ["cat sitting on chair_gen.png", "chair next to cat on the beach_gen.png"]
    table = json.loads((tmp_path / "gen" / "comb_0" / "prompts.json").read_text())
    assert table["cat sitting on chair_gen.png"] == "cat sitting on chair_gen."  # the original's stem + '.'
    assert res["n_images"] == 2
    stamp = (tmp_path / "gen" / "comb_0" / files[0]).stat().st_mtime_ns
    eval_main(argv)  # resumable: finished images are kept, not regenerated
    assert (tmp_path / "gen" / "comb_0" / files[0]).stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_resume_is_exact(tmp_path, fresh_accelerate_state):
    from accelerate.state import AcceleratorState, GradientState

    from mipadapter.train import main as train_main

    straight = tmp_path / "a"
    train_main(train_argv(tmp_path, "sdxl", "--stop_step", "2", "--save_steps", "1", "--output_dir", str(straight)))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = tmp_path / "b"
    train_main(train_argv(tmp_path, "sdxl", "--stop_step", "1", "--save_steps", "1", "--output_dir", str(resumed)))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train_main(train_argv(tmp_path, "sdxl", "--stop_step", "2", "--save_steps", "1", "--output_dir", str(resumed),
                          "--resume_from_checkpoint", "latest"))
    a, b = read_ip_adapter(straight / WEIGHTS), read_ip_adapter(resumed / WEIGHTS)
    assert all(torch.equal(a["ip_adapter"][k], b["ip_adapter"][k]) for k in a["ip_adapter"])
