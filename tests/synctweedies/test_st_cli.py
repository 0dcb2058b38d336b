"""The main.py interface on tiny presets: one smoke run per app, help, and one-line usage errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import json

import numpy as np
import PIL.Image
import pytest
import torch

from common.errors import UsageError
from st_helpers import usage_error
from synctweedies.depth import write_dpt
from synctweedies.main import main

PANO = ["--app", "panorama", "--model", "tiny-sd", "--steps", "2", "--canonical_latent_h", "32",
        "--canonical_latent_w", "64", "--canonical_rgb_h", "64", "--canonical_rgb_w", "128",
        "--instance_latent_size", "8", "--instance_rgb_size", "64", "--theta_interval", "90",
        "--num_random_crops", "2", "--no_progress"]


def test_ambiguous_image_smoke(tmp_path, monkeypatch):
    """Outputs exist; the final views are exact transforms of one image (rotate_cw of view 0 is view 1, up to
    the 8-bit PNG); stage II conditions each view on its own upscaled stage-I view (the original)."""
    import torch.nn.functional as F

    import synctweedies.apps.ambiguous_image as amb

    calls = []
    real = amb.run_stage

    def spy(pipe, projection, prompts, args, generator, **kw):
        out = real(pipe, projection, prompts, args, generator, **kw)
        calls.append((projection, kw, out[0]))
        return out

    monkeypatch.setattr(amb, "run_stage", spy)
    out = main(["--app", "ambiguous_image", "--model", "tiny-if", "--tag", "a", "--save_top_dir", str(tmp_path),
                "--num_inference_steps", "2", "--views_names", "identity", "rotate_cw", "--no_progress",
                "--log_step", "0"])
    names = {p.name for p in out["dir"].iterdir()}
    assert {"view_0.png", "view_1.png", "final.png", "sheet.png", "morph.gif", "stage1_view_0.png"} <= names
    views = out["views"]
    assert views.shape == (2, 3, 64, 64)
    assert torch.equal(views[1], torch.rot90(views[0], -1, (1, 2)))
    saved = [torch.from_numpy(np.asarray(PIL.Image.open(out["dir"] / f"view_{i}.png")).copy()) for i in (0, 1)]
    assert torch.equal(saved[1], torch.rot90(saved[0], -1, (0, 1)))
    (p1, _, res1), (_, kw2, _) = calls
    stage1 = p1.forward(res1.canonical)  # unclamped stage-I views, as the original passes them on
    cond = kw2["condition"]
    assert torch.allclose(cond, F.interpolate(stage1, cond.shape[-2:], mode="bilinear", align_corners=True))
    assert torch.allclose(cond[1], torch.rot90(cond[0], -1, (1, 2)), atol=1e-5)


def _check_window_average(image, views, lefts, window):
    """Each canvas column covered by one window is that window's pixels; overlaps lie between the windows."""
    w = image.shape[-1]
    for col in range(w):
        cover = [i for i, left in enumerate(lefts) if left <= col < left + window]
        vals = torch.stack([views[i, :, :, col - lefts[i]] for i in cover])
        if len(cover) == 1:
            assert torch.allclose(image[0, :, :, col], vals[0], atol=1e-6), col
        else:
            assert (image[0, :, :, col] >= vals.min(0).values - 1e-5).all()
            assert (image[0, :, :, col] <= vals.max(0).values + 1e-5).all()


def test_wide_image_smoke_with_mvd_end_below_one(tmp_path, capsys):
    out = main(["--app", "wide_image", "--model", "tiny-sd", "--prompt", "a mountain range", "--tag", "w",
                "--save_top_dir", str(tmp_path), "--num_inference_steps", "2", "--latent_instance_size", "8",
                "--rgb_instance_size", "64", "--window_stride", "4", "--panorama_height", "64",
                "--panorama_width", "136", "--mvd_end", "0.5", "--initialize_xt_from_zt", "--no_progress"])
    assert out["image"].shape == (1, 3, 64, 136) and (out["dir"] / "final_1.png").exists()
    lefts = [l * 8 for l in out["projection"].lefts]
    assert lefts == [0, 32, 64, 72]  # 17 latent columns: stride 4 plus one window flush with the right edge
    _check_window_average(out["image"], out["views"], lefts, 64)
    assert "4 window(s) of 8x8 latent px, stride 4" in capsys.readouterr().out


