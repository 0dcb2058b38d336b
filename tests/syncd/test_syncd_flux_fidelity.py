"""SynCD FLUX against the original code's formulas, re-written here from nupurkmr9/syncd (method/sample_flux.py,
pipelines/flux_pipeline/{pipeline,model}.py, data/{data,utils_}.py) and run on the same tiny models: sampling
(noise first from the per-image generator, references re-clamped before every call, t cast before / 1000,
true CFG / normalised image guidance from step 1, neg_mode mask, whole-canvas tiled decode, truncating uint8),
reference preprocessing, the training loss and the training crops."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import FluxPipeline as FluxPipelineStatic  # its static _pack_latents / ids
from PIL import Image

from common.models.tiny import build_tiny
from syncd.pipeline import NEGATIVE_PROMPT, generate, preprocess_reference

# --------------------------------------------------------------------------------------- the original, re-written


def _square_crop_shortest_side(img):  # data/utils_.py
    width, height = img.size
    max_dim = min(width, height)
    new_top = max(0, 0 - (max_dim - height) // 2)
    new_left = max(0, 0 - (max_dim - width) // 2)
    return img.crop((new_left, new_top, min(width, new_left + max_dim), min(height, new_top + max_dim)))


def _original_reference(img, size, dtype=torch.float32):  # sample_flux.py
    arr = np.array(_square_crop_shortest_side(img.convert("RGB")).resize((size, size)))
    return (2.0 * torch.from_numpy(arr)).permute(2, 0, 1).unsqueeze(0).to(dtype)[0] / 255.0 - 1.0


def _calculate_shift(seq, base_seq=256, max_seq=4096, base_shift=0.5, max_shift=1.16):  # pipeline.py
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return seq * m + base_shift - m * base_seq


def _normalized_guidance_image(neg, pred, image, true_cfg_scale, image_cfg_scale):  # pipeline.py
    diff_img, diff_txt = image - neg, pred - image
    n_txt, n_img = diff_txt.norm(p=2, dim=[-1, -2], keepdim=True), diff_img.norm(p=2, dim=[-1, -2], keepdim=True)
    mn = torch.minimum(n_img, n_txt)
    diff_txt = diff_txt * torch.minimum(torch.ones_like(diff_txt), mn / n_txt)
    diff_img = diff_img * torch.minimum(torch.ones_like(diff_txt), mn / n_img)
    return image + image_cfg_scale * diff_img + true_cfg_scale * diff_txt


def _neg_mode_mask(res, num, text):  # transformer.py's fallback mask (512 text tokens there)
    mask_ = torch.zeros(1, res, num * res, res, num * res)
    for i in range(num):
        mask_[:, :, i * res:(i + 1) * res, :, i * res:(i + 1) * res] = 1
    mask = torch.ones(num * res * res + text, num * res * res + text)
    mask[text:, text:] = mask_.reshape(num * res * res, num * res * res)
    return mask.bool()[None, None]


@torch.no_grad()
def _original_sample(pipe, prompt, refs, steps, guidance_scale, true_cfg_scale, image_cfg_scale, seed):
    """sample_flux.sample + SynCDFluxPipeline.__call__ for one image (the references' posterior sample: the
    original uses the global RNG; here the same generator after the noise, as ours)."""
    tr, vae = pipe.transformer, pipe.vae
    gen = torch.Generator().manual_seed(seed)
    numref, size, vsf = refs.shape[0] + 1, refs.shape[-1], pipe.vae_scale_factor
    C = tr.config.in_channels // 4
    h, w = 2 * (size // (vsf * 2)), 2 * (numref * size // (vsf * 2))
    latents = pipe._pack_latents(torch.randn((1, C, h, w), generator=gen), 1, C, h, w)  # prepare_latents
    ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    lat = vae.encode(refs).latent_dist.sample(gen) * vae.config.scaling_factor
    lat = torch.cat([torch.zeros_like(lat[:1]), lat])
    mlat = torch.zeros_like(lat)
    mlat[:1] = 1.0
    wide = lambda x: torch.cat(list(x), dim=-1)[None]  # "(b n) c h w -> b c h (n w)"
    latents_ref = pipe._pack_latents(wide(lat), 1, C, h, w)
    latents_mask = pipe._pack_latents(wide(mlat), 1, C, h, w)
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=512)
    n_embeds, n_pooled, _ = pipe.encode_prompt(prompt=NEGATIVE_PROMPT, prompt_2=None, max_sequence_length=512)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    cfg = sched.config
    mu = _calculate_shift(latents.shape[1], cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                          cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    guidance = torch.full([1], guidance_scale, dtype=torch.float32).expand(1)
    mask = _neg_mode_mask(h // 2, numref, embeds.shape[1])
    for i, t in enumerate(sched.timesteps):
        timestep = t.expand(1).to(latents.dtype)
        latents = (1 - latents_mask) * latents_ref + latents_mask * latents
        run = lambda e, p, kw=None: tr(hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                                       pooled_projections=p, encoder_hidden_states=e, txt_ids=text_ids, img_ids=ids,
                                       joint_attention_kwargs=kw, return_dict=False)[0]
        pred = run(embeds, pooled)
        if true_cfg_scale > 1 and i >= 1:
            neg = run(n_embeds, n_pooled, {"attention_mask": mask})
            if image_cfg_scale == 0:
                pred = neg + true_cfg_scale * (pred - neg)
            else:
                pred = _normalized_guidance_image(neg, pred, run(n_embeds, n_pooled), true_cfg_scale, image_cfg_scale)
        latents = sched.step(pred, t, latents, return_dict=False)[0]
    latents = pipe._unpack_latents(latents, size, numref * size, vsf)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    vae.enable_tiling()
    try:
        image = vae.decode(latents, return_dict=False)[0]
    finally:
        vae.disable_tiling()
    img = image[..., :size][0]  # "b c h (n w) -> (b n) c h w", [::numref]
    return Image.fromarray(((torch.clip(img.float(), -1.0, 1.0).permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255)
                           .astype(np.uint8))


# ----------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny("tiny-flux")
    p.set_progress_bar_config(disable=True)
    return p


def test_reference_preprocessing_is_sample_flux():
    rng = np.random.default_rng(0)
    for w, h in ((41, 30), (30, 41), (40, 31), (33, 33)):  # odd differences: the crop offset rounds up
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert torch.equal(preprocess_reference(img, 16), _original_reference(img, 16))
        ours, theirs = preprocess_reference(img, 16, torch.bfloat16), _original_reference(img, 16, torch.bfloat16)
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)


@pytest.mark.parametrize("true_cfg_scale,image_cfg_scale", [(1.0, 1.0), (2.0, 0.0), (2.0, 1.5)])
def test_sampling_equals_the_original_loop(pipe, true_cfg_scale, image_cfg_scale):
    """Two references (a 3-image canvas wide enough for the tiled decode), 3 steps; the same pixels."""
    refs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = generate(pipe, "a toy robot", refs, num_inference_steps=3, guidance_scale=3.5, true_cfg_scale=true_cfg_scale,
                    image_guidance_scale=image_cfg_scale, generator=torch.Generator().manual_seed(7), progress=False)[0]
    theirs = _original_sample(pipe, "a toy robot", refs, 3, 3.5, true_cfg_scale, image_cfg_scale, 7)
    diff = np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int))
    assert diff.max() == 0, (diff.max(), (diff == 0).mean())


def test_whole_canvas_decode_differs_from_target_only(pipe):
    """The references reach the target's pixels through the decoder (mid-block attention): decoding the target
    slot alone (our earlier behaviour) is not the original's image."""
    from common.pipelines.latents import decode_latents
    from syncd.pipeline import decode_canvas

    canvas = torch.randn(1, pipe.vae.config.latent_channels, 4, 12, generator=torch.Generator().manual_seed(0))
    whole = decode_canvas(pipe.vae, canvas)[..., :32]
    alone = decode_latents(pipe.vae, canvas[..., :4])
    assert not torch.allclose(whole, alone, atol=1e-3)


