"""Custom Diffusion training: augmentation geometry, what trains, losses, lr rule, resume, bad input (spec §5)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UsageError
from common.models.tiny import build_tiny
from customdiffusion import data as cd_data
from customdiffusion.train import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "assets" / "demo"
S = 64


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Two concepts of two images (drawn by assets/make_demo_images.py) and two class images each."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo_images", DEMO.parent / "make_demo_images.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = tmp_path_factory.mktemp("cd_demo")
    mod.make(root / "instances", size=80)
    for name in ("toy_robot", "teapot"):
        cls = root / "class" / name
        cls.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((S, S, 3), 40 * i + 60, np.uint8)).save(cls / f"class_{i:05d}.jpg")
    return root


def _flags(demo: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "tiny-sd", "--instance_data_dir", str(demo / "instances" / "toy_robot"),
            "--instance_prompt", "photo of a <new1> toy", "--modifier_token", "<new1>", "--resolution", str(S),
            "--train_batch_size", "2", "--output_dir", str(out), "--report_to", "none", "--lr_warmup_steps", "0",
            "--dataloader_num_workers", "0", "--learning_rate", "1e-3", "--adam_weight_decay", "1e-2", *extra]
# Weight decay stays ON (diffusers' default 1e-2) in every run: rows of the token table other than the
# modifier rows must still come out bit-identical (their param group has no decay).


# ----------------------------------------------------------------------------------------------- augmentation

def _fixed_scale(monkeypatch, r: int):
    monkeypatch.setattr(cd_data, "draw_scale", lambda size: r)


def test_zoom_out_pastes_on_zero_canvas_with_shrunk_mask(monkeypatch):
    np.random.seed(3)
    _fixed_scale(monkeypatch, 24)  # < 0.6 S
    img = Image.fromarray(np.full((50, 50, 3), 255, np.uint8))
    pixels, mask, prompt = cd_data.augment(img, "photo of a <new1> toy", S)
    inside = pixels[0] != 0
    rows, cols = torch.nonzero(inside.any(1)).flatten(), torch.nonzero(inside.any(0)).flatten()
    top, left = int(rows[0]), int(cols[0])
    assert len(rows) == len(cols) == 24 and torch.all(pixels[:, top:top + 24, left:left + 24] == 1)
    expected = torch.zeros(1, S // 8, S // 8)
    expected[:, top // 8 + 1:(top + 24) // 8 - 1, left // 8 + 1:(left + 24) // 8 - 1] = 1
    assert torch.equal(mask, expected)
    assert prompt.startswith(("a far away ", "very small ")) and prompt.endswith("photo of a <new1> toy")


def test_zoom_in_crops_with_full_mask_and_prefix(monkeypatch):
    _fixed_scale(monkeypatch, 80)  # > S
    pixels, mask, prompt = cd_data.augment(Image.new("RGB", (70, 70), (10, 20, 30)), "a toy", S)
    assert pixels.shape == (3, S, S) and torch.equal(mask, torch.ones(1, S // 8, S // 8))
    assert prompt in ("zoomed in a toy", "close up a toy")


def test_mid_scale_keeps_whole_image_and_noaug_keeps_everything(monkeypatch):
    img = Image.new("RGB", (S, S), (255, 0, 0))
    for aug, r in ((False, S), (True, 40)):  # 0.6 S <= 40 <= S: the original resizes the whole image to S
        _fixed_scale(monkeypatch, r)
        pixels, mask, prompt = cd_data.augment(img, "a toy", S, aug=aug)
        assert prompt == "a toy" and torch.equal(mask, torch.ones(1, S // 8, S // 8))
        assert torch.allclose(pixels[0], torch.ones(S, S)) and torch.allclose(pixels[1], -torch.ones(S, S))


def test_scale_distribution():
    np.random.seed(0)
    r = np.array([cd_data.draw_scale(512) for _ in range(10_000)])
    assert abs((r <= 512).mean() - 2 / 3) < 0.015 and np.all(r % 2 == 0)
    low, high = r[r <= 512], r[r > 512]
    assert low.min() >= 512 // 3 and low.max() <= 512
    assert high.min() >= int(1.2 * 512) and high.max() <= int(1.4 * 512)


def _original_getitem(instance, instance_prompt, class_image, size, hflip, center_crop):
    """The original's CustomDiffusionDataset.__getitem__ (src/diffusers_data_pipeline.py), transcribed: same
    draws, same order, same arithmetic (rows = cx, columns = cy)."""
    from torchvision import transforms

    def preprocess(image, scale):
        return (np.array(image.resize((scale, scale), resample=Image.BILINEAR)).astype(np.uint8) / 127.5
                - 1.0).astype(np.float32)

    flip = transforms.RandomHorizontalFlip(0.5 * hflip)
    image_transforms = transforms.Compose([
        flip, transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(size) if center_crop else transforms.RandomCrop(size),
        transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    instance = flip(instance)
    if np.random.randint(0, 3) < 2:
        random_scale = np.random.randint(size // 3, size + 1)
    else:
        random_scale = np.random.randint(int(1.2 * size), int(1.4 * size))
    if random_scale % 2 == 1:
        random_scale += 1
    h = random_scale // 2
    if random_scale < 0.6 * size:
        instance_prompt = np.random.choice(["a far away ", "very small "]) + instance_prompt
        cx = np.random.randint(h, size - h + 1)
        cy = np.random.randint(h, size - h + 1)
        image1 = preprocess(instance, random_scale)
        image = np.zeros((size, size, 3), dtype=np.float32)
        image[cx - h: cx + h, cy - h: cy + h, :] = image1
        mask = np.zeros((size // 8, size // 8))
        mask[(cx - h) // 8 + 1: (cx + h) // 8 - 1, (cy - h) // 8 + 1: (cy + h) // 8 - 1] = 1.
    elif random_scale > size:
        instance_prompt = np.random.choice(["zoomed in ", "close up "]) + instance_prompt
        cx = np.random.randint(size // 2, random_scale - size // 2 + 1)
        cy = np.random.randint(size // 2, random_scale - size // 2 + 1)
        image = preprocess(instance, random_scale)
        image = image[cx - size // 2: cx + size // 2, cy - size // 2: cy + size // 2, :]
        mask = np.ones((size // 8, size // 8))
    else:
        image = preprocess(instance, size)
        mask = np.ones((size // 8, size // 8))
    return (torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask).float()[None], instance_prompt,
            image_transforms(class_image))


@pytest.mark.parametrize("hflip,center_crop", [(False, False), (True, True), (True, False)])
def test_augmentation_matches_the_original_draw_for_draw(tmp_path, hflip, center_crop):
    """Exact pixels, masks, prompts and class crops vs the transcribed original, and the same RNG state after."""
    rng = np.random.default_rng(0)
    inst = Image.fromarray(rng.integers(0, 256, (53, 47, 3), dtype=np.uint8))
    cls = Image.fromarray(rng.integers(0, 256, (61, 90, 3), dtype=np.uint8))
    (tmp_path / "i").mkdir()
    cls.save(tmp_path / "c.png")
    inst.save(tmp_path / "i" / "i.png")
    ds = cd_data.CustomDiffusionDataset([cd_data.Concept("a <new1> toy", str(tmp_path / "i"), "toy", str(tmp_path))],
                                        S, with_prior_preservation=True, center_crop=center_crop, hflip=hflip)
    ds.classes = [(tmp_path / "c.png", "toy")]
    seen = set()
    for seed in range(40):
        np.random.seed(seed)
        torch.manual_seed(seed)
        ref = _original_getitem(inst, "a <new1> toy", cls, S, hflip, center_crop)
        state = (np.random.get_state()[1].copy(), torch.get_rng_state())
        np.random.seed(seed)
        torch.manual_seed(seed)
        item = ds[0]
        assert torch.equal(item["instance_pixels"], ref[0]) and torch.equal(item["instance_mask"], ref[1])
        assert item["instance_prompt"] == ref[2] and torch.equal(item["class_pixels"], ref[3])
        assert np.array_equal(np.random.get_state()[1], state[0]) and torch.equal(torch.get_rng_state(), state[1])
        seen.add(ref[2].split(" a ")[0])
    assert len(seen) >= 3  # small, large and middle scales all exercised


# ---------------------------------------------------------------------------------------------- training runs

def _base():
    return build_tiny("tiny-sd")


def test_one_step_changes_only_kv_and_the_modifier_row(demo, tmp_path):
    trainer = main(_flags(demo, tmp_path / "out", "--max_train_steps", "1", "--checkpointing_steps", "0"))
    pipe, base = trainer.method.pipe, _base()
    # base UNet weights untouched (training happens in the processors' own K/V copies)
    base_sd = base.unet.state_dict()
    for k, v in pipe.unet.state_dict().items():
        if "processor" not in k:
            assert torch.equal(v, base_sd[k]), k
    procs = {k: v for k, v in pipe.unet.state_dict().items() if "custom_diffusion" in k}
    assert procs and all(k.split(".processor.")[1].startswith(("to_k_custom", "to_v_custom")) for k in procs)
    changed = [k for k, v in procs.items()
               if not torch.equal(v, base_sd[k.replace(".processor.", ".").replace("_custom_diffusion", "")])]
    assert len(changed) == len(procs)
    # text encoder: only the new row moved; it started at the initializer's ("ktn") row
    emb, base_emb = pipe.text_encoder.get_input_embeddings().weight, base.text_encoder.get_input_embeddings().weight
    new_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    assert new_id == base_emb.shape[0] and torch.equal(emb[:new_id], base_emb)
    ktn = pipe.tokenizer.get_vocab()["ktn"]
    assert not torch.equal(emb[new_id], base_emb[ktn])
    enc_sd, base_enc = pipe.text_encoder.state_dict(), base.text_encoder.state_dict()
    assert all(torch.equal(v, base_enc[k]) for k, v in enc_sd.items() if "token_embedding" not in k)
    out = tmp_path / "out"
    assert (out / "pytorch_custom_diffusion_weights.safetensors").is_file() and (out / "<new1>.safetensors").is_file()


def test_gradients_reach_only_trainable_parameters(demo, tmp_path):
    trainer = main(_flags(demo, tmp_path / "out", "--max_train_steps", "1", "--checkpointing_steps", "0",
                          "--freeze_model", "crossattn"))
    m = trainer.method
    batch = next(iter(trainer.train_dataloader))
    loss, _ = m.loss(batch, trainer.accelerator)
    loss.backward()
    with_grad = {n for n, p in m.pipe.unet.named_parameters() if p.grad is not None}
    assert with_grad and all(".attn2.processor." in n for n in with_grad)
    assert {n.split(".processor.")[1] for n in with_grad} == {
        "to_q_custom_diffusion.weight", "to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight",
        "to_out_custom_diffusion.0.weight", "to_out_custom_diffusion.0.bias"}
    assert all(p.grad is None for p in m.pipe.vae.parameters())
    grads = {n for n, p in m.pipe.text_encoder.named_parameters() if p.grad is not None}
    assert len(grads) == 1 and next(iter(grads)).endswith("embeddings.token_embedding.weight")
    g = m.pipe.text_encoder.get_input_embeddings().weight.grad
    new_id = m.pipe.tokenizer.convert_tokens_to_ids("<new1>")
    assert g[new_id].abs().sum() > 0 and g[:new_id].abs().sum() == 0


def test_joint_training_trains_every_modifier_row(demo, tmp_path):
    concepts = [{"instance_prompt": "photo of a <new1> toy", "instance_data_dir": str(demo / "instances/toy_robot"),
                 "class_prompt": "toy", "class_data_dir": str(demo / "class/toy_robot")},
                {"instance_prompt": "photo of a <new2> teapot", "instance_data_dir": str(demo / "instances/teapot"),
                 "class_prompt": "teapot", "class_data_dir": str(demo / "class/teapot")}]
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(concepts))
    flags = _flags(demo, tmp_path / "out", "--max_train_steps", "2", "--checkpointing_steps", "0",
                   "--concepts_list", str(path), "--modifier_token", "<new1>+<new2>", "--with_prior_preservation",
                   "--num_class_images", "2", "--train_batch_size", "2")
    trainer = main(flags)
    pipe, base = trainer.method.pipe, _base()
    emb = pipe.text_encoder.get_input_embeddings().weight
    vocab = base.tokenizer.get_vocab()
    for token, init in (("<new1>", "ktn"), ("<new2>", "pll")):
        row = emb[pipe.tokenizer.convert_tokens_to_ids(token)]
        assert not torch.equal(row, base.text_encoder.get_input_embeddings().weight[vocab[init]]), token
    assert len(trainer.train_dataset) == 4


def test_prior_loss_is_added_with_its_weight(demo, tmp_path):
    flags = _flags(demo, tmp_path / "out", "--max_train_steps", "1", "--checkpointing_steps", "0",
                   "--with_prior_preservation", "--class_prompt", "toy",
                   "--class_data_dir", str(demo / "class/toy_robot"), "--num_class_images", "2")
    trainer = main(flags)
    m = trainer.method
    batch = next(iter(trainer.train_dataloader))
    assert batch["pixel_values"].shape[0] == 2 * batch["num_instance"]
    assert torch.all(batch["mask"][batch["num_instance"]:] == 1)

    def loss_with(weight, normalization="paper"):
        m.args.prior_loss_weight, m.args.loss_normalization = weight, normalization
        torch.manual_seed(5)
        with torch.no_grad():
            loss, logs = m.loss(batch, trainer.accelerator)
        return loss.item(), {k: float(v) for k, v in logs.items()}

    (l0, parts), (l1, _), (l2, _) = loss_with(0.0), loss_with(1.0), loss_with(2.0)
    assert l1 > l0 and abs((l2 - l0) - 2 * (l1 - l0)) < 1e-5
    assert l0 == pytest.approx(parts["instance"]) and l1 == pytest.approx(parts["instance"] + parts["prior"])
    # diffusers' normalisation: the same instance term times the 4 latent channels, the same prior term
    d1, dparts = loss_with(1.0, "diffusers")
    assert dparts["instance"] == pytest.approx(4 * parts["instance"], rel=1e-5)
    assert dparts["prior"] == pytest.approx(parts["prior"], rel=1e-6)


def test_scale_lr_rule(demo, tmp_path):
    flags = _flags(demo, tmp_path / "a", "--max_train_steps", "1", "--checkpointing_steps", "0", "--scale_lr",
                   "--learning_rate", "1e-5")
    assert main(flags).optimizer.param_groups[0]["lr"] == pytest.approx(2e-5)
    flags = _flags(demo, tmp_path / "b", "--max_train_steps", "1", "--checkpointing_steps", "0", "--scale_lr",
                   "--learning_rate", "1e-5", "--with_prior_preservation", "--class_prompt", "toy",
                   "--class_data_dir", str(demo / "class/toy_robot"), "--num_class_images", "2")
    trainer = main(flags)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([4e-5, 4e-5])
    assert trainer.optimizer.param_groups[1]["weight_decay"] == 0.0


def test_interrupted_and_resumed_run_reaches_the_same_weights(demo, tmp_path):
    from common.io import load_weights

    full = tmp_path / "full"
    main(_flags(demo, full, "--max_train_steps", "4", "--checkpointing_steps", "2"))
    part = tmp_path / "part"
    main(_flags(demo, part, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    main(_flags(demo, part, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint",
                "latest"))
    for name in ("pytorch_custom_diffusion_weights.safetensors", "<new1>.safetensors"):
        a, b = load_weights(full / name), load_weights(part / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_sdxl_trains_modifier_rows_in_both_text_encoders(demo, tmp_path):
    flags = _flags(demo, tmp_path / "out", "--max_train_steps", "1", "--checkpointing_steps", "0")
    flags[1] = "tiny-sdxl"
    trainer = main(flags)
    pipe, base = trainer.method.pipe, build_tiny("tiny-sdxl")
    for tok, enc, base_enc in ((pipe.tokenizer, pipe.text_encoder, base.text_encoder),
                               (pipe.tokenizer_2, pipe.text_encoder_2, base.text_encoder_2)):
        new_id = tok.convert_tokens_to_ids("<new1>")
        w, w0 = enc.get_input_embeddings().weight, base_enc.get_input_embeddings().weight
        assert torch.equal(w[:new_id], w0) and not torch.equal(w[new_id], w0[tok.get_vocab()["ktn"]])
    from common.io import load_weights

    emb = load_weights(tmp_path / "out" / "<new1>.safetensors")
    assert set(emb) == {"clip_l", "clip_g"}


def test_trained_concept_samples_through_the_shared_loop(demo, tmp_path, tokens_only):
    from common.pipelines.text2image import generate
    from customdiffusion.apply import apply_customdiffusion
    from customdiffusion.formats import load

    main(_flags(demo, tmp_path / "out", "--max_train_steps", "3", "--checkpointing_steps", "0"))
    pipe = build_tiny("tiny-sd")
    apply_customdiffusion(pipe, tmp_path / "out")
    # reference: the same pipeline with the trained <new1> embedding added but the base K/V
    ref = build_tiny("tiny-sd")
    apply_customdiffusion(ref, tokens_only(ref, load(tmp_path / "out")))

    def kw():
        return dict(num_inference_steps=1, generator=torch.Generator().manual_seed(0), progress=False, height=32,
                    width=32)

    concept = generate(pipe, "photo of a <new1> toy", **kw())
    plain = generate(ref, "photo of a <new1> toy", **kw())
    assert concept.shape == (1, 3, 32, 32) and torch.isfinite(concept).all() and not torch.equal(concept, plain)


def test_latent_factor_is_measured_from_the_vae(demo, tmp_path):
    """A VAE that downsamples by 4 (3 blocks): the loss mask follows the latents instead of assuming 8."""
    from diffusers import AutoencoderKL

    pipe = build_tiny("tiny-sd")
    pipe.vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                             layers_per_block=1, norm_num_groups=8, sample_size=32)
    pipe.save_pretrained(tmp_path / "vae4")
    flags = _flags(demo, tmp_path / "out", "--max_train_steps", "1", "--checkpointing_steps", "0", "--resolution", "32")
    flags[1] = str(tmp_path / "vae4")
    trainer = main(flags)
    assert trainer.method.latent_factor == 4
    batch = next(iter(trainer.train_dataloader))
    assert batch["mask"].shape[-2:] == (8, 8) and batch["pixel_values"].shape[-2:] == (32, 32)


def test_initializer_word_is_the_bare_vocabulary_entry_as_in_the_original(demo, tmp_path):
    """The original's slow-tokenizer `encode(["pll"])` looked "pll" up as a token: row 47629 (the LDM code's
    hard-coded row), not "pll</w>" (25266, what a word-level encode gives)."""
    from common.io import load_weights

    out = tmp_path / "out"
    main(_flags(demo, out, "--max_train_steps", "1", "--checkpointing_steps", "0", "--initializer_token", "pll",
                "--learning_rate", "0"))
    base = build_tiny("tiny-sd")
    vocab = base.tokenizer.get_vocab()
    assert (vocab["pll"], vocab["pll</w>"]) == (47629, 25266)
    emb = base.text_encoder.get_input_embeddings().weight
    row = load_weights(out / "<new1>.safetensors")["<new1>"]
    assert torch.equal(row, emb[47629]) and not torch.equal(row, emb[25266])


def test_prior_loss_composition_hand_computed():
    """Spec §5 test 17 with numbers worked out by hand: batch [1 instance, 1 class], C = 4 channels, 2x2 cells.

    Instance target = channel index + 1 where the mask keeps (2 of 4 cells), 100 where it does not (ignored);
    prediction 0 everywhere -> squared errors 1, 4, 9, 16 per kept cell:
      paper     = (2 * (1 + 4 + 9 + 16)) / (4 * 2) = 7.5
      diffusers = (2 * (1 + 4 + 9 + 16)) / 2       = 30
    Class target 3 everywhere (mask all ones) -> MSE 9; prior weight 0.5 adds 4.5.
    """
    from customdiffusion.loss import custom_diffusion_loss

    target = torch.zeros(2, 4, 2, 2)
    keep = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for c in range(4):
        target[0, c] = torch.where(keep.bool(), torch.tensor(c + 1.0), torch.tensor(100.0))
    target[1] = 3.0
    mask = torch.stack([keep[None], torch.ones(1, 2, 2)])
    pred = torch.zeros_like(target)
    paper, parts = custom_diffusion_loss(pred, target, mask, 1, prior_loss_weight=0.5, with_prior=True)
    assert paper.item() == 7.5 + 4.5 and parts["instance"].item() == 7.5 and parts["prior"].item() == 9.0
    diffusers, _ = custom_diffusion_loss(pred, target, mask, 1, prior_loss_weight=0.5, with_prior=True,
                                         normalization="diffusers")
    assert diffusers.item() == 30.0 + 4.5
    no_prior, _ = custom_diffusion_loss(pred, target, mask, 1, prior_loss_weight=0.0, with_prior=True)
    assert no_prior.item() == 7.5
    alone, logs = custom_diffusion_loss(pred[:1], target[:1], mask[:1], 1)
    assert alone.item() == 7.5 and logs == {}


def test_lr_rules_diffusers_and_ldm():
    """Spec §5 test 18: diffusers' --scale_lr (x2 with prior preservation) and the LDM rule; the papers'
    settings of both give 8e-5."""
    import argparse

    from common.train.optim import scaled_learning_rate
    from customdiffusion.train import ldm_learning_rate, prior_lr_factor

    def diffusers_lr(base, bs, accum, procs, prior):
        ns = argparse.Namespace(scale_lr=True, with_prior_preservation=prior)
        return scaled_learning_rate(base, accum, bs, procs) * prior_lr_factor(ns)

    assert diffusers_lr(1e-5, 2, 1, 1, False) == pytest.approx(2e-5)
    assert diffusers_lr(1e-5, 2, 1, 1, True) == pytest.approx(4e-5)
    assert ldm_learning_rate(1e-5, batch_size=4, n_gpu=2, accumulate_grad_batches=3) == pytest.approx(24e-5)
    paper_ldm = ldm_learning_rate(1e-5, batch_size=4, n_gpu=2)
    assert paper_ldm == pytest.approx(8e-5) == diffusers_lr(1e-5, 2, 1, 2, True)
    assert prior_lr_factor(argparse.Namespace(scale_lr=False, with_prior_preservation=True)) == 1.0


# ----------------------------------------------------------------------------------------------- bad input

def test_bad_inputs_give_one_line(demo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--instance_data_dir", str(empty)], "no images found"),
        (["--modifier_token", "cat"], "already contains"),
        (["--instance_prompt", "photo of a toy"], "uses none of the modifier tokens"),
        (["--push_to_hub"], "not supported"),
        (["--freeze_model", "everything"], "invalid choice"),
    ]
    for extra, needle in cases:
        flags = _flags(demo, tmp_path / "out", "--max_train_steps", "1", *extra)
        if extra[0] == "--modifier_token":
            flags[flags.index("photo of a <new1> toy")] = "photo of a cat toy"
        with pytest.raises(UsageError) as err:
            main(flags)
        assert needle in str(err.value) and "\n" not in str(err.value), (extra, str(err.value))


def test_multi_token_initializer_is_refused(demo, tmp_path):
    with pytest.raises(UsageError, match="encodes to"):
        main(_flags(demo, tmp_path / "out", "--max_train_steps", "1", "--initializer_token", "photograph of"))


def test_concepts_list_missing_field(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"instance_prompt": "photo of a <new1> cat"}]))
    with pytest.raises(UsageError, match="entry 0 lacks instance_data_dir"):
        main(["--model", "tiny-sd", "--concepts_list", str(path), "--modifier_token", "<new1>",
              "--output_dir", str(tmp_path / "o")])


def test_class_images_are_generated_resumably(tmp_path):
    from common.pipelines.class_images import ensure_class_images

    pipe = build_tiny("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / "cls"
    first = ensure_class_images(pipe, "toy", folder, 3, batch_size=2, num_inference_steps=1, show_progress=False)
    assert [p.name for p in first] == ["class_00000.jpg", "class_00001.jpg", "class_00002.jpg"]
    (folder / "class_00001.jpg").unlink()
    again = ensure_class_images(pipe, "toy", folder, 3, batch_size=2, num_inference_steps=1, show_progress=False)
    assert [p.name for p in again] == ["class_00001.jpg"]
    assert ensure_class_images(pipe, "toy", folder, 3, num_inference_steps=1, show_progress=False) == []


def test_two_process_cpu_training(demo, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo) trains a concept: every rank checkpoints its RNG, rank 0 saves."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    flags = _flags(demo, out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    flags[flags.index("--train_batch_size") + 1] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "scripts" / "train_customdiffusion.py"), *flags],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoint-2"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    from common.io import load_weights

    trained = load_weights(out / "pytorch_custom_diffusion_weights.safetensors")
    base = build_tiny("tiny-sd").unet.state_dict()
    key = next(iter(trained))
    base_key = key.replace(".processor.", ".").replace("_custom_diffusion", "")
    assert not torch.equal(trained[key], base[base_key])


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "customdiffusion").glob("train_*.yaml")))
def test_paper_configs_parse_into_the_trainer_flags(config):
    from common.cli import parse_args
    from customdiffusion.train import build_parser

    args = parse_args(build_parser(), ["--config", str(config), "--instance_data_dir", "x",
                                       "--instance_prompt", "photo of a <new1> cat"])
    assert args.lr_warmup_steps == 0 and args.max_train_steps in (250, 500, 750) and args.scale_lr


def test_bf16_mixed_precision_trains_and_validates(demo, tmp_path):
    """Frozen UNet/VAE in bf16, trained K/V and token rows in fp32; validation images under autocast."""
    out = tmp_path / "out"
    trainer = main(_flags(demo, out, "--max_train_steps", "2", "--checkpointing_steps", "0", "--mixed_precision",
                          "bf16", "--validation_prompt", "a <new1> toy", "--validation_steps", "2",
                          "--num_validation_images", "1"))
    m = trainer.method
    assert m.pipe.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for group in trainer.optimizer.param_groups for p in group["params"])
    assert [p.name for p in (out / "validation").iterdir()] == ["step-000002_0.png"]
    assert all(torch.isfinite(v).all() for v in m.state_to_save().values())


def test_prior_generation_in_low_precision_leaves_training_weights_untouched(demo, tmp_path):
    """Class images made in bf16 come from a separate copy: with lr 0 the saved K/V equal the base weights."""
    from common.io import load_weights

    out = tmp_path / "out"
    flags = _flags(demo, out, "--max_train_steps", "1", "--checkpointing_steps", "0", "--mixed_precision", "bf16",
                   "--with_prior_preservation", "--class_prompt", "toy", "--class_data_dir", str(tmp_path / "cls"),
                   "--num_class_images", "1", "--learning_rate", "0")
    main(flags)
    assert len(list((tmp_path / "cls").iterdir())) == 1
    base = build_tiny("tiny-sd").unet.state_dict()
    for key, value in load_weights(out / "pytorch_custom_diffusion_weights.safetensors").items():
        assert torch.equal(value, base[key.replace(".processor.", ".").replace("_custom_diffusion", "")]), key


def test_bad_instance_image_is_reported_before_the_model_loads(demo, tmp_path, monkeypatch):
    import shutil

    import customdiffusion.train as cd_train

    folder = tmp_path / "instances"
    shutil.copytree(demo / "instances" / "toy_robot", folder)
    (folder / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (1, 1)).save(folder / "tiny.png")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the images were checked")

    monkeypatch.setattr(cd_train, "load_pipeline", no_model)
    for bad in ("broken.png", "tiny.png"):
        other = "tiny.png" if bad == "broken.png" else "broken.png"
        moved = tmp_path / other
        shutil.move(folder / other, moved)
        flags = _flags(demo, tmp_path / "out", "--max_train_steps", "1")
        flags[flags.index(str(demo / "instances" / "toy_robot"))] = str(folder)
        with pytest.raises(UsageError) as err:
            main(flags)
        assert bad in str(err.value) and "\n" not in str(err.value)
        shutil.move(moved, folder / other)
        assert not (tmp_path / "out").exists()  # nothing written


# ------------------------------------------------------------------------------------ parity with the original

# src/diffusers_training.py's parse_args defaults (the flags both scripts share).
ORIGINAL_DEFAULTS = {
    "num_validation_images": 4, "prior_loss_weight": 1.0, "num_class_images": 100, "seed": 42,
    "resolution": None,  # resolved to the model's native size: 512 (SD script's default) / 1024 (SDXL script's)
    "center_crop": False, "train_batch_size": 4, "sample_batch_size": 4, "num_train_epochs": 1,
    "max_train_steps": None, "gradient_accumulation_steps": 1, "learning_rate": 1e-5, "scale_lr": False,
    "freeze_model": "crossattn_kv", "lr_scheduler": "constant", "lr_warmup_steps": 500, "adam_beta1": 0.9,
    "adam_beta2": 0.999, "adam_weight_decay": 1e-2, "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
    "mixed_precision": None, "prior_generation_precision": None, "modifier_token": None,
    "initializer_token": "ktn+pll+ucd", "hflip": False, "with_prior_preservation": False, "real_prior": False,
    "output_dir": "custom-diffusion-model", "report_to": "tensorboard", "logging_dir": "logs",
    "crops_coords_top_left_h": 0, "crops_coords_top_left_w": 0,  # src/diffusers_training_sdxl.py
}


def test_flag_defaults_match_the_original():
    from customdiffusion.train import build_parser

    args = vars(build_parser().parse_args([]))
    assert {k: args[k] for k in ORIGINAL_DEFAULTS} == ORIGINAL_DEFAULTS


def test_validation_is_the_originals_dpm_solver_run(tiny, monkeypatch):
    """DPM-Solver multistep on the model's config, 25 steps, guidance 7.5, one image per call, one generator;
    the training scheduler is put back afterwards."""
    import contextlib
    from types import SimpleNamespace

    import customdiffusion.train as T
    from diffusers import DPMSolverMultistepScheduler

    pipe = tiny()
    before = pipe.scheduler
    calls = []

    def fake_generate(p, prompts, **kw):
        calls.append((type(p.scheduler), prompts, kw))
        return [f"img{len(calls)}"]

    monkeypatch.setattr(T, "generate", fake_generate)
    args = SimpleNamespace(validation_prompt="a <new1> toy", num_validation_images=3, seed=5, resolution=S)
    fake = SimpleNamespace(args=args, pipe=pipe, family="sd", device="cpu",
                           accelerator=SimpleNamespace(autocast=contextlib.nullcontext))
    assert T.CustomDiffusionMethod.validate(fake, 0) == ["img1", "img2", "img3"]
    assert pipe.scheduler is before and len(calls) == 3
    gens = {id(kw["generator"]) for _, _, kw in calls}
    for cls, prompts, kw in calls:
        assert cls is DPMSolverMultistepScheduler and prompts == ["a <new1> toy"]
        assert kw["num_inference_steps"] == 25 and kw["guidance_scale"] == 7.5 and "eta" not in kw
    assert len(gens) == 1


def test_prior_generation_dtype_defaults_to_fp16_on_gpu_like_the_original():
    from customdiffusion.train import prior_generation_dtype

    assert prior_generation_dtype(None, "cuda") == torch.float16
    assert prior_generation_dtype(None, torch.device("cpu")) == torch.float32
    assert prior_generation_dtype("fp32", "cuda") == torch.float32 and prior_generation_dtype("no", "cuda") == torch.float32
    assert prior_generation_dtype("bf16", "cpu") == torch.bfloat16 and prior_generation_dtype("fp16", "cpu") == torch.float16


def test_modifier_rows_follow_the_originals_adamw_update_exactly():
    """Original: one AdamW (weight decay on) over the whole token table, gradients of other rows zeroed. Ours:
    modifier rows bit-identical to that, every other row untouched."""
    from types import SimpleNamespace

    from customdiffusion.train import CustomDiffusionMethod

    g = torch.Generator().manual_seed(0)
    table0, kv0 = torch.randn(20, 6, generator=g), torch.randn(4, 6, generator=g)
    ids = [17, 19]
    args = SimpleNamespace(learning_rate=3e-2, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.05,
                           adam_epsilon=1e-8, use_8bit_adam=False)
    ref_table, ref_kv = table0.clone().requires_grad_(), kv0.clone().requires_grad_()
    ref_opt = torch.optim.AdamW([ref_kv, ref_table], lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=0.05,
                                eps=1e-8)
    table, kv = table0.clone().requires_grad_(), kv0.clone().requires_grad_()
    method = SimpleNamespace(tokens=["<new1>", "<new2>"], token_ids=[ids], args=args,
                             accelerator=SimpleNamespace(sync_gradients=True))
    opt = CustomDiffusionMethod.make_optimizer(method, [{"params": [kv], "lr": args.learning_rate},
                                                        {"params": [table], "lr": args.learning_rate,
                                                         "weight_decay": 0.0}], args, 2.0)
    for group in ref_opt.param_groups:
        group["lr"] *= 2.0
    keep = torch.zeros(20, 1)
    keep[ids] = 1
    for step in range(5):
        grads = torch.randn(20, 6, generator=g), torch.randn(4, 6, generator=g)
        ref_table.grad, ref_kv.grad = grads[0] * keep, grads[1].clone()
        table.grad, kv.grad = grads[0] * keep, grads[1].clone()
        CustomDiffusionMethod.after_backward(method)
        ref_opt.step()
        opt.step()
    assert torch.equal(table[ids], ref_table[ids]) and torch.equal(kv, ref_kv)
    others = [i for i in range(20) if i not in ids]
    assert torch.equal(table[others], table0[others]) and not torch.equal(ref_table[others], table0[others])


def test_default_resolution_is_the_models_native_size(tiny):
    from customdiffusion.train import native_resolution

    assert native_resolution(tiny("tiny-sd")) == tiny("tiny-sd").unet.config.sample_size * 8
    sd14_like = type("P", (), {"unet": type("U", (), {"config": type("C", (), {"sample_size": 64})()})(),
                               "vae_scale_factor": 8})()
    sdxl_like = type("P", (), {"unet": type("U", (), {"config": type("C", (), {"sample_size": 128})()})(),
                               "vae_scale_factor": 8})()
    assert native_resolution(sd14_like) == 512 and native_resolution(sdxl_like) == 1024
