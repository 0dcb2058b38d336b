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

Measured (toy-sd step 3600; `python benchmarks/toyworld_synctweedies.py`, one thread), seeds 0..15 / 100..115:
- seam ratio: tiles 6.67 / 7.33 | SyncTweedies 2.33 / 2.05 (per image 1.26-4.36; tiles 2.04-17.07); the app
  with --case_num 0 (same windows and attention, nothing synchronised) 3.97. Floors: SyncTweedies <= 3.0 and
  tiles / SyncTweedies >= 2.0 (measured 2.9 / 3.6); an app whose synchronisation did nothing (case 0: 3.97,
  ratio 1.7) fails both.
- The app's image keeps visible steps at every window edge (every 16 px): it decodes each 16x16 latent window
  on its own and averages the decoded windows in RGB (as the original does), and the decoder's border effects
  do not agree. The latent canvas g(X_0) decoded in one piece is nearly seamless (ratio 1.22, seeds 0..15; case 0's
  averaged canvas 1.34, so this locates the residual seams in the readout, it does not test the synchronisation).
  "The app's image has no seams" (ratio <= 1.5) is a strict xfail; the canvas one passes (<= 1.6).
- object colour read by toy-clip: tiles (toy-sd's single-image rate, 64 samples) 0.422 / 0.562 | the 7 windows
  of each SyncTweedies image (112) 0.411 / 0.402; chance 0.125, empty prompt about 0.11. Floors: windows >= 0.30
  and >= tiles - 0.20 (the larger drop measured: 0.16). Background colour is not asserted: toy-sd draws the
  prompt's background at about chance (tiles 0.22, windows 0.27-0.29).
- With the app as shipped (prefix on, tiles given the same prefixed prompt): seams 5.43 / 5.66 vs 2.29 / 2.11,
  object colour tiles 0.203 / 0.281 vs windows 0.214 / 0.232.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

NUM_PROMPTS, SEED = 16, 0
SEAM_CEILING = 3.0
SEAM_GAIN_FLOOR = 2.0
CANVAS_SEAM_CEILING = 1.6
NO_SEAM = 1.5
COLOUR_FLOOR = 0.30
COLOUR_MARGIN = 0.20


def _bench():
    """benchmarks/toyworld_synctweedies.py (not a package): the measurement the figures above come from."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "toyworld_synctweedies.py"
    if "toyworld_synctweedies" not in sys.modules:  # registered first: its dataclass looks its module up
        spec = importlib.util.spec_from_file_location("toyworld_synctweedies", path)
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["toyworld_synctweedies"]


@pytest.fixture(scope="module")
def measured(toy_sd, toy_clip, tmp_path_factory):
    """{"tiles": Figures, "case2": Figures} for the 16 prompts (seeds 0..15), captions without the app's prefix."""
    import torch

    bench = _bench()
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
                   "window edges stay visible, seam ratio 2.33 (seeds 0..15) vs 1.22 for g(X_0) decoded whole")
def test_app_image_has_no_seams(measured):
    assert measured["case2"].seam <= NO_SEAM, measured["case2"].seam


@pytest.mark.slow
def test_every_window_keeps_the_prompts_object_colour(measured):
    tiles, st = measured["tiles"], measured["case2"]
    assert st.windows == 7 * NUM_PROMPTS and tiles.windows == 4 * NUM_PROMPTS
    assert st.object >= COLOUR_FLOOR, st.object
    assert st.object >= tiles.object - COLOUR_MARGIN, (st.object, tiles.object)
