"""MuDI training end to end on tiny models (spec §5 tests 12 and 15) and its one-line usage errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from common.cli import run
from common.models.tiny import build_tiny
from common.train.lora import lora_disabled
from mudi.train import main


def _args(data, out, model, *extra):
    return ["--model", model, "--instance_data_dir", str(data), "--output_dir", str(out), "--resolution", "64",
            "--train_batch_size", "1", "--lr_warmup_steps", "0", "--report_to", "none", "--seed", "0", *extra]


def _unet_inputs():
    gen = torch.Generator().manual_seed(5)
    return dict(sample=torch.randn(1, 4, 8, 8, generator=gen), timestep=torch.tensor([300]),
                encoder_hidden_states=torch.randn(1, 77, 64, generator=gen),
                added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=gen),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})


def test_sdxl_training_dco_segmix(dataset_dir, tmp_path, fresh_accelerate_state):
    """(12, 15) 4 steps of Seg-Mix + DCO on tiny-sdxl: the first loss is log 2, the base UNet and eps_ref stay
    exactly the base model's, eps_theta moves; save-N folders hold LoRAs that diffusers loads back exactly."""
    out = tmp_path / "run"
    trainer = main(_args(dataset_dir, out, "tiny-sdxl", "--max_train_steps", "4", "--save_steps", "2",
                         "--segmix_prob", "0.5", "--learning_rate", "1e-3", "--checkpointing_steps", "0"))
    losses = [loss for _, loss in trainer.history]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert (out / "save-2" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "save-4" / "pytorch_lora_weights.safetensors").is_file()
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["kind"] == "lora" and manifest["base_family"] == "sdxl" and manifest["tokens"] == ["olis", "hta"]

    trained = trainer.accelerator.unwrap_model(trainer.method.unet).float().cpu().eval()
    base = build_tiny("tiny-sdxl").unet.eval()
    base_params = dict(base.named_parameters())
    for name, p in trained.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_params[name.replace("base_layer.", "")]), name
    x = _unet_inputs()
    with torch.no_grad():
        eps_base = base(**x).sample
        eps_theta = trained(**x).sample
        with lora_disabled(trained):
            eps_ref = trained(**x).sample
    torch.testing.assert_close(eps_ref, eps_base, rtol=0, atol=1e-6)
    assert (eps_theta - eps_base).abs().max() > 1e-4

    pipe = build_tiny("tiny-sdxl")
    pipe.load_lora_weights(str(out / "save-4"))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(**x).sample, eps_theta, rtol=1e-4, atol=1e-5)


def test_flux_training_masked(dataset_dir, tmp_path, fresh_accelerate_state):
    """(15) FLUX: 2 steps of Seg-Mix with the hard mask; the LoRA reloads into FluxPipeline exactly."""
    out = tmp_path / "flux"
    trainer = main(_args(dataset_dir, out, "tiny-flux", "--max_train_steps", "2", "--save_steps", "2",
                         "--segmix_prob", "1", "--soft_alpha", "0", "--guidance_scale", "1",
                         "--learning_rate", "1e-3", "--checkpointing_steps", "0",
                         "--validation_prompt", "a olis red toy", "--num_validation_images", "1",
                         "--validation_steps", "2"))
    assert all(math.isfinite(v) for _, v in trainer.history)
    assert len(list((out / "validation").glob("step-000002_*.png"))) == 1
    assert json.loads((out / "adapter.json").read_text())["base_family"] == "flux"
    trained = trainer.accelerator.unwrap_model(trainer.method.transformer).float().cpu().eval()
    pipe = build_tiny("tiny-flux")
    pipe.load_lora_weights(str(out / "step_2"))  # FLUX: the original's step_N
    gen = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, 16, 16, generator=gen), timestep=torch.tensor([0.5]),
             guidance=torch.tensor([1.0]), pooled_projections=torch.randn(1, 32, generator=gen),
             encoder_hidden_states=torch.randn(1, 7, 32, generator=gen), txt_ids=torch.zeros(7, 3),
             img_ids=torch.zeros(16, 3))
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**x).sample, trained(**x).sample, rtol=1e-4, atol=1e-5)
        with lora_disabled(trained):
            ref = trained(**x).sample
        assert (trained(**x).sample - ref).abs().max() > 1e-5

    from mudi import sample

    paths = sample.main(["--model", "tiny-flux", "--lora", str(out), "--instance_data_dir", str(dataset_dir),
                         "--prompt", "a olis red toy and a hta blue toy", "--num_images", "1",
                         "--num_inference_steps", "2", "--output_dir", str(tmp_path / "samples"), "--device", "cpu"])
    assert [p.name for p in paths] == ["a_olis_red_toy_and_a_hta_blue_toy_0.png"]
    assert not list((tmp_path / "samples").glob("*_init.png"))  # FLUX: plain sampling, no mean-shifted init


