"""SynCD SDXL: the IP-Adapter-Plus global image condition (first reference) and the Lightning
`sdxl_finetuned_20k.ckpt` layout (UNet LoRA + IP-Adapter in `state_dict`, strict keys)."""
from __future__ import annotations

import pytest
import torch

from common.errors import UsageError
from common.models.ip_adapter import loaded_ip_adapters, random_ip_adapter_state
from common.models.tiny import build_tiny
from syncd.checkpoint import SDXL_PREFIX, SDXL_TARGETS, load_sdxl_lightning_checkpoint, syncd_state_dict
from syncd.sdxl_pipeline import generate_sdxl

ENCODER, FEATURE = "tiny-clip-vision-h", 32  # stands in for CLIP ViT-H/14 (penultimate hidden size)


def pipe():
    p = build_tiny("tiny-sdxl")
    p.set_progress_bar_config(disable=True)
    return p


def refs(seed: int) -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run(p, r, ip=None):
    return torch.tensor(list(generate_sdxl(p, "a toy", r, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                                           progress=False, ip_adapter=ip).getdata()), dtype=torch.float32)


def add_ip(p, scale: float):
    from common.models.ip_adapter import load_ip_adapter

    return load_ip_adapter(p, random_ip_adapter_state(p.unet, "plus", FEATURE, seed=1), image_encoder=ENCODER,
                           scale=scale)


def test_ip_adapter_scale_zero_is_the_no_ip_path_and_the_first_reference_matters():
    p = pipe()
    r = refs(0)
    base = run(p, r)
    ip = add_ip(p, 0.0)
    with pytest.raises(UsageError, match="IP-Adapter"):  # a loaded adapter without its handle: refused
        run(p, r)
    assert torch.equal(run(p, r, ip), base)
    ip.set_scale(0.6)
    with_ip = run(p, r, ip)
    assert not torch.equal(with_ip, base)
    other_first = r.clone()
    other_first[0] = refs(5)[0]
    assert not torch.equal(run(p, other_first, ip), with_ip)  # the global image is the first reference


def test_image_reaches_unet_as_image_embeds_of_the_first_reference():
    p = pipe()
    ip = add_ip(p, 0.6)
    r = refs(0)
    seen = []
    forward = p.unet.forward

    def spy(*a, added_cond_kwargs=None, **k):
        seen.append([e.clone() for e in added_cond_kwargs["image_embeds"]])
        return forward(*a, added_cond_kwargs=added_cond_kwargs, **k)

    p.unet.forward = spy
    run(p, r, ip)
    from syncd.sdxl_pipeline import reference_pil

    pos, neg = ip.encode(reference_pil(r[0]))  # [1, 1, L, W]
    assert len(seen) == 2 * 4  # 2 steps x (reference write, e_u, e_i, e_c)
    write, e_u, e_i, e_c = seen[:4]
    assert torch.equal(write[0], pos.expand(2, *pos.shape[1:]))
    assert torch.equal(e_u[0], neg) and torch.equal(e_i[0], pos) and torch.equal(e_c[0], pos)
    assert not torch.equal(pos, neg)


def lightning_file(tmp_path, unet_src, ip_state, extra=None):
    lora = syncd_state_dict(unet_src, SDXL_PREFIX)
    sd = dict(lora)
    sd.update({f"image_proj_model.{k}": v for k, v in ip_state["image_proj"].items()})
    sd.update({f"adapter_modules.{k}": v for k, v in ip_state["ip_adapter"].items()})
    sd.update(extra or {})
    path = tmp_path / "sdxl_finetuned_20k.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 20000}, path)
    return path, lora


def test_lightning_checkpoint_loads_lora_and_ip_adapter_exactly(tmp_path):
    from common.train.lora import add_lora

    src = build_tiny("tiny-sdxl").unet
    add_lora(src, 4, alpha=4, target_modules=list(SDXL_TARGETS), trainable_dtype=None)
    with torch.no_grad():
        for n, prm in src.named_parameters():
            if "lora_B" in n:
                prm.normal_()
    state = random_ip_adapter_state(src, "plus", FEATURE, seed=3)
    path, lora = lightning_file(tmp_path, src, state)
    p = pipe()
    n, ip = load_sdxl_lightning_checkpoint(p.unet, path, image_encoder=ENCODER, ip_adapter_scale=0.6)
    assert n == len(lora) > 0 and loaded_ip_adapters(p.unet) == 1 and ip.scale == 0.6
    own = syncd_state_dict(p.unet, SDXL_PREFIX)
    assert own.keys() == lora.keys() and all(torch.equal(own[k], lora[k]) for k in lora)
    procs = dict(p.unet.attn_processors)
    for k, v in state["ip_adapter"].items():  # "{slot}.to_k_ip.weight" -> that processor's to_k_ip[0]
        slot, kind, _ = k.split(".")
        proc = procs[list(procs)[int(slot)]]
        assert torch.equal(getattr(proc, kind)[0].weight, v)


def test_lightning_checkpoint_strict_keys_and_bad_files(tmp_path):
    from common.train.lora import add_lora

    src = build_tiny("tiny-sdxl").unet
    add_lora(src, 4, alpha=4, target_modules=list(SDXL_TARGETS), trainable_dtype=None)
    state = random_ip_adapter_state(src, "plus", FEATURE)
    path, _ = lightning_file(tmp_path, src, state, {"vae.decoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(UsageError, match="neither UNet LoRA"):
        load_sdxl_lightning_checkpoint(pipe().unet, path)
    torch.save({"weights": {}}, tmp_path / "x.ckpt")
    with pytest.raises(UsageError, match="no 'state_dict'"):
        load_sdxl_lightning_checkpoint(pipe().unet, tmp_path / "x.ckpt")
    torch.save({"state_dict": {}, "hparams": torch.nn.Identity()}, tmp_path / "obj.ckpt")
    with pytest.raises(UsageError, match="convert once") as e:
        load_sdxl_lightning_checkpoint(pipe().unet, tmp_path / "obj.ckpt")
    assert "\n" not in str(e.value)


def test_sample_cli_ip_adapter_path_scale_zero_equals_no_ip_and_scale_changes_output(tmp_path):
    import numpy as np
    from PIL import Image

    from common.models.ip_adapter import save_ip_adapter
    from syncd.sample import main as sample

    refdir = tmp_path / "toy"
    refdir.mkdir()
    rng = np.random.RandomState(0)
    for i in range(2):
        Image.fromarray((rng.rand(40, 40, 3) * 255).astype("uint8")).save(refdir / f"{i}.png")
    ipfile = save_ip_adapter(random_ip_adapter_state(build_tiny("tiny-sdxl").unet, "plus", FEATURE, seed=2),
                             tmp_path / "ip-adapter-plus_sdxl_vit-h.bin")
    common = ["--model", "tiny-sdxl", "--ref_images", str(refdir), "--numref", "2", "--inference_steps", "2",
              "--num_images_per_prompt", "1", "--height", "32"]

    def pixels(name, *extra):
        path = sample([*common, "--outdir", str(tmp_path / name), *extra])[0]
        return np.asarray(Image.open(path))

    ip = ["--ip_adapter_path", str(ipfile), "--image_encoder", ENCODER]
    base = pixels("base")
    assert np.array_equal(pixels("zero", *ip, "--ip_adapter_scale", "0"), base)
    assert not np.array_equal(pixels("on", *ip, "--ip_adapter_scale", "0.6"), base)