def test_wide_image_default_window_is_the_native_latent_size(tmp_path, capsys):
    """No --latent_instance_size: tiny-sd's native 8x8 latent windows (not one canvas-wide window)."""
    out = main(["--app", "wide_image", "--model", "tiny-sd", "--prompt", "hills", "--tag", "d",
                "--save_top_dir", str(tmp_path), "--num_inference_steps", "1", "--window_stride", "4",
                "--panorama_height", "64", "--panorama_width", "128", "--no_progress"])
    assert out["num_views"] == 3 and out["latent_views"].shape == (3, 4, 8, 8)
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("wide_image:")]
    assert line == ["wide_image: 3 window(s) of 8x8 latent px, stride 4, on a 8x16 latent canvas; windows overlap"]
    args = json.loads((out["dir"] / "args.json").read_text())
    assert args["latent_instance_size"] == 8 and args["rgb_instance_size"] == 64


def test_window_summary_says_when_nothing_is_synchronised():
    from synctweedies.apps.wide_image import window_summary
    from synctweedies.wide import WindowProjection

    assert window_summary(WindowProjection(8, 32, 8, 8), 8).endswith("windows do not overlap: nothing is synchronised")
    clamped = window_summary(WindowProjection(8, 32, 64, 8), 64)
    assert clamped.startswith("wide_image: 1 window(s) of 8x32") and "clamped from 64" in clamped


def test_panorama_smoke_with_depth(tmp_path):
    """Outputs exist; the pano is g of the decoded views: 0 where no view reaches (the poles at FOV 72 with
    views 90 degrees apart), and every covered pixel holds a value some view put there (inside the views' range)."""
    from synctweedies.panorama import PanoramaProjection, view_angles

    write_dpt(tmp_path / "d.dpt", 1 + np.random.default_rng(0).random((32, 64), dtype=np.float32))
    out = main(PANO + ["--tag", "p", "--save_top_dir", str(tmp_path), "--depth_data_path", str(tmp_path / "d.dpt"),
                       "--initialize_xt_from_zt"])
    names = {p.name for p in out["dir"].iterdir()}
    assert {"final.png", "strip.png", "crop_0.png", "crop_1.png", "view_3.png", "depth_view_0.png"} <= names
    pano, views = out["pano"], out["views"]
    assert pano.shape == (1, 3, 64, 128) and views.shape == (4, 3, 64, 64)
    cov = PanoramaProjection(64, 128, 64, view_angles((0, 360), 90, (0, 1), 45), 72).coverage()
    assert (cov == 0).any() and (pano[..., cov == 0] == 0).all()
    for ch in range(3):
        inside = pano[0, ch][cov > 0]
        assert inside.min() >= views[:, ch].min() - 1e-5 and inside.max() <= views[:, ch].max() + 1e-5


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


def _amb(tmp_path, tag="keep"):
    return ["--app", "ambiguous_image", "--model", "tiny-if", "--tag", tag, "--save_top_dir", str(tmp_path)]


def _earlier_result(tmp_path, tag="keep"):
    folder = tmp_path / tag
    folder.mkdir()
    (folder / "final.png").write_bytes(b"earlier result")
    return folder


