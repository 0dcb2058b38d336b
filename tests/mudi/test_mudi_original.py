"""MuDI against the original code (agwmon/MuDI train_segmix_lora_sdxl.py / flux/train_segmix_lora_flux.py).

`_Original` below re-types the original's DreamBoothDataset (image_process, image_collage, mask_to_tensor,
__getitem__ with its class branch, the FLUX flips) on the same files. Under the same python / numpy / torch
seeds our items must be identical to its items, tensor for tensor, and both must leave the three generators
in the same state (same draws, same order). Also: the DCO formula and the training latents' dtype.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.ImageOps import exif_transpose
from torchvision import transforms

from mudi.data import MuDIDataset, SegMixOptions
from mudi.losses import dco_loss
from mudi.metadata import CLASS_METADATA_FILE, read_metadata


class _Original:
    """The original dataset's logic, re-typed (SDXL: canvas 1024, margin_max 256, scales 0.75-1, white;
    FLUX: canvas = size, margin_max 64, scales 0.9-1, white with p 0.75, flips)."""

    def __init__(self, root, size, segmix_prob, soft_alpha, flux=False, random_flip=False, relative_scale=0.0,
                 class_root=None):
        self.size, self.segmix_prob, self.soft_alpha = size, segmix_prob, soft_alpha
        self.flux, self.random_flip = flux, random_flip
        self.canvas = size if flux else 1024
        rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines() if line.strip()]
        self.id_to_placeholder = rows[0]["id"]
        self.category_list = list(self.id_to_placeholder)
        s = relative_scale
        self.scale_dict = {"a": 1.0, "b": s} if s > 0 else {"a": abs(s), "b": 1.0} if s < 0 else None
        self.by_cat, self.items = defaultdict(list), []
        for r in rows[1:]:
            img = exif_transpose(Image.open(root / r["file_name"])).convert("RGB")
            mask = Image.open(root / r["mask_path"])
            self.by_cat[r["id"]].append({"image": img, "mask": mask})
            self.items.append((img, mask, r["text"], r["id"]))
        self.class_root = class_root
        if class_root is not None:
            rows = [json.loads(line) for line in (class_root / CLASS_METADATA_FILE).read_text().splitlines()
                    if line.strip()]
            self.prior_id_to_placeholder = rows[0]["id"]
            self.prior_category_list = list(self.prior_id_to_placeholder)
            self.prior_by_cat = defaultdict(list)
            for r in rows[1:]:
                img = exif_transpose(Image.open(class_root / r["file_name"])).convert("RGB")
                self.prior_by_cat[r["id"]].append({"image": img, "caption": r["text"],
                                                   "mask": Image.open(class_root / r["mask_path"])})
        self.image_transforms = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.RandomCrop(size), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
        self.flip = transforms.RandomHorizontalFlip(p=1.0)

    def image_process(self, image, mask, margin=32, fixed_scale=None):
        m = np.array(mask) > 128
        rows, cols = np.any(m, axis=1), np.any(m, axis=0)
        ymin, ymax = np.where(rows)[0][[0, -1]]
        xmin, xmax = np.where(cols)[0][[0, -1]]
        image, mask = image.crop((xmin, ymin, xmax, ymax)), mask.crop((xmin, ymin, xmax, ymax))
        width, height = image.size
        half, full = self.canvas // 2, self.canvas
        if fixed_scale is not None:
            f = min((half - margin) / width, (full - margin) / height) * fixed_scale
        else:
            max_factor = min((half - margin) / width, (full - margin) / height)
            f = np.random.uniform(max_factor * (0.9 if self.flux else 0.75), max_factor)
        size = (int(width * f), int(height * f))
        return image.resize(size), mask.resize(size)

    def image_collage(self, image_0, mask_0, image_1, mask_1, white, margin_max, height_sync):
        S = self.canvas
        background = np.zeros((S, S, 3), dtype=np.uint8)
        mask_map = np.zeros((S, S))
        if height_sync:
            y_max = S - max(image_0.size[1], image_1.size[1])
            y0 = y1 = random.randint(0, y_max) if y_max > 0 else 0
        else:
            y0, y1 = random.randint(0, S - image_0.size[1]), random.randint(0, S - image_1.size[1])
        image_0, m0 = np.array(image_0), np.array(mask_0) > 122
        image_0[m0 == 0] = 0
        image_1, m1 = np.array(image_1), np.array(mask_1) > 122
        image_1[m1 == 0] = 0
        is_left = random.random() < 0.5
        lm, rm = random.randint(1, margin_max), random.randint(1, margin_max)
        mask_map[y0:y0 + m0.shape[0], lm:lm + m0.shape[1]] += m0
        mask_map[y1:y1 + m1.shape[0], -rm - m1.shape[1]:-rm] += m1
        merged, union = mask_map > 0, mask_map > 1.5
        if is_left:
            background[y0:y0 + image_0.shape[0], lm:lm + image_0.shape[1]] = image_0
            background[union] = 0
            background[y1:y1 + image_1.shape[0], -rm - image_1.shape[1]:-rm] += image_1
        else:
            background[y1:y1 + image_1.shape[0], -rm - image_1.shape[1]:-rm] = image_1
            background[union] = 0
            background[y0:y0 + image_0.shape[0], lm:lm + image_0.shape[1]] += image_0
        if white:
            background[merged == 0] = 255
        return Image.fromarray(background), merged

    def mask_to_tensor(self, mask):
        side = self.size // 8 if self.flux else 128
        t = torch.tensor(mask, dtype=torch.float32)
        return F.interpolate(t[None, None], size=(side, side), mode="bilinear").squeeze(0)

    def __getitem__(self, index):
        ex = {}
        image, mask, caption, cat = self.items[index % len(self.items)]
        if self.flux and self.random_flip and random.random() < 0.5:
            image, mask = self.flip(image), self.flip(mask)
        do_segmix = random.random() < self.segmix_prob
        if do_segmix:
            other = random.choice([c for c in self.category_list if c != cat])
            d = random.choice(self.by_cat[other])
            other_image, other_mask = d["image"], d["mask"]
            if self.flux and self.random_flip and random.random() < 0.5:
                other_image, other_mask = self.flip(other_image), self.flip(other_mask)
            i0, m0 = self.image_process(image, mask, fixed_scale=self.scale_dict[cat] if self.scale_dict else None)
            i1, m1 = self.image_process(other_image, other_mask,
                                        fixed_scale=self.scale_dict[other] if self.scale_dict else None)
            is_first = random.random() < 0.5
            white = random.random() < 0.75 if self.flux else True
            margin_max = 64 if self.flux else 256
            pair = (i0, m0, i1, m1) if is_first else (i1, m1, i0, m0)
            merged, merged_map = self.image_collage(*pair, white=white, margin_max=margin_max, height_sync=False)
            ex["pixel_values"] = self.image_transforms(merged)
            if self.flux:
                ex["prompt"] = ("a close out photo of a small {} and a small {}, {} simple background, pasted, "
                                "sticker, unnatural, glued, clip-art, attached, collage, low quality.").format(
                    self.id_to_placeholder[cat], self.id_to_placeholder[other], "white" if white else "black")
            else:
                ex["prompt"] = "a photo of a {} and a {}, simple background.".format(
                    self.id_to_placeholder[cat], self.id_to_placeholder[other])
            ex["mask_map"] = self.mask_to_tensor(merged_map) * (1 - self.soft_alpha) + self.soft_alpha
        else:
            ex["pixel_values"] = self.image_transforms(image)
            ex["prompt"] = caption
            ex["mask_map"] = torch.ones(1, self.size // 8, self.size // 8)
        if self.class_root is not None:
            cd = self.prior_by_cat[cat][index % len(self.prior_by_cat[cat])]
            if do_segmix:
                cats = self.prior_category_list
                other = random.choice([c for c in cats if c != cat]) if len(cats) > 1 else cat
                d = random.choice(self.prior_by_cat[other])
                i0, m0 = self.image_process(cd["image"], cd["mask"])
                i1, m1 = self.image_process(d["image"], d["mask"])
                merged, class_map = self.image_collage(i0, m0, i1, m1, white=True, margin_max=256, height_sync=True)
                ex["class_pixel_values"] = self.image_transforms(merged)
                ex["class_mask_map"] = self.mask_to_tensor(class_map) * (1 - self.soft_alpha) + self.soft_alpha
                ex["class_prompt"] = "a photo of a {} and a {}, simple background.".format(
                    self.prior_id_to_placeholder[cat], self.prior_id_to_placeholder[other])
            else:
                ex["class_pixel_values"] = self.image_transforms(cd["image"])
                ex["class_prompt"] = cd["caption"]
                ex["class_mask_map"] = torch.ones(1, self.size // 8, self.size // 8)
        return ex


def _seed(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _next_draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def _compare(ours: MuDIDataset, orig: _Original, trials: int, keys=("pixel_values", "mask_map", "prompt")) -> set:
    seen = set()
    for t in range(trials):
        index = t % len(orig.items)
        _seed(100 + t)
        want = orig[index]
        want_next = _next_draws()
        _seed(100 + t)
        got = ours[index]
        assert _next_draws() == want_next, f"trial {t}: a different number of random draws"
        for k in keys:
            if torch.is_tensor(want[k]):
                assert torch.equal(got[k], want[k]), f"trial {t}: {k} differs"
            else:
                assert got[k] == want[k], f"trial {t}: {k} differs"
        seen.add(got["segmix"])
    return seen


def test_sdxl_items_equal_the_original(make_data):
    """SDXL, 1024 px: Seg-Mix and plain items (with the prior branch) equal the original's, draws included."""
    folder = make_data(ids=("a", "b", "c"), per_id=2)
    reg = make_data(name="reg", ids=("a", "b", "c"), per_id=2, class_names=True, filename=CLASS_METADATA_FILE,
                    size=(112, 96), box=(10, 12, 90, 80))
    ours = MuDIDataset(read_metadata(folder), SegMixOptions(resolution=1024, segmix_prob=0.6, soft_alpha=0.3),
                       read_metadata(reg, CLASS_METADATA_FILE))
    orig = _Original(folder, 1024, 0.6, 0.3, class_root=reg)
    keys = ("pixel_values", "mask_map", "prompt", "class_pixel_values", "class_mask_map", "class_prompt")
    assert _compare(ours, orig, 8, keys) == {True, False}


