"""Checkpoint layouts: exact round-trips in every direction, LDM key mapping, detection and clear errors."""
from __future__ import annotations

import pytest
import torch

from common.errors import UsageError
from customdiffusion import formats as F
from customdiffusion.apply import apply_customdiffusion
from customdiffusion.compress import compress
from customdiffusion.ldm_keys import attention_prefixes, from_ldm, to_ldm


def _same(a: F.CustomDiffusionWeights, b: F.CustomDiffusionWeights) -> bool:
    if list(a.unet) != list(b.unet) and set(a.unet) != set(b.unet):
        return False
    for k, v in a.unet.items():
        w = b.unet[k]
        if isinstance(v, dict):
            if not (torch.equal(v["u"], w["u"]) and torch.equal(v["v"], w["v"])):
                return False
        elif not torch.equal(v, w):
            return False
    return list(a.tokens) == list(b.tokens) and all(
        len(a.tokens[t]) == len(b.tokens[t]) and all(torch.equal(x, y) for x, y in zip(a.tokens[t], b.tokens[t]))
        for t in a.tokens)


CASES = [("delta", "delta.safetensors"), ("delta", "delta.bin"), ("ldm", "delta_epoch=000000.ckpt"),
         ("ldm", "delta.safetensors"), ("diffusers", "out"), ("diffusers", "out_bin")]


@pytest.mark.parametrize("fmt,name", CASES)
def test_roundtrip_sd(tiny, concept, tmp_path, fmt, name):
    pipe = tiny()
    w = concept(pipe, tokens=("<new1>", "<new2>"))
    F.save(w, tmp_path / name, fmt, pipe.unet.config, safe_serialization=not name.endswith("_bin"))
    assert _same(w, F.load(tmp_path / name, pipe.unet.config))


@pytest.mark.parametrize("fmt,name", [("delta", "delta.safetensors"), ("delta", "delta.bin"), ("diffusers", "out")])
def test_roundtrip_sdxl(tiny, concept, tmp_path, fmt, name):
    pipe = tiny("tiny-sdxl")
    w = concept(pipe)
    assert len(w.tokens["<new1>"]) == 2
    F.save(w, tmp_path / name, fmt, pipe.unet.config)
    assert _same(w, F.load(tmp_path / name, pipe.unet.config))
    if name == "delta.bin":  # the reference SDXL layout: a list of one vector per text encoder
        raw = torch.load(tmp_path / name, weights_only=True)
        assert isinstance(raw["modifier_token"]["<new1>"], list)
    with pytest.raises(UsageError, match="LDM layout"):
        F.save(w, tmp_path / "x.ckpt", "ldm", pipe.unet.config)


@pytest.mark.parametrize("name", ["c.safetensors", "compressed_delta.bin", "c.ckpt"])
def test_roundtrip_compressed(tiny, concept, tmp_path, name):
    pipe = tiny()
    w = compress(concept(pipe), dict(pipe.unet.named_parameters()))
    fmt = "ldm" if name.endswith(".ckpt") else "delta"
    F.save(w, tmp_path / name, fmt, pipe.unet.config)
    back = F.load(tmp_path / name, pipe.unet.config)
    assert back.compressed and _same(w, back)
    with pytest.raises(UsageError, match="compressed"):
        F.save(w, tmp_path / "folder", "diffusers")


def test_conversion_chain(tiny, concept, tmp_path):
    """diffusers -> delta -> ldm -> diffusers gives back the same tensors, and the files hold the documented keys."""
    pipe = tiny()
    cfg = pipe.unet.config
    w = concept(pipe)
    F.save(w, tmp_path / "a", "diffusers")
    F.save(F.load(tmp_path / "a"), tmp_path / "b.bin", "delta")
    F.save(F.load(tmp_path / "b.bin"), tmp_path / "c.ckpt", "ldm", cfg)
    F.save(F.load(tmp_path / "c.ckpt", cfg), tmp_path / "d", "diffusers")
    assert _same(w, F.load(tmp_path / "d"))
    raw = torch.load(tmp_path / "b.bin", weights_only=True)
    assert set(raw) == {"unet", "modifier_token"} and set(raw["unet"]) == set(w.unet)
    ldm = torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"]
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in ldm
    assert ldm["embed"].shape == (1, 32)
    procs = F.load_weights(tmp_path / "a" / "pytorch_custom_diffusion_weights.safetensors")
    assert all(".processor.to_" in k and "_custom_diffusion." in k for k in procs)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_ldm_mapping_invertible(tiny, name):
    unet = tiny(name).unet
    cfg = unet.config
    names = [n for n, _ in unet.named_parameters() if ".attn2." in n]
    ldm = [to_ldm(n, cfg) for n in names]
    assert len(set(ldm)) == len(names)
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    assert [from_ldm(k, cfg) for k in ldm] == names


