"""SynCD SDXL training with the IP-Adapter-Plus global image (pipelines/sdxl_pipeline/model.py): trainkeys
lora+to_k_ip+to_v_ip, image drop through the IP embeds, random_permute, and the Lightning checkpoint keys
(`unet.<module>.lora_A.default.weight`, `unet.<attention>.processor.attn_op.to_k_ip.0.weight`) that the sampling
path loads back exactly; exact resume with the IP weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.cli import parse_args
from common.errors import UsageError
from common.models.ip_adapter import (cross_attention_layers, ip_adapter_processors, random_ip_adapter_state,
                                      read_ip_adapter, save_ip_adapter)
from common.models.tiny import build_tiny

ENCODER, FEATURE = "tiny-clip-vision-h", 32  # stands in for CLIP ViT-H/14 (penultimate hidden size)

# tiny-sdxl's transformer blocks, written out by hand (down_blocks.1, up_blocks.0 x 2 attentions, mid_block)
BLOCKS = ["down_blocks.1.attentions.0.transformer_blocks.0", "down_blocks.1.attentions.0.transformer_blocks.1",
          "up_blocks.0.attentions.0.transformer_blocks.0", "up_blocks.0.attentions.0.transformer_blocks.1",
          "up_blocks.0.attentions.1.transformer_blocks.0", "up_blocks.0.attentions.1.transformer_blocks.1",
          "mid_block.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.1"]
# the original's naming: Lightning attribute `unet.`, diffusers add_adapter (adapter "default", no PEFT wrapper),
# IP processors wrapped as RefAttnProc(attn_op=IPAdapterAttnProcessor2_0) -> `processor.attn_op.to_k_ip.0`
LORA_KEYS = {f"unet.{blk}.attn1.{m}.lora_{ab}.default.weight" for blk in BLOCKS
             for m in ("to_q", "to_k", "to_v", "to_out.0") for ab in "AB"}
IP_KEYS = {f"unet.{blk}.attn2.processor.attn_op.{kind}.0.weight" for blk in BLOCKS for kind in ("to_k_ip", "to_v_ip")}


def _data(root: Path, size: int = 64) -> Path:
    (root / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"0_0_{k}.jpg" for k in range(3)]
    for nm in names:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / nm)
        m = np.zeros((size, size), np.uint8)
        m[16:48, 16:48] = 255
        Image.fromarray(m).save(root / "masks" / nm)
    (root / "metadata.json").write_text(json.dumps([{"filenames": names, "prompts": ["a toy", "b", "c"]}]))
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("syncd_sdxl_ip")
    unet = build_tiny("tiny-sdxl").unet
    plus = save_ip_adapter(random_ip_adapter_state(unet, "plus", FEATURE, seed=2), root / "ip-adapter-plus.bin")
    plain = save_ip_adapter(random_ip_adapter_state(unet, "plain", 16, seed=2), root / "ip-adapter-plain.bin")  # pooled
    return {"data": _data(root / "data"), "plus": plus, "plain": plain, "root": root}


def _flags(files, *extra, ip="plus"):
    ipf = [] if ip is None else ["--ip_adapter_path", str(files[ip]), "--image_encoder", ENCODER]
    return ["--model", "tiny-sdxl", "--train_data_dir", str(files["data"]), "--resolution", "64", "--rank", "4",
            "--masked", *ipf, *extra]


def _method(files, *extra, ip="plus", **drops):
    from accelerate import Accelerator

    from syncd.data import SynCDDataset
    from syncd.train import SynCDMethod, build_parser, resolve_args

    args = resolve_args(parse_args(build_parser(), _flags(files, "--output_dir", str(files["root"] / "o"), *extra, ip=ip)))
    ds = SynCDDataset(args.train_data_dir, 64, **{"drop_both": 0, "drop_image": 0, "drop_text": 0, "mask_ones_prob": 0,
                                                   **drops})
    method = SynCDMethod(args, ds)
    method.setup(Accelerator(cpu=True))
    return method, ds


def _batch(ds, drop: bool = False):
    from syncd.data import collate

    return {**collate([ds[0]]), "drop_image": [drop]}


def _randomize_lora(unet, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_gradients_reach_lora_and_ip_projections_and_nothing_else(files, fresh_accelerate_state):
    method, ds = _method(files)
    assert method.args.trainkeys == "lora+to_k_ip+to_v_ip"  # the original's default with an IP-Adapter
    _randomize_lora(method.unet)  # B != 0, so lora_A gets gradient too
    torch.manual_seed(0)
    method._sdxl_loss(_batch(ds))[0].backward()
    grads = {n: p.grad for n, p in method.unet.named_parameters() if p.grad is not None}
    trainable = {n for n, p in method.unet.named_parameters() if p.requires_grad}
    expected = {n for n, _ in method.unet.named_parameters() if "lora_" in n or ".to_k_ip." in n or ".to_v_ip." in n}
    assert trainable == expected and set(grads) == expected
    assert sum(".to_k_ip." in n for n in expected) == len(BLOCKS) == sum(".to_v_ip." in n for n in expected)
    assert all(g.abs().sum() > 0 for g in grads.values())
    ids = {id(p) for p in method.trainable_parameters()}
    assert ids == {id(p) for n, p in method.unet.named_parameters() if n in expected}
    others = [method.pipe.vae, method.pipe.text_encoder, method.pipe.text_encoder_2, method.ip.image_encoder.model,
              method.unet.encoder_hid_proj]
    assert all(p.grad is None and not p.requires_grad for m in others for p in m.parameters())


def _spy_embeds(unet):
    seen = []
    forward = unet.forward

    def spy(*a, added_cond_kwargs=None, **k):
        seen.append([e.detach().clone() for e in added_cond_kwargs["image_embeds"]])
        return forward(*a, added_cond_kwargs=added_cond_kwargs, **k)

    unet.forward = spy
    return seen


def test_drop_image_gives_the_samplers_null_image_embeds(files, fresh_accelerate_state):
    from syncd.sdxl_pipeline import reference_pil

    method, ds = _method(files)
    batch = _batch(ds, drop=True)
    seen = _spy_embeds(method.unet)
    method._sdxl_loss(batch)
    (ref_embeds,), (target_embeds,) = seen
    null = method.ip.encode(reference_pil(batch["images"][0, 0]))[1]  # what the sampler's e_u pass gets [1, 1, L, W]
    assert torch.equal(target_embeds, null) and torch.equal(ref_embeds, null.expand(2, -1, -1, -1))
    seen.clear()
    method._sdxl_loss(_batch(ds, drop=False))
    assert not torch.equal(seen[1][0], null)


def test_plain_adapter_dropped_image_is_zero_embeds_and_does_not_reach_the_unet(files, fresh_accelerate_state):
    """encode_condition_image: image_embeds * (1 - drop_im): the images reach the IP path not at all."""
    method, ds = _method(files, ip="plain")
    seen = _spy_embeds(method.unet)

    def loss(drop):
        torch.manual_seed(0)
        return method._sdxl_loss(_batch(ds, drop))[0]

    dropped, kept = loss(True), loss(False)
    assert all(torch.equal(e[0], torch.zeros_like(e[0])) for e in seen[:2])
    with torch.no_grad():  # another image encoder: the dropped loss cannot tell, the kept one can
        for p in method.ip.image_encoder.model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert torch.equal(loss(True), dropped) and not torch.equal(loss(False), kept)


def test_random_permute_moves_references_with_their_masks():
    from syncd.train import permute_references

    b, n = 4, 5
    images = torch.arange(n, dtype=torch.float32).view(1, n, 1, 1, 1).expand(b, n, 3, 2, 2).clone()
    masks = torch.zeros(b, n, 8, 8, dtype=torch.bool)
    for k in range(n):
        masks[:, k, k] = True  # mask k marks row k
    out, out_masks, order = permute_references(images, masks, torch.Generator().manual_seed(0))
    assert torch.equal(order[:, 0], torch.zeros(b, dtype=torch.long))  # the target stays first
    assert all(sorted(row.tolist()) == list(range(n)) for row in order)
    assert len({tuple(row.tolist()) for row in order}) > 1  # per-sample permutations
    for i in range(b):
        for k in range(n):
            src = int(order[i, k])
            assert torch.equal(out[i, k], images[i, src]) and torch.equal(out_masks[i, k], masks[i, src])
            assert out_masks[i, k, src].all() and int(out[i, k, 0, 0, 0]) == src


@pytest.mark.parametrize("permute", [True, False])
def test_global_image_is_a_reference_under_random_permute_else_the_target(files, permute, fresh_accelerate_state):
    from syncd.sdxl_pipeline import reference_pil

    method, ds = _method(files, *([] if permute else ["--no-random_permute"]))
    batch = _batch(ds)
    images = batch["images"]
    torch.manual_seed(3)
    target, refs = method._ip_embeds(images, [False])
    own = [method.ip.encode(reference_pil(images[0, k]))[0] for k in range(3)]
    assert torch.equal(target, own[1] if permute else own[0])
    assert torch.equal(refs, torch.cat(own[1:]))
    if permute:  # in the loss the references are shuffled first: the global image is a random reference
        seen = _spy_embeds(method.unet)
        picks = set()
        for s in range(8):
            torch.manual_seed(s)
            method._sdxl_loss(batch)
            picks |= {k for k in (1, 2) if torch.equal(seen[-1][0], own[k])}
            assert not torch.equal(seen[-1][0], own[0])
        assert picks == {1, 2}


def _train(argv):
    from accelerate.state import AcceleratorState, GradientState

    from syncd.train import main

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return main(argv)


def _ip_weights(unet) -> dict[str, torch.Tensor]:
    return {f"{name}.{kind}": getattr(p, kind)[0].weight.detach().clone()
            for name, p in ip_adapter_processors(unet).items() for kind in ("to_k_ip", "to_v_ip")}


def test_train_save_load_through_sampler_and_exact_resume(files, tmp_path, fresh_accelerate_state):
    from common.io import load_weights
    from syncd.checkpoint import load_sdxl_checkpoint
    from syncd.sdxl_pipeline import generate_sdxl

    base = _flags(files, "--gradient_accumulation_steps", "1", "--report_to", "none", "--checkpointing_steps", "1",
                  "--optimizer", "adamw", "--learning_rate", "1e-2", "--drop_image", "0.5", "--max_train_steps", "3")
    full = _train([*base, "--output_dir", str(tmp_path / "a")])
    trained = full.method.unet
    saved = load_weights(tmp_path / "a" / "pytorch_model.safetensors")
    assert set(saved) == LORA_KEYS | IP_KEYS  # exactly the original checkpoint's state_dict names
    start = read_ip_adapter(files["plus"])["ip_adapter"]
    assert not torch.equal(saved[f"unet.{BLOCKS[0]}.attn2.processor.attn_op.to_k_ip.0.weight"], start["1.to_k_ip.weight"])

    # the sampler's loading path: fresh pipeline + base IP-Adapter file (image projection) + our checkpoint
    pipe = build_tiny("tiny-sdxl")
    pipe.set_progress_bar_config(disable=True)
    n, ip = load_sdxl_checkpoint(pipe.unet, tmp_path / "a", ip_adapter_path=files["plus"], image_encoder=ENCODER,
                                 ip_adapter_scale=0.6)
    assert n == len(LORA_KEYS) and ip.scale == 0.6
    want, got = _ip_weights(trained), _ip_weights(pipe.unet)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    own = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" in k}
    assert all(torch.equal(own[k.removeprefix("unet.")], saved[k]) for k in LORA_KEYS)
    # the same file as a Lightning .ckpt ({"state_dict": ...}) loads the same
    torch.save({"state_dict": saved, "global_step": 3}, tmp_path / "x.ckpt")
    again = build_tiny("tiny-sdxl")
    load_sdxl_checkpoint(again.unet, tmp_path / "x.ckpt", ip_adapter_path=files["plus"], image_encoder=ENCODER)
    assert all(torch.equal(got[k], v) for k, v in _ip_weights(again.unet).items())
    refs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    img = generate_sdxl(pipe, "a toy", refs, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                        progress=False, ip_adapter=ip)
    assert img.size == (32, 32)

    # exact resume: drop the last checkpoint and the final weights, resume from checkpoint-2
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("*.lock"))
    shutil.rmtree(tmp_path / "b" / "checkpoint-3")
    (tmp_path / "b" / "pytorch_model.safetensors").unlink()
    resumed = _train([*base, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"])
    assert resumed.history == full.history[2:]
    b = load_weights(tmp_path / "b" / "pytorch_model.safetensors")
    assert b.keys() == saved.keys() and all(torch.equal(saved[k], b[k]) for k in saved)


def test_trainkeys_lora_leaves_ip_projections_untouched(files, tmp_path, fresh_accelerate_state):
    from common.io import load_weights

    trainer = _train(_flags(files, "--trainkeys", "lora", "--gradient_accumulation_steps", "1", "--report_to", "none",
                            "--checkpointing_steps", "0", "--optimizer", "adamw", "--learning_rate", "1e-2",
                            "--max_train_steps", "2", "--output_dir", str(tmp_path / "o")))
    unet = trainer.method.unet
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "_ip." in n)
    start = read_ip_adapter(files["plus"])["ip_adapter"]
    procs = ip_adapter_processors(unet)
    for n, name, _ in cross_attention_layers(unet):
        for kind in ("to_k_ip", "to_v_ip"):
            assert torch.equal(getattr(procs[name], kind)[0].weight, start[f"{n}.{kind}.weight"])
    saved = load_weights(tmp_path / "o" / "pytorch_model.safetensors")
    assert set(saved) == LORA_KEYS  # only what trains is saved, as the original's CUDACallback
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # the LoRA did train


def test_trainkeys_and_ip_flags_bad_input(files):
    from syncd.train import build_parser, resolve_args

    def resolve(*extra, ip="plus"):
        return resolve_args(parse_args(build_parser(), [*_flags(files, ip=ip), *extra]))

    assert resolve(ip=None).trainkeys == "lora"  # no IP-Adapter: LoRA only (the original's global_condition_type None)
    assert resolve("--trainkeys", "to_v_ip+lora+to_k_ip").trainkeys == "lora+to_k_ip+to_v_ip"
    assert resolve().rank == 4 and resolve_args(parse_args(build_parser(), ["--model", "sdxl", "--train_data_dir",
                                                                            "x"])).rank == 128
    a = resolve("--drop_im", "0.2", "--drop_txt", "0.3", "--drop_mask", "0.4")
    assert (a.drop_image, a.drop_text, a.drop_mask, a.random_permute, a.ip_adapter_scale) == (0.2, 0.3, 0.4, True, 1.0)
    for extra, ip, match in [(["--trainkeys", "lora+to_k_ip"], "plus", "together"),
                             (["--trainkeys", "lora+encoder_hid_proj"], "plus", "unknown: encoder_hid_proj"),
                             (["--trainkeys", "lora+to_k_ip+to_v_ip"], None, "needs --ip_adapter_path"),
                             (["--ip_adapter_path", "/nonexistent.bin"], None, "no such file"),
                             (["--drop_mask", "1.5"], "plus", "probability")]:
        with pytest.raises(UsageError, match=match):
            resolve(*extra, ip=ip)
    with pytest.raises(UsageError, match="for SDXL"):
        resolve_args(parse_args(build_parser(), ["--model", "tiny-flux", "--train_data_dir", "x",
                                                 "--ip_adapter_path", str(files["plus"])]))


def test_checkpoint_key_names_are_the_originals(files, tmp_path):
    """Pinned by hand: SDXL `unet.<module>.lora_A.default.weight` + `unet.<attn2>.processor.attn_op.to_k_ip.0.weight`
    (the .ckpt that sample.py strips of `unet.`); FLUX `transformer.base_model.model.<module>.lora_A.default.weight`."""
    from common.models.ip_adapter import load_ip_adapter
    from common.train.lora import add_lora
    from syncd.checkpoint import PREFIX, SDXL_PREFIX, SDXL_TARGETS, TRAIN_TARGETS, sdxl_state_dict, syncd_state_dict

    assert (SDXL_PREFIX, PREFIX) == ("unet.", "transformer.base_model.model.")
    unet = build_tiny("tiny-sdxl").unet
    load_ip_adapter(unet, files["plus"], image_encoder=ENCODER)
    add_lora(unet, 4, target_modules=list(SDXL_TARGETS), trainable_dtype=None)
    sd = sdxl_state_dict(unet)
    assert set(sd) == LORA_KEYS | IP_KEYS and set(sdxl_state_dict(unet, ip=False)) == LORA_KEYS
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight" in sd
    assert "unet.mid_block.attentions.0.transformer_blocks.1.attn2.processor.attn_op.to_v_ip.0.weight" in sd
    assert sd["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.default.weight"].shape == (64, 4)
    flux = build_tiny("tiny-flux").transformer
    add_lora(flux, 4, target_modules=list(TRAIN_TARGETS), trainable_dtype=None)
    fk = syncd_state_dict(flux)
    assert "transformer.base_model.model.transformer_blocks.0.attn.to_q.lora_A.default.weight" in fk
    assert "transformer.base_model.model.single_transformer_blocks.0.attn.to_k.lora_B.default.weight" in fk
    assert all(k.startswith(PREFIX) and k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in fk)


def test_sdxl_checkpoint_strict_loading(files, tmp_path):
    from common.io import save_weights
    from common.models.ip_adapter import load_ip_adapter
    from common.train.lora import add_lora
    from syncd.checkpoint import SDXL_PREFIX, SDXL_TARGETS, load_sdxl_checkpoint, load_syncd_checkpoint, sdxl_state_dict

    src = build_tiny("tiny-sdxl").unet
    load_ip_adapter(src, files["plus"], image_encoder=ENCODER)
    add_lora(src, 4, target_modules=list(SDXL_TARGETS), trainable_dtype=None)
    sd = sdxl_state_dict(src)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(UsageError, match="--ip_adapter_path"):  # to_k_ip without the image projection
        load_sdxl_checkpoint(build_tiny("tiny-sdxl").unet, path)
    flat = tmp_path / "m.safetensors"
    save_weights(sd, flat)
    with pytest.raises(UsageError, match="also holds IP-Adapter"):  # the LoRA-only loader would drop them
        load_syncd_checkpoint(build_tiny("tiny-sdxl").unet, flat, target_modules=SDXL_TARGETS, prefix=SDXL_PREFIX)
    bad = {k.replace("unet.", "unet.base_model.model.", 1) if "lora_" in k else k: v for k, v in sd.items()}
    torch.save({"state_dict": bad}, tmp_path / "peft.ckpt")
    with pytest.raises(UsageError, match="match no module"):  # a PEFT-wrapped prefix is not this layout
        load_sdxl_checkpoint(build_tiny("tiny-sdxl").unet, tmp_path / "peft.ckpt", ip_adapter_path=files["plus"])
    part = {k: v for k, v in sd.items() if not k.endswith("mid_block.attentions.0.transformer_blocks.1.attn2.processor."
                                                          "attn_op.to_v_ip.0.weight")}
    torch.save({"state_dict": part}, tmp_path / "part.ckpt")
    with pytest.raises(UsageError, match="1 to_k_ip/to_v_ip weight"):
        load_sdxl_checkpoint(build_tiny("tiny-sdxl").unet, tmp_path / "part.ckpt", ip_adapter_path=files["plus"])
    two = {**sd, f"unet.{BLOCKS[0]}.attn2.processor.attn_op.to_k_ip.1.weight": torch.zeros(64, 64)}
    torch.save({"state_dict": two}, tmp_path / "two.ckpt")
    with pytest.raises(UsageError, match="IP-Adapter 1"):
        load_sdxl_checkpoint(build_tiny("tiny-sdxl").unet, tmp_path / "two.ckpt", ip_adapter_path=files["plus"])
