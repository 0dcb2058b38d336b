"""The main.py interface on tiny presets: one smoke run per app, help, and one-line usage errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from st_helpers import usage_error
from synctweedies.depth import write_dpt
from synctweedies.main import main

PANO = ["--app", "panorama", "--model", "tiny-sd", "--steps", "2", "--canonical_latent_h", "32",
        "--canonical_latent_w", "64", "--canonical_rgb_h", "64", "--canonical_rgb_w", "128",
        "--instance_latent_size", "8", "--instance_rgb_size", "64", "--theta_interval", "90",
        "--num_random_crops", "2", "--no_progress"]


def test_ambiguous_image_smoke(tmp_path):
    out = main(["--app", "ambiguous_image", "--model", "tiny-if", "--tag", "a", "--save_top_dir", str(tmp_path),
                "--num_inference_steps", "2", "--views_names", "identity", "rotate_cw", "--no_progress",
                "--log_step", "0"])
    names = {p.name for p in out["dir"].iterdir()}
    assert {"view_0.png", "view_1.png", "final.png", "sheet.png", "morph.gif", "stage1_view_0.png"} <= names
    assert out["views"].shape == (2, 3, 64, 64)


def test_wide_image_smoke_with_mvd_end_below_one(tmp_path):
    out = main(["--app", "wide_image", "--model", "tiny-sd", "--prompt", "a mountain range", "--tag", "w",
                "--save_top_dir", str(tmp_path), "--num_inference_steps", "2", "--latent_instance_size", "8",
                "--rgb_instance_size", "64", "--window_stride", "4", "--panorama_height", "64",
                "--panorama_width", "136", "--mvd_end", "0.5", "--initialize_xt_from_zt", "--no_progress"])
    assert out["image"].shape == (1, 3, 64, 136) and (out["dir"] / "final_1.png").exists()


def test_panorama_smoke_with_depth(tmp_path):
    write_dpt(tmp_path / "d.dpt", 1 + np.random.default_rng(0).random((32, 64), dtype=np.float32))
    out = main(PANO + ["--tag", "p", "--save_top_dir", str(tmp_path), "--depth_data_path", str(tmp_path / "d.dpt"),
                       "--initialize_xt_from_zt"])
    names = {p.name for p in out["dir"].iterdir()}
    assert {"final.png", "strip.png", "crop_0.png", "crop_1.png", "view_3.png", "depth_view_0.png"} <= names
    assert out["pano"].shape == (1, 3, 64, 128)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    amb = ["--app", "ambiguous_image", "--model", "tiny-if", "--tag", "x", "--save_top_dir", str(tmp_path)]
    assert "unknown view name" in usage_error(amb + ["--views_names", "identity", "twirl"], capsys)
    assert "prompts for 2 views" in usage_error(amb + ["--prompts", "a horse"], capsys)
    np.save(tmp_path / "sq.npy", np.ones((32, 32), np.float32))
    pano = PANO + ["--tag", "y", "--save_top_dir", str(tmp_path)]
    assert "twice as wide" in usage_error(pano + ["--depth_data_path", str(tmp_path / "sq.npy")], capsys)
    assert "FOV" in usage_error(pano + ["--FOV", "180"], capsys)
    assert "mesh file not found" in usage_error(["--app", "mesh", "--mesh", str(tmp_path / "m.obj"), "--prompt",
                                                  "a", "--tag", "t", "--save_top_dir", str(tmp_path)], capsys)
    assert "--app is required" in usage_error(["--tag", "t"], capsys)
    assert "case_num" in usage_error(amb + ["--case_num", "9"], capsys)


def test_help_lists_every_app_and_flag():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(root / "scripts" / "sample_synctweedies.py"), "--help"],
                         capture_output=True, text=True, check=True, env=env, cwd=root)
    for flag in ("--views_names", "--optimize_inverse_mapping", "--panorama_width", "--window_stride",
                 "--canonical_latent_w", "--average_rgb", "--FOV", "--mesh_autouv", "--no-antialiased",
                 "--save_dir_now", "--initialize_xt_from_zt", "--mvd_end", "--rasterize_mode", "--save_gif",
                 "--shuffle_bg_change", "--canonical_domain", "--color_assign_method", "--final_iterations"):
        assert flag in res.stdout, flag
