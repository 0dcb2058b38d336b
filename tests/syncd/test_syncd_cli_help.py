"""Every SynCD script answers --help listing the original flag names (parsers built in-process; one script
is also run as a subprocess to check the wrapper)."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLAGS = {
    "syncd.sample": ["--prompt", "--ref_images", "--finetuned_path", "--numref", "--true_cfg_scale",
                     "--image_guidance_scale", "--num_images_per_prompt", "--inference_steps", "--outdir",
                     "--ref_category", "--adaptive_image_guidance_scale", "--ip_adapter_scale", "--seed"],
    "syncd.train": ["--model", "--train_data_dir", "--numref", "--rank", "--optimizer", "--uniform_schedule",
                    "--resume_from_checkpoint", "--validation_prompt", "--filter_dino", "--filter_aesthetics"],
    "syncd.generate": ["--mode", "--prompts", "--llm", "--mesh_dir", "--depth_model", "--outdir", "--num",
                       "--warp_thresh", "--save_attn_mask", "--score", "--repeat_each_id"],
    "syncd.eval": ["--sample_root", "--benchmark_root", "--tiny_backbones", "--metrics", "--token"],
}


@pytest.mark.parametrize("module", sorted(FLAGS))
def test_help_lists_flags(module):
    text = importlib.import_module(module).build_parser().format_help()
    missing = [f for f in FLAGS[module] if f not in text]
    assert not missing, missing


def test_script_wrapper_help():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample_syncd.py"), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--ref_images" in res.stdout, res.stderr[-500:]
