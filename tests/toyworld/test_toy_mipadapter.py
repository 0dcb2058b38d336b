"""MIP-Adapter on toy-sdxl: does each reference's colour go to its own entity? (issue 13 point 6)

MIP-Adapter needs an IP-Adapter for its base model; the toy IP-Adapter (assets/toyworld/toy-ip-adapter,
`common.toyworld.ip_adapter`: toy-clip's vision tower as the image encoder, the linear projection with 4 tokens
+ to_k_ip / to_v_ip trained on single-object scenes whose captions drop the colour word) stands in for
ip-adapter_sdxl.bin. The comparison (benchmarks/toyworld_mipadapter.py): "a circle and a square on a white
background", reference 1 = a red circle (entity "circle"), reference 2 = a green square ("square"), and the
swapped pair; MIP-Adapter's merge (zero gate: no MIP training at this scale) vs the plain multi-image
IP-Adapter (the two references' tokens in one softmax) vs no reference, on the same noise; toy-clip reads the
colour of each half (ceiling on rendered scenes: 1.000).

Measured (toy-sdxl UNet exported 19:21 UTC from step 2400, toy IP-Adapter retrained on it with the command in
assets/toyworld/toy-ip-adapter/README.md; `python benchmarks/toyworld_mipadapter.py --samples 16 --seeds 0 1`):
- the toy IP-Adapter carries a reference's colour to a single object: "a circle on a {white, blue} background"
  with a reference circle of 6 colours x 8 samples is read as the reference's colour in 0.500 of samples vs
  0.115 with no reference (same noise; 0.406 vs 0.094 on the first quick toy-sdxl) -> asserted below with
  floors 0.25 and +0.15;
- MIP-Adapter's routing does not separate the entities on toy-sdxl: w("circle") left half - right half = -0.007
  (mean |.| per sample 0.016), mean |w - 0.5| = 0.025 over every layer and step: the entity words encoded alone
  attend to the same places (also "left"/"right" 0.010, "red"/"green" 0.033, "triangle"/"cross" 0.009 on the
  quick toy-sdxl), as toy-sdxl's text towers (toy-clip's, reading shapes at chance on large objects) barely
  tell the words apart. MIP-Adapter then computes what the plain multi-image IP-Adapter computes: both halves
  right in 0/16 samples for MIP, concat and no reference, on each of 2 pairs x 2 noise seeds. Even with the
  regions given by hand (`MIPState.masks`, left/right halves) both halves are right in 2/64, since the toy
  IP-Adapter, trained on single objects, rarely colours the small objects of a two-object scene (the left half
  reads the circle's colour in 0.12/0.19/0.50/0.44 of samples vs 0.06/0.06/0.38/0.50 with no reference, per
  pair and seed; toy-sdxl alone draws the right object green in 0.62-0.69). Both claims are strict xfails
  with these figures: a better toy-sdxl (words that localise) or a MIP-trained adapter should turn them into
  passes.
"""
from __future__ import annotations

import pytest
import torch

from common.toyworld.ip_adapter import TOY_IP_ADAPTER_DIR, WEIGHTS
from toy_benchmarks import load_benchmark

SINGLE_SAMPLES = 8  # per colour and background (6 colours x white / blue: 96 samples with and without)
SINGLE_FLOOR = 0.25  # reference's colour read at least this often
SINGLE_MARGIN = 0.15  # and this much more often than without a reference
ROUTING_FLOOR = 0.10  # MIP's claim at this scale: w("circle") at least 0.1 higher on the left half
BOTH_MARGIN = 0.20  # MIP's claim: both halves right this much more often than the plain multi-image IP-Adapter
PAIR_SAMPLES = 16




@pytest.fixture(scope="module")
def models(_weights):
    bench = load_benchmark("mipadapter")

    if not (TOY_IP_ADAPTER_DIR / WEIGHTS).is_file() or not (bench.ASSETS_SDXL / "model_index.json").is_file():
        pytest.skip("toy-sdxl or the toy IP-Adapter is not in assets/toyworld yet")
    return bench.load_models()


def test_toy_encoder_is_toy_clips_vision_tower(toy_clip):
    """The image encoder is toy-clip itself: its pooled image features are the judge's image features
    (same weights, same preprocessing), so no weights of its own are committed."""
    from common.toyworld.ip_adapter import reference_scene, toy_image_encoder
    from common.toyworld.scenes import render

    encoder = toy_image_encoder()
    images = [render(reference_scene("circle", c)) for c in ("red", "white")]
    ours = encoder.encode(images, "pooled")
    assert ours.shape == (2, 64) and encoder.model.config.image_size == 32
    torch.testing.assert_close(ours, toy_clip.encode_images(images), rtol=1e-5, atol=1e-6)


def test_committed_adapter_fits_toy_sdxl_in_the_released_layout(models):
    """ip-adapter_sdxl.bin's layout (proj 4 x 64 tokens + LayerNorm; to_k_ip / to_v_ip at the odd slots of the 7
    cross-attention layers), a few hundred kB, and the whole toy world within 20 MB."""
    from common.models.ip_adapter import check_ip_adapter, num_tokens, read_ip_adapter, variant_of
    from common.toyworld.judge import ASSETS

    state = read_ip_adapter(TOY_IP_ADAPTER_DIR / WEIGHTS)
    check_ip_adapter(state, models["pipe"].unet, "toy IP-Adapter")
    assert variant_of(state) == "plain" and num_tokens(state) == 4
    assert sorted(int(k.split(".")[0]) for k in state["ip_adapter"] if k.endswith("to_k_ip.weight")) == \
        [1, 3, 5, 7, 9, 11, 13]
    assert (TOY_IP_ADAPTER_DIR / WEIGHTS).stat().st_size < 400_000
    assert sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file()) <= 20 * 2**20


