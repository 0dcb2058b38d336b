"""Image encoders and released-layout IP-Adapters: our loading, encoding and sampling equal diffusers' own."""
from __future__ import annotations

import re

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

from common.errors import UsageError
from common.models.adapters import apply_adapter, write_manifest
from common.models.image_encoders import load_image_encoder, save_image_encoder
from common.models.ip_adapter import (
    load_ip_adapter,
    loaded_ip_adapters,
    random_ip_adapter_state,
    read_ip_adapter,
    save_ip_adapter,
)
from common.models.tiny import build_tiny
from common.pipelines.text2image import generate

PROMPT, NEG = "a photo of a dog", "blurry"
# variant -> (tiny encoder standing in for the released one, its feature size the projection takes)
VARIANTS = {"plain": ("tiny-clip-vision-g", 24), "plus": ("tiny-clip-vision-h", 32)}


def picture(seed: int = 0, size=(40, 52)) -> PIL.Image.Image:
    rng = np.random.RandomState(seed)
    return PIL.Image.fromarray((rng.rand(*size, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """The tiny encoders saved with save_pretrained, so every test loads them through from_pretrained."""
    root = tmp_path_factory.mktemp("encoders")
    return {name: str(save_image_encoder(load_image_encoder(name), root / name)) for name, _ in VARIANTS.values()}


def sdxl():
    pipe = build_tiny("tiny-sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def checkpoint(tmp_path, variant: str, suffix: str = ".bin", seed: int = 0):
    unet = build_tiny("tiny-sdxl").unet
    return save_ip_adapter(random_ip_adapter_state(unet, variant, VARIANTS[variant][1], seed=seed),
                           tmp_path / f"ip-{variant}-{seed}{suffix}")


# ------------------------------------------------------------------------------------------------- encoders


def test_tiny_encoders_round_trip_and_give_both_features(encoders):
    image = picture()
    for name, _ in VARIANTS.values():
        built, loaded = load_image_encoder(name), load_image_encoder(encoders[name])
        assert torch.equal(built.encode(image), loaded.encode(image))
        cfg = loaded.model.config
        patches = (cfg.image_size // cfg.patch_size) ** 2
        assert loaded.encode([image, image]).shape == (2, cfg.projection_dim)
        assert loaded.encode(image, "penultimate").shape == (1, 1 + patches, cfg.hidden_size)
        # unconditional features: zeros (pooled) and the encoder's output on a black-after-normalisation input
        assert torch.equal(loaded.encode_negative(image), torch.zeros(1, cfg.projection_dim))
        zeros = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
        assert torch.equal(loaded.encode_negative(image, "penultimate"), loaded.encode(zeros, "penultimate"))


def test_image_encoder_presets_name_their_hub_folders():
    from common.models.presets import PRESETS

    assert (PRESETS["clip-vit-h-14"].hub_id, PRESETS["clip-vit-h-14"].subfolder) == ("h94/IP-Adapter",
                                                                                      "models/image_encoder")
    assert PRESETS["clip-vit-bigg-14"].subfolder == "sdxl_models/image_encoder"
    with pytest.raises(UsageError, match="not an image encoder"):
        load_image_encoder("tiny-sd")


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_released_layout_round_trips(tmp_path, suffix):
    unet = build_tiny("tiny-sdxl").unet
    state = random_ip_adapter_state(unet, "plus", 32)
    path = save_ip_adapter(state, tmp_path / f"ip{suffix}")
    if suffix == ".safetensors":  # flattened with the prefixes diffusers' loader strips
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            assert all(k.startswith(("image_proj.", "ip_adapter.")) for k in f.keys())
    again = read_ip_adapter(path)
    for part in ("image_proj", "ip_adapter"):
        assert again[part].keys() == state[part].keys()
        assert all(torch.equal(again[part][k], state[part][k]) for k in state[part])
    ids = sorted({int(re.match(r"^(\d+)\.to_[kv]_ip\.weight$", k).group(1)) for k in again["ip_adapter"]})
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert ids == list(range(1, 2 * len(cross), 2))  # odd numbering: 1, 3, 5, ...


def test_pickles_with_objects_are_refused_and_wrong_shapes_named(tmp_path):
    import collections

    torch.save({"image_proj": collections.OrderedDict(x=torch.zeros(1)), "ip_adapter": {"o": object()}},
               tmp_path / "evil.bin")
    with pytest.raises(UsageError, match="pickled Python objects"):
        read_ip_adapter(tmp_path / "evil.bin")
    sd_state = random_ip_adapter_state(build_tiny("tiny-sd").unet, "plain", 24)
    with pytest.raises(UsageError, match=r"ip_adapter\) does not match the expected layout"):
        load_ip_adapter(sdxl(), sd_state)


# ------------------------------------------------------------------------------------- equality with diffusers


def _diffusers_pipe(folder, names, encoder_folder):
    """diffusers' own path: load_ip_adapter + its encoder (encode_image) for ip_adapter_image_embeds."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    ref = sdxl()
    ref.load_ip_adapter(str(folder), subfolder="", weight_name=names, image_encoder_folder=None)
    encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_folder)
    ref.register_modules(image_encoder=encoder, feature_extractor=CLIPImageProcessor(
        size=encoder.config.image_size, crop_size=encoder.config.image_size))
    return ref


@pytest.mark.parametrize("variant,suffix", [("plain", ".bin"), ("plus", ".safetensors")])
def test_ip_adapter_sampling_equals_diffusers(tmp_path, encoders, variant, suffix):
    path = checkpoint(tmp_path, variant, suffix)
    encoder = encoders[VARIANTS[variant][0]]
    image, kw = picture(), dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32)

    ref = _diffusers_pipe(tmp_path, path.name, encoder)
    ref_embeds = ref.prepare_ip_adapter_image_embeds(image, None, "cpu", 1, True)
    expected = ref(PROMPT, negative_prompt=NEG, ip_adapter_image_embeds=ref_embeds, output_type="np",
                   generator=torch.Generator().manual_seed(7), **kw).images

    pipe = sdxl()
    handle = apply_adapter(pipe, path, image_encoder=encoder)
    embeds = [handle.image_embeds(image)]
    assert torch.equal(embeds[0], ref_embeds[0])  # our encoder path = diffusers' encode_image
    ours = generate(pipe, PROMPT, NEG, ip_adapter_image_embeds=embeds, output_type="np", progress=False,
                    generator=torch.Generator().manual_seed(7), **kw)
    assert np.abs(ours - expected).max() <= 1e-5


def _unet_out(unet, embeds):
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 2)}
    if embeds is not None:
        added["image_embeds"] = embeds
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=text, added_cond_kwargs=added).sample


def test_two_ip_adapters_stack_like_diffusers_and_remove_exactly(tmp_path, encoders):
    plain, plus = checkpoint(tmp_path, "plain"), checkpoint(tmp_path, "plus", seed=1)
    image = picture()
    pipe = sdxl()
    before = dict(pipe.unet.attn_processors)
    base = _unet_out(pipe.unet, None)
    a = load_ip_adapter(pipe, plain, image_encoder=encoders["tiny-clip-vision-g"], scale=0.7)
    b = load_ip_adapter(pipe, plus, image_encoder=encoders["tiny-clip-vision-h"], scale=0.4)
    assert loaded_ip_adapters(pipe.unet) == 2 and (a.index, b.index) == (0, 1)
    procs = dict(pipe.unet.attn_processors)
    assert all(isinstance(p, IPAdapterAttnProcessor2_0) == n.endswith("attn2.processor") for n, p in procs.items())
    assert all(procs[n] is before[n] for n in procs if n.endswith("attn1.processor"))  # self-attention untouched
    both = [a.image_embeds(image), b.image_embeds(image)]
    assert (_unet_out(pipe.unet, both) - base).abs().max() > 1e-3  # the image branches matter
    a.set_scale(0.0)
    b.set_scale(0.0)
    assert torch.equal(_unet_out(pipe.unet, both), base)  # scale 0: the text-only model, exactly
    a.set_scale(0.7)
    b.set_scale(0.4)

    ref = _diffusers_pipe(tmp_path, [plain.name, plus.name], encoders["tiny-clip-vision-h"])
    ref.set_ip_adapter_scale([0.7, 0.4])
    assert (_unet_out(pipe.unet, both) - _unet_out(ref.unet, both)).abs().max() <= 1e-5

    a.remove()  # the other one stays, now alone in image_embeds
    assert b.index == 0 and b.scale == 0.4
    ref_b = _diffusers_pipe(tmp_path, plus.name, encoders["tiny-clip-vision-h"])
    ref_b.set_ip_adapter_scale(0.4)
    assert (_unet_out(pipe.unet, both[1:]) - _unet_out(ref_b.unet, both[1:])).abs().max() <= 1e-5
    b.remove()
    assert dict(pipe.unet.attn_processors) == before and pipe.unet.encoder_hid_proj is None
    assert pipe.unet.config.encoder_hid_dim_type is None
    assert torch.equal(_unet_out(pipe.unet, None), base)
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())


def test_same_layout_adapters_stack_and_a_diffusers_loaded_one_is_refused(tmp_path, encoders):
    pipe = sdxl()
    first = load_ip_adapter(pipe, checkpoint(tmp_path, "plain", seed=1), image_encoder=encoders["tiny-clip-vision-g"])
    second = load_ip_adapter(pipe, checkpoint(tmp_path, "plain", seed=2), image_encoder=encoders["tiny-clip-vision-g"])
    assert (first.index, second.index) == (0, 1)
    first.remove()
    assert second.index == 0 and loaded_ip_adapters(pipe.unet) == 1
    second.remove()
    ref = _diffusers_pipe(tmp_path, checkpoint(tmp_path, "plain").name, encoders["tiny-clip-vision-g"])
    with pytest.raises(UsageError, match="already projects its encoder states"):
        load_ip_adapter(ref, checkpoint(tmp_path, "plain", seed=3))


def test_manifest_carries_encoder_and_scale(tmp_path, encoders):
    folder = tmp_path / "adapter"
    path = checkpoint(tmp_path, "plain")
    folder.mkdir()
    path.rename(folder / "ip-adapter_sdxl.bin")
    save_image_encoder(load_image_encoder(encoders["tiny-clip-vision-g"]), folder / "image_encoder")
    write_manifest(folder, kind="ip_adapter", base_family="sdxl", weights="ip-adapter_sdxl.bin",
                   options={"image_encoder": "image_encoder", "scale": 0.75})  # relative to the adapter folder
    pipe = sdxl()
    handle = apply_adapter(pipe, folder)
    assert handle.kind == "ip_adapter" and handle.variant == "plain" and handle.scale == 0.75
    assert all(p.scale == [0.75] for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip"))
    assert torch.equal(handle.encode(picture())[0][0],
                       load_image_encoder(encoders["tiny-clip-vision-g"]).encode(picture()))
    wrong = load_ip_adapter(sdxl(), folder / "ip-adapter_sdxl.bin", image_encoder=encoders["tiny-clip-vision-h"])
    with pytest.raises(UsageError, match="pooled image features of size 24 but the image encoder gives 16"):
        wrong.encode(picture())