def _untouched(tmp_path, folder):
    assert (folder / "final.png").read_bytes() == b"earlier result"
    assert sorted(p.name for p in folder.iterdir()) == ["final.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_step_counts_below_one_are_one_line_errors(tmp_path, capsys):
    """--num_inference_steps / --steps 0 or negative: one line, exit 2, an earlier result untouched."""
    folder = _earlier_result(tmp_path)
    wide = ["--app", "wide_image", "--model", "tiny-sd", "--prompt", "p", "--tag", "keep", "--save_top_dir",
            str(tmp_path)]
    pano = PANO + ["--tag", "keep", "--save_top_dir", str(tmp_path)]
    mesh = ["--app", "mesh", "--model", "tiny-sd", "--prompt", "p", "--mesh", str(tmp_path / "m.obj"), "--tag",
            "keep", "--save_top_dir", str(tmp_path)]
    gs = ["--app", "gs", "--model", "tiny-sd", "--prompt", "p", "--tag", "keep", "--save_top_dir", str(tmp_path)]
    for base, flag in ((_amb(tmp_path), "--num_inference_steps"), (wide, "--num_inference_steps"),
                       (pano, "--steps"), (mesh, "--steps"), (gs, "--steps")):
        for value in ("0", "-3"):
            err = usage_error(base + [flag, value], capsys)
            assert flag in err and "positive" in err, err
    assert "case_num" in usage_error(_amb(tmp_path) + ["--case_num", "two"], capsys)
    assert "window_stride" in usage_error(wide + ["--window_stride", "0"], capsys)
    assert "num_of_zs" in usage_error(_amb(tmp_path) + ["--num_of_zs", "0"], capsys)
    _untouched(tmp_path, folder)


def test_existing_result_is_refused_and_rgb_size_must_match(tmp_path, capsys):
    folder = _earlier_result(tmp_path)
    assert "already exists" in usage_error(_amb(tmp_path) + ["--num_inference_steps", "1", "--skip_stage_2"], capsys)
    wide = ["--app", "wide_image", "--model", "tiny-sd", "--prompt", "p", "--tag", "other", "--save_top_dir",
            str(tmp_path), "--latent_instance_size", "8", "--rgb_instance_size", "60"]
    assert "must be --latent_instance_size (8) x 8" in usage_error(wide, capsys)
    _untouched(tmp_path, folder)


def test_failed_run_leaves_no_folder_that_refuses_the_rerun(tmp_path, capsys):
    """A run that fails (here: a stage-I model that is not IF) creates no tag folder; an empty folder left by a
    crash is reused, one with results is refused."""
    from synctweedies.outputs import make_save_dir

    assert "DeepFloyd IF" in usage_error(["--app", "ambiguous_image", "--model", "tiny-sd", "--tag", "t",
                                          "--save_top_dir", str(tmp_path)], capsys)
    assert not (tmp_path / "t").exists()
    (tmp_path / "empty").mkdir()
    assert make_save_dir(str(tmp_path), "empty", False) == tmp_path / "empty"
    (tmp_path / "empty" / "x.png").write_bytes(b"1")
    with pytest.raises(UsageError, match="already exists"):
        make_save_dir(str(tmp_path), "empty", False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="a file is in the way"):
        make_save_dir(str(tmp_path / "file"), "t", False)


def test_apps_come_from_the_registry_and_case_num_is_an_int(tmp_path, monkeypatch):
    import synctweedies.registry as registry
    from synctweedies.config import APPS, ambiguous_parser

    for app in APPS:
        runner = registry.get_app(app)
        assert runner.__module__ == f"synctweedies.apps.{app}" and runner.__name__ == "run"
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_app("mesh")(lambda args: None)
    seen = []
    monkeypatch.setitem(registry._APPS, "wide_image", seen.append)
    main(["--app", "wide_image", "--prompt", "p", "--case_num", "3"])
    assert seen[-1].case_num == 3 and isinstance(seen[-1].case_num, int)
    assert ambiguous_parser().parse_args(["--app", "ambiguous_image", "--tag", "t"]).case_num == 2
    cfg = tmp_path / "c.yaml"
    cfg.write_text("app: wide_image\nprompt: p\ncase_num: '5'\n")
    main(["--config", str(cfg)])
    assert seen[-1].case_num == 5


def test_num_inference_steps_is_an_alias_of_the_original_steps_flag():
    """The shared dialect's name works beside the original `--steps` of the panorama / mesh / gs apps."""
    from synctweedies.config import gs_parser, mesh_parser, panorama_parser

    for app, parser in (("panorama", panorama_parser()), ("mesh", mesh_parser()), ("gs", gs_parser())):
        required = {"panorama": [], "mesh": ["--tag", "t", "--mesh", "m.obj", "--prompt", "p"],
                    "gs": ["--save_top_dir", "d", "--tag", "t", "--prompt", "p"]}
        base = ["--app", app, *required[app]]
        original, _ = parser.parse_known_args(base + ["--steps", "7"])
        alias, _ = parser.parse_known_args(base + ["--num_inference_steps", "7"])
        assert original.steps == alias.steps == 7
