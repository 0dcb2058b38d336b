"""SynCD training runs: configs parse (ours and the accelerate DeepSpeed ZeRO-2 / FSDP files, on CPU), exact
resume through the Trainer, the SDXL reference K/V bank (masked references have no influence), Prodigy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.cli import parse_args

ROOT = Path(__file__).resolve().parents[2]


def _data(root: Path, n_tuples: int = 2, size: int = 64) -> Path:
    (root / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    meta = []
    for i in range(n_tuples):
        names = [f"{i}_0_{k}.jpg" for k in range(3)]
        for nm in names:
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / nm)
            m = np.zeros((size, size), np.uint8)
            m[16:48, 16:48] = 255
            Image.fromarray(m).save(root / "masks" / nm)
        meta.append({"filenames": names, "prompts": [f"a cat {k}" for k in range(3)], "category": "deformable"})
    (root / "metadata.json").write_text(json.dumps(meta))
    return root


def test_configs_parse_on_cpu():
    from accelerate.commands.config.config_args import load_config_from_file

    from syncd.train import build_parser, resolve_args

    zero2 = load_config_from_file(str(ROOT / "configs/accelerate/deepspeed_zero2.yaml"))
    assert zero2.distributed_type == "DEEPSPEED" and zero2.deepspeed_config["zero_stage"] == 2
    fsdp = load_config_from_file(str(ROOT / "configs/accelerate/fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and "FluxTransformerBlock" in fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    flux = resolve_args(parse_args(build_parser(), ["--config", str(ROOT / "configs/syncd/train_flux.yaml"),
                                                    "--train_data_dir", "x"]))
    assert (flux.family, flux.rank, flux.lora_alpha, flux.optimizer, flux.learning_rate) == ("flux", 32, 32, "prodigy", 1.0)
    assert (flux.gradient_accumulation_steps, flux.max_train_steps, flux.seed, flux.resolution) == (2, 25100, 23, 512)
    sdxl = resolve_args(parse_args(build_parser(), ["--config", str(ROOT / "configs/syncd/train_sdxl.yaml"),
                                                    "--train_data_dir", "x"]))
    assert (sdxl.family, sdxl.numref, sdxl.masked, sdxl.resolution) == ("sdxl", 2, True, 1024)


def _train(argv):
    from accelerate.state import AcceleratorState, GradientState

    from syncd.train import main

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return main(argv)


@pytest.mark.slow
def test_exact_resume_flux(tmp_path, fresh_accelerate_state):
    from common.io import load_weights

    data = _data(tmp_path / "data")
    base = ["--model", "tiny-flux", "--train_data_dir", str(data), "--resolution", "64", "--rank", "4",
            "--gradient_accumulation_steps", "1", "--report_to", "none", "--checkpointing_steps", "1",
            "--drop_text", "0.3"]
    full = _train([*base, "--output_dir", str(tmp_path / "a"), "--max_train_steps", "3"])
    part = _train([*base, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "3"])
    import shutil
    shutil.rmtree(tmp_path / "b" / "checkpoint-3")
    (tmp_path / "b" / "pytorch_model.safetensors").unlink()
    resumed = _train([*base, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "3",
                      "--resume_from_checkpoint", "latest"])
    assert resumed.history == full.history[2:]
    a, b = (load_weights(tmp_path / d / "pytorch_model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("transformer.base_model.model.") for k in a)


@pytest.mark.slow
def test_sdxl_training_runs_and_masked_references_do_not_leak(tmp_path, fresh_accelerate_state):
    from syncd.data import SynCDDataset, collate
    from syncd.train import SynCDMethod, build_parser, resolve_args

    data = _data(tmp_path / "data", n_tuples=1)
    args = resolve_args(parse_args(build_parser(), ["--model", "tiny-sdxl", "--train_data_dir", str(data),
                                                    "--resolution", "64", "--masked", "--output_dir", str(tmp_path / "o")]))
    ds = SynCDDataset(args.train_data_dir, 64, drop_both=0, drop_image=0, drop_text=0, mask_ones_prob=0)
    method = SynCDMethod(args, ds)
    from accelerate import Accelerator
    method.setup(Accelerator(cpu=True))
    with torch.no_grad():
        for n, p in method.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a non-trivial LoRA: reference passes must run without it
    batch = collate([ds[0]])

    def loss(images, masks):
        torch.manual_seed(0)
        return method._sdxl_loss({**batch, "images": images, "masks": masks})[0]

    base = loss(batch["images"], batch["masks"])
    other = batch["images"].clone()
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[16:48, 16:48] = False
    other[:, 1:, :, outside] = -other[:, 1:, :, outside]  # change reference pixels outside the masks only
    none = torch.zeros_like(batch["masks"])
    assert torch.equal(loss(batch["images"], none), loss(other, none))  # nothing visible: refs do not matter
    assert not torch.equal(loss(batch["images"], batch["masks"].fill_(True)), loss(other, batch["masks"]))
    assert torch.isfinite(base)


def test_prodigy_optimizer_is_built():
    from syncd.train import SynCDMethod, build_parser, resolve_args

    args = resolve_args(parse_args(build_parser(), ["--model", "tiny-flux", "--train_data_dir", "x"]))
    opt = SynCDMethod.make_optimizer(None, [torch.nn.Parameter(torch.zeros(2))], args)
    assert type(opt).__name__ == "Prodigy" and opt.param_groups[0]["lr"] == 1.0
    assert opt.param_groups[0]["weight_decay"] == 1e-4 and opt.param_groups[0]["decouple"]