def test_plain_baseline_is_diffusers_multi_image_ip_adapter(models):
    """The "concat" condition (MIP processor, K = 1, both references' tokens in one softmax, zero gate) is what
    diffusers' IPAdapterAttnProcessor2_0 computes for two images of one adapter (common.models.ip_adapter)."""
    bench = load_benchmark("mipadapter")

    from common.models.ip_adapter import load_ip_adapter
    from common.models.loading import load_pipeline
    from common.toyworld.ip_adapter import load_toy_ip_adapter_state
    from mipadapter.processor import STATE_KEY

    refs = bench.reference_images("red", "green")
    state = bench.states(models, refs, 1, 1.0)["concat"]
    pipe = models["pipe"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([500, 500])
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(bench.PROMPT, device="cpu", do_classifier_free_guidance=True,
                                                         negative_prompt="")
    context, text = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(2, 1)
    with torch.no_grad():
        ours = pipe.unet(x, t, context, added_cond_kwargs={"text_embeds": text, "time_ids": time_ids},
                         cross_attention_kwargs={STATE_KEY: state}).sample
        other = load_pipeline("toy-sdxl")
        ip = load_ip_adapter(other, load_toy_ip_adapter_state(), image_encoder=models["encoder"])
        image_embeds = ip.image_embeds(refs, batch_size=1)  # [2, 2 images, 64]: negative row first
        theirs = other.unet(x, t, context, added_cond_kwargs={"text_embeds": text, "time_ids": time_ids,
                                                              "image_embeds": [image_embeds]}).sample
    assert image_embeds.shape == (2, 2, 64)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_training_moves_only_the_adapter_and_leaves_toy_sdxl_as_it_was():
    """Two steps of the toy IP-Adapter's loop: projection and to_k_ip / to_v_ip change, the UNet does not, and
    its processors come back (the pipeline samples as before)."""
    from common.models.loading import load_pipeline
    from common.toyworld.ip_adapter import toy_image_encoder, train_ip_adapter, training_data
    from common.toyworld.judge import ASSETS, weights_available

    if not weights_available() or not (ASSETS / "toy-sdxl" / "model_index.json").is_file():
        pytest.skip("toy models not trained yet")
    pipe = load_pipeline("toy-sdxl")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    processors = dict(pipe.unet.attn_processors)
    data = training_data(pipe, toy_image_encoder(), 16)
    assert data.latents.shape == (16, 4, 16, 16) and data.image_embeds.shape == (16, 64)
    untrained, _ = train_ip_adapter(pipe, data, steps=0, batch_size=4)
    state, losses = train_ip_adapter(pipe, data, steps=2, batch_size=4)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert dict(pipe.unet.attn_processors) == processors
    for part in ("image_proj", "ip_adapter"):
        assert state[part].keys() == untrained[part].keys()
        assert all(not torch.equal(state[part][k], untrained[part][k]) for k in state[part] if "norm" not in k)
    # IP-Adapter's init: each to_k_ip / to_v_ip starts as its layer's to_k / to_v
    from common.models.ip_adapter import cross_attention_layers

    for n, _, attn in cross_attention_layers(pipe.unet):
        assert torch.equal(untrained["ip_adapter"][f"{n}.to_k_ip.weight"], attn.to_k.weight)


@pytest.mark.slow  # 192 samples: about 40 s on a quiet thread, 2 min on a busy one
def test_toy_ip_adapter_carries_the_reference_colour(models):
    ref, none = load_benchmark("mipadapter").single_object_rates(models, samples=SINGLE_SAMPLES)
    assert ref >= SINGLE_FLOOR and ref - none >= SINGLE_MARGIN, (ref, none)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="toy-sdxl's maps of 'circle' and 'square' do not localise: MIP's weights stay "
                   "at 0.5 on both halves (measured in the module docstring)")
def test_mip_routes_the_circle_reference_to_the_left(models):
    bench = load_benchmark("mipadapter")

    r = bench.routing_contrast(models)
    assert r["mean"] >= ROUTING_FLOOR, r


@pytest.mark.slow  # 192 samples
@pytest.mark.xfail(strict=True, reason="with flat routing MIP-Adapter equals the plain multi-image IP-Adapter: no "
                   "colour reaches its own entity more often (measured in the module docstring)")
def test_mip_puts_each_reference_colour_on_its_entity(models):
    bench = load_benchmark("mipadapter")

    results = bench.measure(models, samples=PAIR_SAMPLES, seeds=(0,), conditions=("mip", "concat"))
    for c1, c2 in bench.PAIRS:
        mip, concat = results[(c1, c2, 0, "mip")], results[(c1, c2, 0, "concat")]
        assert mip["both"] - concat["both"] >= BOTH_MARGIN, (c1, c2, mip, concat)