@pytest.mark.parametrize("relative_scale", [0.5, -0.7])
def test_sdxl_relative_scale_equals_the_original(make_data, relative_scale):
    folder = make_data()
    ours = MuDIDataset(read_metadata(folder), SegMixOptions(resolution=1024, segmix_prob=1.0,
                                                            relative_scale=relative_scale))
    assert _compare(ours, _Original(folder, 1024, 1.0, 1.0, relative_scale=relative_scale), 3) == {True}


def test_flux_items_with_flips_equal_the_original(make_data):
    """FLUX, 512 px, --random_flip: flip draws (and RandomHorizontalFlip's torch draws), the white draw, the
    black / white prompt, margins 32 / 64 and the 64x64 mask map as the original."""
    folder = make_data(ids=("a", "b"), per_id=2)
    ours = MuDIDataset(read_metadata(folder), SegMixOptions(resolution=512, segmix_prob=0.7, soft_alpha=0.0,
                                                            random_flip=True, model="flux"))
    orig = _Original(folder, 512, 0.7, 0.0, flux=True, random_flip=True)
    assert _compare(ours, orig, 10) == {True, False}


def test_dco_is_the_originals_logsigmoid():
    """loss = -LogSigmoid(-1 * beta * (L_model - L_ref)), bit for bit, values and gradients (softplus(beta * diff)
    is the same function but differs in the last bit for ~5% of inputs)."""
    g = torch.Generator().manual_seed(0)
    for beta in (1000.0, 10.0):
        base = (torch.rand(4096, generator=g) * 0.5).requires_grad_()
        ref = base.detach() + torch.randn(4096, generator=g) * (5.0 / beta)
        mine = dco_loss(base * 1.0, ref, beta)
        (g_mine,) = torch.autograd.grad(mine.sum(), base)
        theirs = -1 * torch.nn.LogSigmoid()(-1 * beta * (base * 1.0 - ref))
        (g_theirs,) = torch.autograd.grad(theirs.sum(), base)
        assert torch.equal(mine, theirs) and torch.equal(g_mine, g_theirs), beta


