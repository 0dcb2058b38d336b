"""The manifest / adapter-kind seam and the training script's flags and one-line errors."""
from __future__ import annotations

import pytest
import torch

from common.errors import UsageError
from common.models.adapters import apply_adapter, detect_adapter
from common.models.ip_adapter import save_ip_adapter
from common.models.tiny import build_tiny
from mipadapter.adapter import WEIGHTS, register, write_mip_manifest
from mipadapter.model import random_mip_state
from mipadapter.processor import MIPAdapterAttnProcessor


def test_manifest_makes_it_an_adapter_that_applies_scales_and_removes(tmp_path):
    register()  # what the setup.py entry point does when the package is installed
    pipe = build_tiny("tiny-sdxl")
    save_ip_adapter(random_mip_state(pipe.unet, "sdxl"), tmp_path / WEIGHTS)
    write_mip_manifest(tmp_path, variant="sdxl", image_encoder="tiny-clip-vision-g", scale=0.75)
    assert detect_adapter(tmp_path).name == "mip_adapter"
    before = dict(pipe.unet.attn_processors)
    handle = apply_adapter(pipe, tmp_path)
    procs = [p for p in pipe.unet.attn_processors.values() if isinstance(p, MIPAdapterAttnProcessor)]
    assert procs and all(p.scale == [0.75] for p in procs)  # the manifest's scale
    handle.set_scale(0.3)
    assert all(p.scale == [0.3] for p in procs)
    handle.remove()
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_train_flags_and_errors(tmp_path):
    from mipadapter.train import build_parser, main

    text = build_parser().format_help()
    for flag in ("--variant", "--pretrained_ip_adapter_path", "--data_pkl_file", "--data_root", "--eval_data_root",
                 "--image_encoder_path", "--resolution", "--weight_decay", "--noise_offset", "--save_steps",
                 "--stop_step", "--infer_scale", "--num_objects", "--num_train_imgs", "--local_rank",
                 "--mixed_precision", "--report_to", "--resume_from_checkpoint", "--i_drop_rate"):
        assert flag in text, flag
    with pytest.raises(UsageError, match="has no images/ folder"):
        main(["--pretrained_model_name_or_path", "tiny-sdxl", "--data_root", str(tmp_path)])
    with pytest.raises(UsageError, match="--variant"):
        main(["--pretrained_model_name_or_path", "tiny-sdxl", "--data_root", str(tmp_path), "--variant", "sd15"])
    with pytest.raises(UsageError, match="not found"):
        main(["--pretrained_model_name_or_path", "tiny-sdxl", "--data_root", str(tmp_path),
              "--data_pkl_file", str(tmp_path / "missing.pkl")])


def test_plain_ip_adapter_file_is_refused_for_sampling(tmp_path):
    from mipadapter.model import MIPAdapter

    unet = build_tiny("tiny-sdxl").unet
    save_ip_adapter(random_mip_state(unet, "sdxl", gates=False), tmp_path / "ip.bin")
    with pytest.raises(UsageError, match="plain IP-Adapter, not a trained MIP-Adapter"):
        MIPAdapter.load(unet, tmp_path / "ip.bin")
    torch.save({"image_proj": {"x": torch.zeros(1)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(1)}},
               tmp_path / "odd.bin")
    with pytest.raises(UsageError, match="unsupported image projection"):
        MIPAdapter.load(unet, tmp_path / "odd.bin")


def test_installed_entry_point_registers_the_kind():
    """`pip install -e .` registers the kind through setup.py, so `--adapters` finds it without an import."""
    from importlib.metadata import entry_points

    from common.models.adapters import adapter_kinds

    names = {ep.name: ep.value for ep in entry_points(group="customization_suite.adapters")}
    assert names.get("mipadapter") == "mipadapter.adapter:register"
    assert "mip_adapter" in adapter_kinds()
