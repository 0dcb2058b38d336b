"""Tokenizer ids, presets, tiny models and the loading path."""
from __future__ import annotations

import pytest
import torch

from common.errors import UsageError
from common.models.loading import load_controlnet, load_pipeline, pipeline_family, resolve_spec
from common.models.presets import PRESETS
from common.models.tiny import build_tiny
from common.models.tokenizer import clip_tokenizer


def test_offline_tokenizer_matches_real_clip_ids():
    tok = clip_tokenizer()
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert tok("Hello, World!").input_ids == [49406, 3306, 267, 1002, 256, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    padded = tok("a dog", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[3:] == [49407] * 74


def test_sdxl_second_tokenizer_pads_with_exclamation_mark():
    tok = clip_tokenizer(pad_token="!")
    ids = tok("a dog", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [49406, 320, 1929, 49407] and ids[4:] == [0] * 73


def test_added_token_survives_save_and_load(tmp_path):
    tok = clip_tokenizer()
    tok.add_tokens(["<new1>"])
    tok.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again("a <new1> dog").input_ids == [49406, 320, 49408, 1929, 49407]


def test_presets_cover_the_seed_models():
    for name in ["sd14", "sd15", "sd2-base", "sdxl", "flux-dev", "if-I-M", "if-I-XL", "if-II-M", "if-II-L",
                 "controlnet-depth-sd15", "controlnet-depth-sd2", "controlnet-depth-sdxl"]:
        assert PRESETS[name].hub_id and "/" in PRESETS[name].hub_id
    assert resolve_spec("sd14") == "CompVis/stable-diffusion-v1-4"


def test_tiny_presets_are_deterministic_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny("tiny-sd")
    after = torch.rand(1)
    b = build_tiny("tiny-sd")
    assert torch.equal(expected, after)
    for (ka, va), (kb, vb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not a.text_encoder.training  # eval mode, like from_pretrained


def test_tiny_if_has_learned_variance_pixel_unet():
    pipe = build_tiny("tiny-if")
    assert pipe.unet.config.in_channels == 3 and pipe.unet.config.out_channels == 6
    assert pipe.scheduler.config.variance_type == "learned_range"


@pytest.mark.parametrize("name,family", [("tiny-sd", "sd"), ("tiny-sdxl", "sdxl"), ("tiny-flux", "flux"),
                                         ("tiny-if", "if"), ("tiny-if-sr", "if-sr")])
def test_saved_tiny_loads_back_identically(tiny_folders, name, family):
    pipe = load_pipeline(tiny_folders[name])
    assert pipe_family_ok(pipe, family)
    ref = build_tiny(name)
    model = getattr(pipe, "unet", None) or pipe.transformer
    ref_model = getattr(ref, "unet", None) or ref.transformer
    for (k, v), (_, w) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert torch.equal(v, w), k


def pipe_family_ok(pipe, family):
    return pipeline_family(pipe) == family


def test_controlnet_preset_and_folder(tiny_folders):
    net = load_controlnet("tiny-controlnet")
    again = load_controlnet(tiny_folders["tiny-controlnet"])
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("spec,needle", [
    ("sd14", "hf download CompVis/stable-diffusion-v1-4"),
    ("someone/not-cached", "hf download someone/not-cached"),
    ("no-such-preset", "unknown model 'no-such-preset'"),
    ("./missing/folder", "does not exist"),
])
def test_unavailable_models_give_one_clear_line(spec, needle):
    with pytest.raises(UsageError) as err:
        load_pipeline(spec)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_tiny_pipeline_converts_to_controlnet_pipeline():
    from diffusers import StableDiffusionControlNetPipeline

    pipe = load_pipeline("tiny-sd", StableDiffusionControlNetPipeline, controlnet=load_controlnet("tiny-controlnet"))
    assert isinstance(pipe, StableDiffusionControlNetPipeline) and pipeline_family(pipe) == "sd"