def test_training_latent_dtype_as_the_original():
    """SDXL: latents (and the noise drawn like them) in the mixed-precision dtype unless another VAE is given
    (the README's fp16-fix VAE keeps float32); FLUX: always the mixed-precision dtype."""
    from mudi.train import training_latent_dtype

    assert training_latent_dtype("sdxl", None, torch.float16) == torch.float16
    assert training_latent_dtype("sdxl", "madebyollin/sdxl-vae-fp16-fix", torch.float16) == torch.float32
    assert training_latent_dtype("flux", None, torch.bfloat16) == torch.bfloat16
    assert training_latent_dtype("flux", "x", torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "sigma_sqrt"])
def test_flux_noise_draws_as_the_original(scheme):
    """FLUX: noise = randn_like(latents) first, then u on the CPU generator, t = timesteps[(u T).long()], sigma in
    the latents' dtype, x_t = (1 - s) x + s noise, target = noise - x, SD3 weighting on those sigmas."""
    import argparse

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from mudi.train import MuDIMethod

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    method = MuDIMethod.__new__(MuDIMethod)
    method.family, method.noise_scheduler = "flux", sched
    method.args = argparse.Namespace(weighting_scheme=scheme, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 4, 6, 6).to(dtype)
        torch.manual_seed(7)
        noise = torch.randn_like(x)
        u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=3, logit_mean=0.0,
                                                  logit_std=1.0, mode_scale=1.29)
        t = sched.timesteps[(u * sched.config.num_train_timesteps).long()]
        steps = sched.timesteps
        sigmas = sched.sigmas.to(dtype)[[int((steps == v).nonzero()) for v in t]].reshape(-1, 1, 1, 1)
        want_xt, want_target = (1.0 - sigmas) * x + sigmas * noise, noise - x
        want_w = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas).float()
        torch.manual_seed(7)
        got = method._noise(x)
        assert torch.equal(got["x_t"], want_xt) and torch.equal(got["target"], want_target)
        assert torch.equal(got["t"], t) and torch.equal(got["weight"], want_w.reshape(-1)), (scheme, dtype)


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-flux"])
def test_lora_init_as_the_original(tiny_pipe, preset):
    """Same seed -> the same LoRA as the original's `add_adapter(LoraConfig(r, alpha=r, gaussian, to_k/q/v/out.0))`
    (A ~ N(0, 1/r) in the same module order, B = 0), scale 1."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from common.train.lora import add_lora
    from mudi.train import MUDI_TARGET_MODULES

    pipe = tiny_pipe(preset)
    base = pipe.unet if preset == "tiny-sdxl" else pipe.transformer
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(3)
    theirs.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    torch.manual_seed(3)
    add_lora(ours, 4, target_modules=MUDI_TARGET_MODULES)
    want, got = get_peft_model_state_dict(theirs), get_peft_model_state_dict(ours)
    assert list(want) == list(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert all(not bool(v.any()) for k, v in got.items() if "lora_B" in k)


def test_dnc_crop_as_the_original():
    """Detections are cropped as the original's detect_and_crop + crop_and_pad_image: box rounded to 2 decimals,
    PIL crop (rounding half to even), centred on a white square of the long side."""
    from mudi.dnc import crop_detections

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    boxes = [(11.4951, 3.2, 30.5049, 20.0), (2.5, 2.5, 9.5, 30.49), (0.0, 0.0, 50.0, 40.0)]
    for box, got in zip(boxes, crop_detections(image, boxes)):
        cropped = image.crop(tuple(round(v, 2) for v in box))
        side = max(cropped.size)
        want = Image.new("RGB", (side, side), (255, 255, 255))
        want.paste(cropped, ((side - cropped.width) // 2, (side - cropped.height) // 2))
        assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want)), box


def test_sampling_negative_prompt_is_the_originals():
    """The default negative prompt of sample_mudi.py is the original's (utils/pipe.py, generate_prior.py)."""
    from mudi.prior import NEGATIVE as PRIOR_NEGATIVE
    from mudi.sample import NEGATIVE, build_parser

    original = "anime, cartoon, graphic, text, painting, crayon, graphite, abstract glitch, blurry"
    assert NEGATIVE == PRIOR_NEGATIVE == original
    assert build_parser().parse_args(["--lora", "x", "--prompt", "p"]).negative_prompt == original