def test_ldm_mapping_sd15_layout():
    """SD-1.x's real layout (from its config alone): attentions in input 1,2,4,5,7,8, middle, output 3..11."""
    cfg = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2,
           "mid_block_type": "UNetMidBlock2DCrossAttn"}
    table = attention_prefixes(cfg)
    ins = sorted(int(v.split(".")[3]) for v in table.values() if "input_blocks" in v)
    outs = sorted(int(v.split(".")[3]) for v in table.values() if "output_blocks" in v)
    assert ins == [1, 2, 4, 5, 7, 8] and outs == list(range(3, 12))
    assert to_ldm("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.weight", cfg) == \
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight"
    assert to_ldm("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", cfg) == \
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"


def test_apply_delta_sets_weights_and_tokens(tiny, concept, tmp_path):
    pipe = tiny()
    w = concept(pipe, tokens=("<new1>", "<new2>"))
    F.save(w, tmp_path / "delta.bin", "delta")
    n_tok = len(pipe.tokenizer)
    assert apply_customdiffusion(pipe, tmp_path / "delta.bin") == ["<new1>", "<new2>"]
    params = dict(pipe.unet.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in w.unet.items())
    assert len(pipe.tokenizer) == n_tok + 2
    emb = pipe.text_encoder.get_input_embeddings().weight
    for t in ("<new1>", "<new2>"):
        assert torch.equal(emb[pipe.tokenizer.convert_tokens_to_ids(t)], w.tokens[t][0])


def test_embedding_file_loads_with_diffusers(tiny, concept, tmp_path):
    pipe = tiny()
    w = concept(pipe)
    F.save(w, tmp_path, "diffusers", safe_serialization=False)
    raw = torch.load(tmp_path / "<new1>.bin", weights_only=True)
    assert list(raw) == ["<new1>"] and raw["<new1>"].shape == (32,)
    pipe.load_textual_inversion(str(tmp_path), weight_name="<new1>.bin")
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<new1>")]
    assert torch.equal(row, w.tokens["<new1>"][0])


