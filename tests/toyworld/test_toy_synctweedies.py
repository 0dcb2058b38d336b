"""SyncTweedies wide images on toy-sd are seamless where side-by-side tiles are not (issue 13, point 6).

Our SyncTweedies ambiguous-image app is DeepFloyd-IF only (as the original), so the toy-world effect is shown
with the wide-image app (`synctweedies.apps.wide_image.run`, flags from its parser; toy-sd loaded once and
handed to it): 32x128 px (latent 16x64), toy-sd's native 16x16 latent window, stride 8 (7 windows), case 2,
`--mvd_end 1 --initialize_xt_from_zt` (configs/synctweedies/wide_image.yaml), 20 DDIM steps, guidance 4, on 16
prompts ("a red circle on a green background", ...: object colours cycling all 8; app --seed i for prompt i).
The base: 4 independent toy-sd samples of the same prompt put side by side (noise seed i). The app's fixed
"Best quality, extremely detailed " prompt prefix (the original's) is patched away: toy-sd never saw those
words, and with them its single-image colour accuracy falls from 0.42 to 0.20 on these prompts.

Seam ratio (benchmarks/toyworld_synctweedies.py): mean |column j+1 - column j| across the tile boundaries
x = 32, 64, 96 over the same mean at every other column (1 = no seam there).

Measured (toy-sd step 3600; `python benchmarks/toyworld_synctweedies.py --no_shipped_prefix`, one thread), seeds
0..15, after the read-out was pinned to the original (decode f(g(X_0)), each window clamped, then RGB-averaged):
- seam ratio: tiles 6.67 | SyncTweedies 2.25 | the app with --case_num 0 (nothing synchronised; the final
  read-out still averages the windows' latents, so part of the seam goes already) 2.69. Floors: SyncTweedies
  <= 2.45 (case 0 fails it) and tiles / SyncTweedies >= 2.0 (measured 2.96). Before the read-out fix (decoding
  X_0's windows): 2.33 vs case 0 3.97.
- The app's image keeps visible steps at every window edge (every 16 px): each 16x16 latent window is decoded on
  its own and the decoded windows averaged in RGB (as the original does), and the decoder's border effects do
  not agree. The latent canvas decoded in one piece is nearly seamless (1.18; case 0's 1.34): "the app's image
  has no seams" (ratio <= 1.5) is a strict xfail; the canvas one passes (<= 1.6).
- object colour read by toy-clip: tiles (toy-sd's single-image rate, 64 samples) 0.422 | the 7 windows of each
  SyncTweedies image (112) 0.491; chance 0.125, empty prompt about 0.11. Floors: windows >= 0.30 and
  >= tiles - 0.20. Background colour is not asserted: toy-sd draws the prompt's background at about chance.
- With the app as shipped (prefix on, tiles given the same prefixed prompt; before the read-out fix): seams
  5.43 vs 2.29, object colour tiles 0.203 vs windows 0.214.
"""
from __future__ import annotations

import pytest

from toy_benchmarks import load_benchmark

NUM_PROMPTS, SEED = 16, 0
SEAM_CEILING = 2.45  # case 0 (no synchronisation) measures 2.69
SEAM_GAIN_FLOOR = 2.0
CANVAS_SEAM_CEILING = 1.6
NO_SEAM = 1.5
COLOUR_FLOOR = 0.30
COLOUR_MARGIN = 0.20




@pytest.fixture(scope="module")
def measured(toy_sd, toy_clip, tmp_path_factory):
    """{"tiles": Figures, "case2": Figures} for the 16 prompts (seeds 0..15), captions without the app's prefix."""
    import torch

    bench = load_benchmark("synctweedies")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bench.measure(toy_sd, toy_clip, bench.wide_scenes(NUM_PROMPTS), seed=SEED, prefix=False,
                             out_dir=tmp_path_factory.mktemp("toy_wide"))
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # 16 wide images + 64 tiles: about 50 s of one thread on a quiet CPU
def test_wide_image_has_far_smaller_seams_than_side_by_side_tiles(measured):
    tiles, st = measured["tiles"], measured["case2"]
    assert st.seam <= SEAM_CEILING, (st.seam, st.seams)
    assert tiles.seam / st.seam >= SEAM_GAIN_FLOOR, (tiles.seam, st.seam)


@pytest.mark.slow
def test_synchronised_latent_canvas_decodes_without_seams(measured):
    assert measured["case2"].canvas_seam <= CANVAS_SEAM_CEILING, measured["case2"].canvas_seam


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the app decodes each window and averages them in RGB (as the original): "
                   "window edges stay visible, seam ratio 2.25 (seeds 0..15) vs 1.18 for the canvas decoded whole")
def test_app_image_has_no_seams(measured):
    assert measured["case2"].seam <= NO_SEAM, measured["case2"].seam


@pytest.mark.slow
def test_every_window_keeps_the_prompts_object_colour(measured):
    tiles, st = measured["tiles"], measured["case2"]
    assert st.windows == 7 * NUM_PROMPTS and tiles.windows == 4 * NUM_PROMPTS
    assert st.object >= COLOUR_FLOOR, st.object
    assert st.object >= tiles.object - COLOUR_MARGIN, (st.object, tiles.object)