def test_periodic_lora_dumps_as_the_original(tmp_path):
    """SDXL: save-N at multiples of --save_steps from --segmix_start_step on; FLUX (flux/train_segmix_lora_flux.py):
    step_N at every multiple, whatever the start step."""
    import argparse

    from mudi.train import MuDIMethod

    method = MuDIMethod.__new__(MuDIMethod)
    method.args = argparse.Namespace(output_dir=str(tmp_path), save_steps=200, segmix_start_step=300)
    method.family = "sdxl"
    assert [method.save_dir(n) for n in (0, 200, 300, 400, 401)] == [None, None, None, tmp_path / "save-400", None]
    method.family = "flux"
    want = [None, tmp_path / "step_200", tmp_path / "step_400", None]
    assert [method.save_dir(n) for n in (0, 200, 400, 401)] == want


def test_epoch_and_indices_with_repeats_and_prior_as_the_original(make_data):
    """--repeats repeats each record in place (r0, r0, r1, r1, ...); with a class set the epoch is max(instance
    items, min(files in the class folder, --num_class_images)) and the class image is index % count of the id."""
    folder = make_data(per_id=2)
    reg = make_data(name="reg", per_id=5, class_names=True, filename=CLASS_METADATA_FILE)
    files = len(list(reg.iterdir()))  # 20 images and masks + class_metadata.jsonl
    meta, class_meta = read_metadata(folder), read_metadata(reg, CLASS_METADATA_FILE)
    for cap, want in ((100, files), (12, 12), (None, files), (3, 8)):
        ds = MuDIDataset(meta, SegMixOptions(resolution=64, segmix_prob=0.0, repeats=2, num_class_images=cap),
                         class_meta)
        assert len(ds) == want
    ds = MuDIDataset(meta, SegMixOptions(resolution=64, segmix_prob=0.0, repeats=2), class_meta)
    records = [r for r in meta.records for _ in range(2)]
    groups = class_meta.by_id()
    for i in range(len(ds)):
        item = ds[i]
        record = records[i % len(records)]
        assert item["prompt"] == record.text
        assert item["class_prompt"] == groups[record.id][i % len(groups[record.id])].text