def _original_flux_loss(tr, sched, latents_bn, num, u, noise_in, embeds, pooled, dtype):
    """model.py SynCDDiffusion.compute_loss (after the VAE) on images [(b n), C, h, w], Beta draws u [b]."""
    b = latents_bn.shape[0] // num
    latents = torch.cat(list(latents_bn.unflatten(0, (b, num)).unbind(1)), dim=-1)  # "(b n) c h w -> b c h (n w)"
    _, C, H, W = latents.shape
    noise = noise_in.clone()
    noise[:, :, :, W // num:] = latents[:, :, :, W // num:]
    cfg = sched.config
    shift = math.exp(_calculate_shift((noise.shape[-1] * noise.shape[-2]) // 4, cfg.base_image_seq_len,
                                      cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift))
    sigmas = (u * shift) / (1 + (shift - 1) * u)
    timesteps = sigmas * 1000.0
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    per_image = torch.stack(noisy.chunk(num, dim=-1), 1).flatten(0, 1)  # "b c h (n w) -> (b n) c h w"
    packed = FluxPipelineStatic._pack_latents(per_image, b * num, C, H, W // num)
    h1 = int(math.sqrt(packed.shape[1]))
    x = packed.reshape(b, num, h1, h1, -1).permute(0, 2, 1, 3, 4).reshape(b, h1 * num * h1, -1)  # "b (h n w) c"
    ids = FluxPipelineStatic._prepare_latent_image_ids(b, H // 2, W // 2, "cpu", dtype)
    pred = tr(hidden_states=x.to(dtype), timestep=timesteps.to(dtype) / 1000.0, encoder_hidden_states=embeds.to(dtype),
              pooled_projections=pooled.to(dtype), txt_ids=torch.zeros(embeds.shape[1], 3).to(dtype),
              guidance=torch.tensor(1.0).expand(b).to(dtype), img_ids=ids, return_dict=False)[0]
    pred = pred.reshape(b, h1, num, h1, -1).permute(0, 2, 1, 3, 4).reshape(b * num, h1 * h1, -1)  # "(b n) (h w) c"
    pred = pred[::num].reshape(b, h1, h1, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, C, H, W // num)
    target = (noise - latents)[:, :, :H, :W // num]
    return torch.mean(((pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_loss_equals_model_py(pipe, dtype):
    """bf16 separates t cast before / 1000 from the old sigmas.to(bf16); the scheduler's own shift constants
    (max_shift 2.0 here) must be read, not FLUX's defaults."""
    from common.pipelines.conditioning import build_conditioning
    from syncd.train import flux_canvas_loss

    tr = build_tiny("tiny-flux").transformer.to(dtype)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, max_shift=2.0)
    g = torch.Generator().manual_seed(3)
    b, n, c = 2, 3, pipe.vae.config.latent_channels
    lat = torch.randn(b, n, c, 4, 4, generator=g).to(dtype)
    noise = torch.randn(b, c, 4, n * 4, generator=g).to(dtype)
    u = torch.tensor([0.62, 0.91])
    cond = build_conditioning(pipe, ["a toy robot", "a cat"], do_cfg=False, device="cpu", max_sequence_length=16)
    ours, sigmas = flux_canvas_loss(tr, sched, lat, cond, u, noise,
                                    guidance=torch.full((b,), 1.0, dtype=torch.float32))
    theirs = _original_flux_loss(tr, sched, lat.flatten(0, 1), n, u, noise, cond.embeds, cond.pooled, dtype)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    shift = math.exp(_calculate_shift(4 * 12 // 4, 256, 4096, 0.5, 2.0))
    torch.testing.assert_close(sigmas, shift * u / (1 + (shift - 1) * u), rtol=1e-6, atol=0)


def _original_crop(img, mask_l, rng, size):
    """data.py getdata for one image (random_crop=True) with utils_.square_crop_with_mask / _jitter_bbox /
    mask_to_bbox; np.random.randint(a, b) drawn as rng.randrange(a, b) (the same half-open range)."""
    from PIL import ImageOps
    from torchvision import transforms

    mask = ImageOps.grayscale(mask_l).convert("L").point(lambda x: 255 if x > 0 else 0, mode="1")
    mask = Image.fromarray((np.array(mask) * 255).astype(np.uint8))
    m = np.array(mask) / 255 > 0.1
    width, height = img.size
    if not m.any():
        cropped = img
    else:
        rows, cols = np.any(m, axis=1), np.any(m, axis=0)
        rmin, rmax = np.where(rows)[0][[0, -1]]
        cmin, cmax = np.where(cols)[0][[0, -1]]
        bbox = np.array([int(cmin), int(rmin), int(cmax) + 1, int(rmax) + 1])
        ul0 = rng.randrange(0, max(1, bbox[0] - 200))
        ul1 = rng.randrange(0, max(1, bbox[1] - 200))
        lr0 = rng.randrange(min(bbox[2] + 200, width - 1), width)
        lr1 = rng.randrange(min(bbox[3] + 200, height - 1), height)
        box = np.array([ul0, ul1, lr0, lr1])
        center = ((box[:2] + box[2:]) / 2).round().astype(int)
        s = min(lr0 - ul0, lr1 - ul1) // 2
        nb = np.array([center[0] - s, center[1] - s, center[0] + s, center[1] + s], dtype=np.float32)
        cropped = transforms.functional.crop(img, top=int(nb[1]), left=int(nb[0]), height=int(nb[3] - nb[1]),
                                             width=int(nb[2] - nb[0]))
    tf = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.LANCZOS),
                             transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    return tf(cropped)


@pytest.mark.parametrize("shape,box", [((700, 520), (300, 180, 420, 330)), ((520, 700), (40, 250, 480, 300)),
                                       ((90, 60), (20, 10, 50, 40)), ((90, 60), None)])
def test_training_crop_is_the_originals(shape, box):
    """Random square crop around the object (min padding 200 px, corners at random), LANCZOS to the size,
    ToTensor + Normalize; a mask with no foreground keeps the image (resize + centre crop)."""
    from syncd.data import resize_center_crop, square_crop_with_mask, to_model_range

    w, h = shape
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    mask = Image.new("L", (w, h), 0)
    if box is not None:
        mask.paste(200, box)
    for seed in range(4):
        ours_img, _ = square_crop_with_mask(img, mask, random.Random(seed))
        ours = to_model_range(resize_center_crop(ours_img, 32))
        assert torch.equal(ours, _original_crop(img, mask, random.Random(seed), 32)), seed


def test_numref_draws_images_at_random_with_flips_when_short():
    from syncd.data import select_images

    assert select_images(3, None, random.Random(0)) == [(0, False), (1, False), (2, False)]
    firsts = {select_images(4, 3, random.Random(s))[0][0] for s in range(40)}
    assert firsts == {0, 1, 2, 3}  # the target is any image of the tuple, as np.random.choice
    for s in range(20):
        picks = select_images(2, 4, random.Random(s))
        assert sorted(picks) == [(0, False), (0, True), (1, False), (1, True)]  # without replacement


def test_guidance_and_schedule_are_the_originals_bit_for_bit(pipe):
    from syncd.guidance import normalized_guidance
    from syncd.pipeline import flux_scheduler

    g = torch.Generator().manual_seed(0)
    e_u, e_i, e_c = (torch.randn(1, 96, 64, generator=g) for _ in range(3))
    for s_txt, s_img in ((1.5, 1.0), (3.0, 0.5)):
        assert torch.equal(normalized_guidance(e_u, e_i, e_c, s_txt, s_img),
                           _normalized_guidance_image(e_u, e_c, e_i, s_txt, s_img))
    for seq, steps in ((48, 3), (3072, 30)):
        ref = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=_calculate_shift(seq, 256, 4096, 0.5, 1.15))
        assert torch.equal(flux_scheduler(pipe, steps, seq).sigmas, ref.sigmas)


def test_reference_masks_are_lanczos_resized_and_dilated_as_the_original():
    """data.py: mask > 0 -> '1' -> L (0/255) -> Resize(r/8, LANCZOS) + CenterCrop -> ToTensor -> conv with a 5x5
    box of ones, clamp(0, 1); the attention keeps tokens whose value is > 0. Written out here with torchvision."""
    import torchvision.transforms as T

    from syncd.data import latent_mask

    rng = np.random.default_rng(0)
    arr = np.zeros((96, 128), np.uint8)
    arr[30:60, 50:90] = rng.integers(1, 255, (30, 40))  # a jpg-like foreground with values > 0
    mask = Image.fromarray(arr)
    binary = Image.fromarray((np.array(mask.point(lambda x: 255 if x > 0 else 0, mode="1")) * 255).astype(np.uint8))
    expected = T.Compose([T.Resize(8, interpolation=T.InterpolationMode.LANCZOS), T.CenterCrop(8), T.ToTensor()])(binary)[None]
    expected = torch.clamp(torch.nn.functional.conv2d(expected.float(), torch.ones(1, 1, 5, 5), padding="same"), 0, 1)
    got = latent_mask(mask, 8, 5)
    assert torch.equal(got, expected[0, 0] > 0)
    undilated = latent_mask(mask, 8, 1)
    assert got.sum() > undilated.sum()  # the dilation widens what the target may attend to