def test_errors_are_one_clear_line(tiny, concept, tmp_path):
    pipe = tiny()
    w = concept(pipe)
    first = next(iter(w.unet))
    partial = F.CustomDiffusionWeights({k: v for k, v in w.unet.items() if k != first}, w.tokens)
    F.save(partial, tmp_path / "partial.safetensors")
    with pytest.raises(UsageError, match="missing key.*" + first.split(".")[0]):
        apply_customdiffusion(pipe, tmp_path / "partial.safetensors")
    F.save(concept(tiny("tiny-sdxl")), tmp_path / "xl.safetensors")
    with pytest.raises(UsageError, match="does not match"):
        apply_customdiffusion(tiny(), tmp_path / "xl.safetensors")
    from common.io import save_weights

    save_weights({"foo": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(UsageError, match="not a Custom Diffusion checkpoint"):
        F.load(tmp_path / "other.safetensors")
    with pytest.raises(UsageError, match="not found"):
        F.load(tmp_path / "nope.bin")
    F.save(w, tmp_path / "l.ckpt", "ldm", pipe.unet.config)
    with pytest.raises(UsageError, match="needs the base UNet"):
        F.load(tmp_path / "l.ckpt")
    # the same concept twice: its token is already in the tokenizer
    apply_customdiffusion(pipe, tmp_path / "l.ckpt")
    with pytest.raises(UsageError, match="already contains"):
        apply_customdiffusion(pipe, tmp_path / "l.ckpt")


def test_convert_cli(tiny, concept, tmp_path, capsys):
    from customdiffusion.convert import main

    pipe = tiny()
    w = concept(pipe)
    F.save(w, tmp_path / "delta_epoch=000000.ckpt", "ldm", pipe.unet.config)
    main(["--delta_ckpt", str(tmp_path / "delta_epoch=000000.ckpt"), "--ckpt", "tiny-sd",
          "--mode", "compvis-to-diffuser", "--output", str(tmp_path / "delta.safetensors")])
    assert _same(w, F.load(tmp_path / "delta.safetensors"))
    main(["--delta_ckpt", str(tmp_path / "delta.safetensors"), "--to", "diffusers", "--output", str(tmp_path / "up")])
    assert _same(w, F.load(tmp_path / "up"))
    with pytest.raises(UsageError, match="needs the base"):
        main(["--delta_ckpt", str(tmp_path / "delta.safetensors"), "--to", "delta", "--compress",
              "--output", str(tmp_path / "c.safetensors")])


def test_convert_refuses_to_overwrite_unless_asked(tiny, concept, tmp_path, cli, snapshot):
    from customdiffusion.convert import main

    pipe = tiny()
    old = concept(pipe, tokens=("<new1>", "<new2>"))
    F.save(old, tmp_path / "old", "diffusers")
    new = concept(pipe, seed=5)
    F.save(new, tmp_path / "new.safetensors")
    before = snapshot(tmp_path)
    argv = ["--delta_ckpt", str(tmp_path / "new.safetensors"), "--to", "diffusers", "--output", str(tmp_path / "old")]
    code, err = cli(main, argv)
    assert code == 2 and len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0], err
    code, err = cli(main, ["--delta_ckpt", str(tmp_path / "old"), "--to", "diffusers", "--output",
                           str(tmp_path / "old"), "--overwrite"])
    assert code == 2 and len(err) == 1 and "is the input" in err[0], err
    assert snapshot(tmp_path) == before
    main([*argv, "--overwrite"])
    # the old concept's <new2> file is gone: loading the folder gives exactly the new concept
    assert _same(new, F.load(tmp_path / "old"))


def test_nan_concept_is_refused_on_load(tiny, concept, tmp_path):
    w = concept(tiny())
    first = next(iter(w.unet))
    w.unet[first] = w.unet[first].clone()
    w.unet[first][0, 0] = float("inf")
    F.save(w, tmp_path / "delta.safetensors")
    with pytest.raises(UsageError, match=r"NaN/inf values in 1 tensor\(s\) \(e\.g\. " + first.replace(".", r"\.")):
        F.load(tmp_path / "delta.safetensors")


def test_ldm_names_match_the_original_convert_mapping():
    """SD-1.x's attention prefixes vs the original convert.py's hand-written rule (i // 3, j from i)."""
    from customdiffusion.ldm_keys import attention_prefixes

    sd14 = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2,
            "mid_block_type": "UNetMidBlock2DCrossAttn"}

    def original(key):  # src/convert.py, compvis -> diffusers
        d = key.replace("model.diffusion_model.", "")
        if "input_blocks" in key:
            i, j = [int(x) for x in key.split(".")[3:5]]
            d = d.replace(f"input_blocks.{i}.{j}", f"down_blocks.{max(0, i // 3)}.attentions.{0 if i in [1, 4, 7] else 1}")
        if "output_blocks" in key:
            i, j = [int(x) for x in key.split(".")[3:5]]
            d = d.replace(f"output_blocks.{i}.{j}", f"up_blocks.{max(0, i // 3)}.attentions.{i % 3}")
        return d.replace("middle_block.1", "mid_block.attentions.0")

    ldm = [f"model.diffusion_model.input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)]
    ldm += [f"model.diffusion_model.output_blocks.{i}.1" for i in range(3, 12)] + ["model.diffusion_model.middle_block.1"]
    table = attention_prefixes(sd14)
    assert {v: k for k, v in table.items()} == {k: original(k) for k in ldm}