@pytest.mark.parametrize("edit, message", [
    ("relative_scale", "--relative_scale must be in [-1, 1], got 1.5"),
    ("missing_file", "image not found"),
    ("bad_id", "is not in the id map"),
    ("mask_size", "masks must have the size of their image"),
])
def test_bad_input_is_one_line(make_data, tmp_path, capsys, edit, message):
    from PIL import Image

    data = make_data()
    extra = []
    meta = data / "metadata.jsonl"
    if edit == "relative_scale":
        extra = ["--relative_scale", "1.5"]
    elif edit == "missing_file":
        meta.write_text(meta.read_text() + json.dumps({"id": "a", "file_name": "nope.png", "mask_path": "m.png",
                                                       "text": "x"}) + "\n")
    elif edit == "bad_id":
        meta.write_text(meta.read_text() + json.dumps({"id": "q", "file_name": "a00.png",
                                                       "mask_path": "mask_a00.png", "text": "x"}) + "\n")
    else:
        Image.new("L", (32, 32)).save(data / "mask_b01.png")
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        run(main, _args(data, out, "tiny-sdxl", "--max_train_steps", "1", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_exact_resume_with_segmix_start(dataset_dir, tmp_path, fresh_accelerate_state):
    """4 steps in one run == 2 steps, then resume for 2 more (Seg-Mix switching on at step 2, DCO, 2 workers)."""
    from accelerate.state import AcceleratorState, GradientState

    common = ["--max_train_steps", "4", "--segmix_prob", "1", "--segmix_start_step", "2", "--dco_beta", "10",
              "--checkpointing_steps", "2", "--dataloader_num_workers", "2", "--learning_rate", "1e-3",
              "--save_steps", "100"]
    full = main(_args(dataset_dir, tmp_path / "full", "tiny-flux", *common)).history
    for reset in (AcceleratorState, GradientState):
        reset._reset_state(*(() if reset is GradientState else (True,)))
    first = main(_args(dataset_dir, tmp_path / "split", "tiny-flux", *common[:1], "2", *common[2:])).history
    for reset in (AcceleratorState, GradientState):
        reset._reset_state(*(() if reset is GradientState else (True,)))
    second = main(_args(dataset_dir, tmp_path / "split", "tiny-flux", *common,
                        "--resume_from_checkpoint", "latest")).history
    assert [s for s, _ in first + second] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(full, first + second):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


def test_text_encoder_lora(dataset_dir, tmp_path, fresh_accelerate_state):
    """--train_text_encoder: both CLIP encoders get a LoRA that trains, saves and reloads; the DCO reference
    turns it off too (prompt features equal the base encoders')."""
    from common.pipelines.prompts import encode_tokens, tokenize

    out = tmp_path / "te"
    trainer = main(_args(dataset_dir, out, "tiny-sdxl", "--max_train_steps", "2", "--train_text_encoder",
                         "--text_encoder_lr", "1e-2", "--learning_rate", "1e-2", "--checkpointing_steps", "0",
                         "--segmix_prob", "1", "--mixed_precision", "no"))
    method = trainer.method
    prompts = ["a photo of a olis red toy"]
    base = build_tiny("tiny-sdxl")
    with torch.no_grad():
        trained_embeds, _ = method._encode_sdxl(prompts)
        with method._all_lora_off():
            ref_embeds, _ = method._encode_sdxl(prompts)
        base_embeds, _ = encode_tokens([base.text_encoder, base.text_encoder_2], tokenize(base, prompts), "sdxl")
        torch.testing.assert_close(ref_embeds, base_embeds, rtol=0, atol=1e-6)
        assert (trained_embeds - base_embeds).abs().max() > 1e-4
        base.load_lora_weights(str(out))
        reloaded, _ = encode_tokens([base.text_encoder, base.text_encoder_2], tokenize(base, prompts), "sdxl")
        torch.testing.assert_close(reloaded, trained_embeds, rtol=1e-4, atol=1e-5)
