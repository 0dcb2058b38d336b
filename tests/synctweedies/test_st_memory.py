"""Memory estimates of the wide-image and panorama apps: exact counts of what a run holds, and one-line refusals."""
from __future__ import annotations

import pytest
import torch

from st_helpers import usage_error
from synctweedies.memory import num_window_starts, panorama_bytes, wide_image_bytes
from synctweedies.wide import window_starts


def test_window_count_matches_the_projection_layout():
    for length in range(1, 40):
        for window in range(1, length + 1):
            for stride in (1, 2, 3, 8):
                assert num_window_starts(length, window, stride) == len(window_starts(length, window, stride))


def test_estimates_by_hand():
    """64 x 136 px, factor 8: an 8 x 17 latent canvas, windows of 8 every 4 -> 1 x 4 windows (lefts 0, 4, 8, 9).
    Per window: 64 x 64 RGB px x (3 float32 + 1 int64) + 8 x 8 latent int64; counts 8 x 17 + 64 x 136 float32;
    the canvas 3 x 64 x 136 float32."""
    need, n = wide_image_bytes(64, 136, 8, 4, 8)
    assert n == 4
    assert need == 4 * (64 * 64 * 20 + 64 * 8) + 8 * 17 * 4 + 64 * 136 * 4 + 3 * 64 * 136 * 4 == 469_536
    # pano: per latent px a float32 count + two 4-channel buffers (fp16: 2 B), per RGB px 4 + 12 + 12 B
    assert panorama_bytes((2, 3), (4, 5), 4, torch.float16, False) == 6 * (4 + 16) + 20 * 28
    assert panorama_bytes((2, 3), (4, 5), 4, torch.float32, True) == 6 * 4 + 20 * 28
    # the originals' defaults are far from any limit (SD2 wide image; 2048 x 4096 latent pano in fp32)
    assert wide_image_bytes(512, 3072, 64, 8, 8)[0] < 2 ** 30
    assert panorama_bytes((2048, 4096), (1024, 2048), 4, torch.float32, False) < 2 ** 30


def test_wide_estimate_counts_exactly_what_a_run_holds(tmp_path):
    from synctweedies.main import main

    out = main(["--app", "wide_image", "--model", "tiny-sd", "--prompt", "p", "--tag", "m", "--save_top_dir",
                str(tmp_path), "--num_inference_steps", "1", "--window_stride", "4", "--panorama_height", "64",
                "--panorama_width", "136", "--no_progress"])
    proj = out["projection"]
    rgb = proj.scaled(8)
    held = sum(t.nbytes for t in (out["views"], out["image"], proj.index, proj.count, rgb.index, rgb.count))
    assert out["views"].dtype == out["image"].dtype == torch.float32
    assert wide_image_bytes(64, 136, 8, 4, 8) == (held, out["num_views"])


@pytest.mark.parametrize("app", ["wide_image", "panorama"])
def test_huge_canvas_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, app):
    if app == "wide_image":  # the 65536 x 65536, stride 1 on tiny-sd's 8-latent windows: > 4 TiB
        assert wide_image_bytes(65536, 65536, 8, 1, 8)[0] > 2 ** 42
        argv = ["--app", "wide_image", "--model", "tiny-sd", "--prompt", "p", "--panorama_height", "65536",
                "--panorama_width", "65536", "--window_stride", "1"]
        hint = "--panorama_width"
    else:
        assert panorama_bytes((10 ** 6, 2 * 10 ** 6), (1024, 2048), 4, torch.float32, False) > 2 ** 45
        argv = ["--app", "panorama", "--model", "tiny-sd", "--canonical_latent_h", "1000000",
                "--canonical_latent_w", "2000000"]
        hint = "--canonical_latent_h/w"
    err = usage_error(argv + ["--tag", "big", "--save_top_dir", str(tmp_path)], capsys)
    assert "needs at least" in err and "GiB" in err and hint in err, err
    assert list(tmp_path.iterdir()) == []
