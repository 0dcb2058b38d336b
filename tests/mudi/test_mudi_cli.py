"""MuDI entry points: --help lists every flag, the paper configs parse, bad input is one line."""
from __future__ import annotations

import pytest

from common.cli import parse_args, run
from mudi import eval as mudi_eval
from mudi import prior, sample, train


@pytest.mark.parametrize("config, family, segmix, beta, lr", [
    ("train_sdxl", "sdxl", 0.3, 1000.0, 1e-4),
    ("train_sdxl_paper_prior", "sdxl", 0.3, 0.0, 1e-4),
    ("train_flux", "flux", 0.3, 0.0, 3e-4),
])
def test_paper_configs(config, family, segmix, beta, lr):
    args = train.resolve_args(parse_args(train.build_parser(), [
        "--config", f"configs/mudi/{config}.yaml", "--instance_data_dir", "x", "--class_data_dir", "y"]))
    assert (args.family, args.segmix_prob, args.dco_beta, args.learning_rate) == (family, segmix, beta, lr)
    assert args.rank == 32 and args.max_train_steps == 2010


def test_family_defaults():
    """Flags whose defaults differ between the two original trainers."""
    sdxl = train.resolve_args(parse_args(train.build_parser(), ["--model", "tiny-sdxl", "--instance_data_dir", "x"]))
    flux = train.resolve_args(parse_args(train.build_parser(), ["--model", "tiny-flux", "--instance_data_dir", "x"]))
    assert (sdxl.segmix_prob, sdxl.dco_beta, sdxl.resolution, sdxl.output_dir) == (0.6, 1000.0, 1024,
                                                                                  "lora-dreambooth-model")
    assert (flux.segmix_prob, flux.dco_beta, flux.resolution, flux.output_dir) == (0.3, 0.0, 512, "flux-dreambooth-lora")


@pytest.mark.parametrize("module, flags", [
    (train, ["--segmix_prob", "--segmix_start_step", "--relative_scale", "--soft_alpha", "--dco_beta", "--rank",
             "--save_steps", "--weighting_scheme", "--guidance_scale", "--gradient_checkpointing",
             "--resume_from_checkpoint", "--validation_epochs", "--train_text_encoder", "--use_dora"]),
    (prior, ["--gen_class", "--out_dir", "--num_images", "--gen_mask", "--owl_query", "--mask_dir", "--class_id"]),
    (sample, ["--lora", "--gamma", "--instance_data_dir", "--adapters", "--num_inference_steps"]),
    (mudi_eval, ["--sample_dir", "--instance_data_dir", "--threshold", "--norm", "--similarity"]),
])
def test_help_lists_flags(module, flags, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and all(f in text for f in flags)


@pytest.mark.parametrize("module, argv, message", [
    (train, ["--model", "tiny-sdxl", "--instance_data_dir", "x", "--snr_gamma", "5"], "--snr_gamma is not supported"),
    (train, ["--model", "tiny-sdxl", "--instance_data_dir", "x", "--with_prior_preservation"], "needs --class_data_dir"),
    (sample, ["--model", "tiny-sdxl", "--prompt", "a dog", "--gamma", "-1"], "--gamma must be >= 0"),
    (sample, ["--model", "tiny-sdxl"], "no prompt"),
    (prior, ["--gen_class", "dog", "--gen_mask", "--num_images", "1"], "needs --sam_checkpoint"),
    (mudi_eval, ["--sample_dir", "nowhere"], "no images found in nowhere"),
])
def test_bad_flags_one_line(module, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        run(module.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0]


def test_sample_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "a_dog_0.png").write_bytes(b"x")
    with pytest.raises(SystemExit):
        run(sample.main, ["--model", "tiny-sdxl", "--prompt", "a dog", "--num_images", "1", "--output_dir",
                          str(tmp_path)])
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "a_dog_0.png").read_bytes() == b"x"
