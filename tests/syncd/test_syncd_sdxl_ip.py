"""SynCD SDXL: the IP-Adapter-Plus global image condition (first reference) and the Lightning
`sdxl_finetuned_20k.ckpt` layout (UNet LoRA + IP-Adapter to_k_ip/to_v_ip in `state_dict`, strict keys; the
image projection comes from the base IP-Adapter-Plus file)."""
from __future__ import annotations

import pytest
import torch

from common.errors import UsageError
from common.models.ip_adapter import loaded_ip_adapters, random_ip_adapter_state
from common.models.tiny import build_tiny
from syncd.checkpoint import SDXL_PREFIX, SDXL_TARGETS, load_sdxl_lightning_checkpoint, sdxl_state_dict, syncd_state_dict
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


def _spy(p, ip):
    """Per UNet call: (image_embeds, IP-Adapter scale in the processors at that moment)."""
    from common.models.ip_adapter import ip_adapter_processors

    seen = []
    forward = p.unet.forward
    proc = next(iter(ip_adapter_processors(p.unet).values()))

    def spy(*a, added_cond_kwargs=None, **k):
        seen.append(([e.clone() for e in added_cond_kwargs["image_embeds"]], proc.scale[ip.index]))
        return forward(*a, added_cond_kwargs=added_cond_kwargs, **k)

    p.unet.forward = spy
    return seen


def test_ip_adapter_scale_applies_to_the_target_passes_and_the_reference_pass_runs_at_one():
    """The original pipeline: change_ipadapter_scale(1.0) around the reference pass, ip_adapter_scale for the
    target; so scale 0 removes the global image from the target passes but not the references' own images."""
    p = pipe()
    r = refs(0)
    base = run(p, r)
    ip = add_ip(p, 0.0)
    with pytest.raises(UsageError, match="IP-Adapter"):  # a loaded adapter without its handle: refused
        run(p, r)
    seen = _spy(p, ip)
    zero = run(p, r, ip)
    assert [sc for _, sc in seen] == [1.0, 0.0, 0.0, 0.0] * 2 and ip.scale == 0.0  # restored after each write
    assert not torch.equal(zero, base)  # the references' K/V carry their own image through the IP-Adapter
    other_first = r.clone()
    other_first[0] = refs(5)[0]
    ip.set_scale(0.6)
    seen.clear()
    with_ip = run(p, r, ip)
    assert [sc for _, sc in seen] == [1.0, 0.6, 0.6, 0.6] * 2
    assert not torch.equal(with_ip, zero)
    assert not torch.equal(run(p, other_first, ip), with_ip)  # the global image is the first reference


def test_image_reaches_unet_as_image_embeds_of_the_first_reference():
    from syncd.sdxl_pipeline import reference_embeds, reference_pil

    p = pipe()
    ip = add_ip(p, 0.6)
    r = refs(0)
    seen = _spy(p, ip)
    run(p, r, ip)
    pos, neg = ip.encode(reference_pil(r[0]))  # [1, 1, L, W]
    own = reference_embeds(ip, r)  # [2, 1, L, W]
    assert len(seen) == 2 * 4  # 2 steps x (reference write, e_u, e_i, e_c)
    write, e_u, e_i, e_c = (e for e, _ in seen[:4])
    assert torch.equal(write[0], own) and torch.equal(own[:1], pos) and not torch.equal(own[1], own[0])
    assert torch.equal(e_u[0], neg) and torch.equal(e_i[0], pos) and torch.equal(e_c[0], pos)
    assert not torch.equal(pos, neg)


def lightning_file(tmp_path, unet_src, extra=None):
    """The original's Lightning `state_dict` after CUDACallback: UNet LoRA + to_k_ip/to_v_ip (no image projection)."""
    sd = sdxl_state_dict(unet_src)
    sd.update(extra or {})
    path = tmp_path / "sdxl_finetuned_20k.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 20000}, path)
    return path, sd


def _source_unet(seed: int):
    """A UNet with a trained-looking LoRA (B != 0) and IP-Adapter-Plus whose to_k_ip/to_v_ip moved from the base."""
    from common.models.ip_adapter import load_ip_adapter
    from common.train.lora import add_lora

    src = build_tiny("tiny-sdxl").unet
    load_ip_adapter(src, random_ip_adapter_state(src, "plus", FEATURE, seed=seed), image_encoder=ENCODER)
    add_lora(src, 4, alpha=4, target_modules=list(SDXL_TARGETS), trainable_dtype=None)
    with torch.no_grad():
        for n, prm in src.named_parameters():
            if "lora_B" in n or "_ip." in n:
                prm.normal_()
    return src


def test_lightning_checkpoint_loads_lora_and_ip_adapter_exactly(tmp_path):
    from common.models.ip_adapter import cross_attention_layers, ip_adapter_processors, save_ip_adapter

    src = _source_unet(3)
    path, sd = lightning_file(tmp_path, src)
    base_state = random_ip_adapter_state(src, "plus", FEATURE, seed=3)
    base = save_ip_adapter(base_state, tmp_path / "ip-adapter-plus_sdxl_vit-h.bin")
    p = pipe()
    n, ip = load_sdxl_lightning_checkpoint(p.unet, path, image_encoder=ENCODER, ip_adapter_scale=0.6,
                                           ip_adapter_path=base)
    lora = {k: v for k, v in sd.items() if "lora_" in k}
    assert n == len(lora) > 0 and loaded_ip_adapters(p.unet) == 1 and ip.scale == 0.6
    own = syncd_state_dict(p.unet, SDXL_PREFIX)
    assert own.keys() == lora.keys() and all(torch.equal(own[k], lora[k]) for k in lora)
    procs, src_procs = ip_adapter_processors(p.unet), ip_adapter_processors(src)
    for slot, name, _ in cross_attention_layers(p.unet):  # the checkpoint's projections, not the base file's
        for kind in ("to_k_ip", "to_v_ip"):
            assert torch.equal(getattr(procs[name], kind)[0].weight, getattr(src_procs[name], kind)[0].weight)
            assert not torch.equal(getattr(procs[name], kind)[0].weight, base_state["ip_adapter"][f"{slot}.{kind}.weight"])
    proj = dict(p.unet.encoder_hid_proj.image_projection_layers[0].state_dict())  # the base file's Resampler
    assert torch.equal(proj["latents"], base_state["image_proj"]["latents"])


def test_lightning_checkpoint_strict_keys_and_bad_files(tmp_path):
    path, _ = lightning_file(tmp_path, _source_unet(0), {"vae.decoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(UsageError, match="neither UNet LoRA"):
        load_sdxl_lightning_checkpoint(pipe().unet, path)
    torch.save({"weights": {}}, tmp_path / "x.ckpt")
    with pytest.raises(UsageError, match="no 'state_dict'"):
        load_sdxl_lightning_checkpoint(pipe().unet, tmp_path / "x.ckpt")
    torch.save({"state_dict": {}, "hparams": torch.nn.Identity()}, tmp_path / "obj.ckpt")
    with pytest.raises(UsageError, match="convert once") as e:
        load_sdxl_lightning_checkpoint(pipe().unet, tmp_path / "obj.ckpt")
    assert "\n" not in str(e.value)


def test_sample_cli_ip_adapter_path_and_scale_change_output(tmp_path):
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
    zero = pixels("zero", *ip, "--ip_adapter_scale", "0")
    assert not np.array_equal(zero, base)  # the reference pass runs the IP-Adapter at 1.0 whatever the scale
    assert not np.array_equal(pixels("on", *ip, "--ip_adapter_scale", "0.6"), zero)
