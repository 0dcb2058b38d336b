"""SynCD data generation against the original (dataset/src/editor.py, flux_depth_syncd.py, gen_*.py, cal_scores.py):
each test fails on a behaviour we had before the audit. References are hand computations or the original's
procedure re-stated on its own data layout (packed latents, concatenated correspondences + counts)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.attention.plan import plan_attention
from common.pipelines.loop import StepState
from syncd.msa import AttentionStore, category_token_span, msa_gates, msa_plan, otsu_binarize
from syncd.warp import LatentWarpHook, warp_latents

R = 128


# ------------------------------------------------------------------------------------------------ Otsu


def test_otsu_uses_value_means_not_bin_centres():
    # hand computation (n = 6, already min-max normalised), g = w_low * w_high * (mean_low - mean_high)^2:
    # t=.1-.3: {0,.03} | {.38,.54,.94,1}: (2/6)(4/6)(.7)^2 = .10889; t=.4-.5: {0,.03,.38} | {.54,.94,1}: .25 * .69^2
    # = .11903; t=.6: {0,.03,.38,.54} | {.94,1}: (8/36) * .7325^2 = .11924 (best); t>=.7: .94 low -> smaller.
    x = torch.tensor([0.0, 1.0, 0.03, 0.54, 0.94, 0.38])
    assert otsu_binarize(x).tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]  # bin-centre means chose 0.5 (.54 -> 1)


def test_otsu_keeps_a_value_equal_to_the_threshold():
    # best threshold 0.5 (found by the original's loop); the original writes z < thr -> 0 and z > thr -> 1 only,
    # so the token at exactly 0.5 keeps 0.5 (it still counts as foreground after the > 0 dilation)
    x = torch.tensor([0.0, 0.05, 0.05, 0.2, 0.2, 0.45, 0.5, 0.55, 0.7, 0.9, 0.9, 1.0, 1.0])
    z = x.tolist()
    best, thr = 0.0, 0.0
    for t in range(10):
        lo, hi = [v for v in z if v < t / 10], [v for v in z if v >= t / 10]
        if lo and hi:
            g = len(lo) / len(z) * len(hi) / len(z) * (sum(lo) / len(lo) - sum(hi) / len(hi)) ** 2
            if g > best:
                best, thr = g, t / 10
    assert thr == 0.5
    assert otsu_binarize(x).tolist() == [0.0] * 6 + [0.5] + [1.0] * 6


def test_store_saves_the_undilated_estimate_and_masks_dilate_it():
    store = AttentionStore([(0, 1)], (5, 5), dilate=1)
    store.step_sum = torch.zeros(1, 25)
    store.step_sum[0, 12] = 1.0  # one hot token at the centre
    est = store.estimate()
    assert est.shape == (1, 5, 5) and est.sum() == 1 and est[0, 2, 2] == 1  # what --save_attn_mask writes
    m = store.masks()[0]
    assert m[1:4, 1:4].all() and int(m.sum()) == 9  # the 3x3 box of the MSA mask


# ------------------------------------------------------------------------------------------------ affinity


def test_affinity_is_text_queries_against_image_keys_softmax_over_text():
    # T = 2 text tokens, P = 2 image tokens, d = 1, one head: sim[t, p] = q_t k_p (scale 1), softmax over t per p
    tq = torch.tensor([1.0, -1.0]).view(1, 1, 2, 1)
    ik = torch.tensor([2.0, 0.5]).view(1, 1, 2, 1)
    store = AttentionStore([(0, 1)], (1, 2), dilate=0)
    store.record(tq, ik)
    p0 = math.exp(2) / (math.exp(2) + math.exp(-2))  # image token 0: text logits (2, -2)
    p1 = math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5))  # image token 1: text logits (0.5, -0.5)
    torch.testing.assert_close(store.acc, torch.tensor([[p0, p1]]), atol=1e-6, rtol=0)


def test_step_closes_in_the_last_layers_record():
    # the original's editor ends the step inside the last layer's call, before that layer's attention: its mask
    # already holds this step's affinities
    seen = []
    store = AttentionStore([(0, 1)], (1, 2), dilate=0, layers_per_step=2, on_step=lambda st: seen.append(st.masks()))
    tq, ik = torch.tensor([1.0, -1.0]).view(1, 1, 2, 1), torch.tensor([2.0, 0.5]).view(1, 1, 2, 1)
    store.record(tq, ik)
    assert seen == [] and store.step_sum is None
    store.record(tq, -ik)
    assert len(seen) == 1 and store.acc is None and store.layers == 0
    p0, p1 = (math.exp(2) / (math.exp(2) + math.exp(-2)), math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5)))
    torch.testing.assert_close(store.step_sum, torch.tensor([[(p0 + 1 - p0) / 2, (p1 + 1 - p1) / 2]]))
    store.end_step()  # the hook's end-of-step call is then a no-op
    assert store.step_sum.shape == (1, 2) and len(seen) == 1


def test_recording_processor_hands_text_queries_and_image_keys():
    from diffusers.models.embeddings import apply_rotary_emb

    from common.models.tiny import build_tiny
    from common.train.conditioning import flux_latent_image_ids, flux_text_ids
    from syncd.msa import RecordingFluxProcessor

    tr = build_tiny("tiny-flux").transformer
    attn = tr.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(0)
    T, P = 3, 4
    hs = torch.randn(2, P, attn.to_q.in_features, generator=g)
    enc = torch.randn(2, T, attn.add_q_proj.in_features, generator=g)
    rot = tr.pos_embed(torch.cat([flux_text_ids(T), flux_latent_image_ids((4, 4))]))

    class Capture:
        def record(self, a, b):
            self.args = (a, b)

    cap = Capture()
    with torch.no_grad():
        RecordingFluxProcessor._record(attn, hs, enc, rot, None, cap)
        heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(enc))), attn.norm_q(heads(attn.to_q(hs)))], 1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(enc))), attn.norm_k(heads(attn.to_k(hs)))], 1)
        q, k = apply_rotary_emb(q, rot, sequence_dim=1), apply_rotary_emb(k, rot, sequence_dim=1)
    torch.testing.assert_close(cap.args[0], q[:, :T].transpose(1, 2))  # text queries
    torch.testing.assert_close(cap.args[1], k[:, T:].transpose(1, 2))  # own image keys


def test_category_span_takes_the_last_match():
    from common.models.tiny import build_tiny

    tok = build_tiny("tiny-flux").tokenizer_2
    prompt = "a cat next to another cat"
    ids, sub = tok(prompt).input_ids, tok("cat", add_special_tokens=False).input_ids
    hits = [s for s in range(len(ids)) if ids[s:s + len(sub)] == sub]
    assert len(hits) == 2
    assert category_token_span(tok, prompt, "cat") == (hits[-1], hits[-1] + len(sub))  # get_token_indices


# ------------------------------------------------------------------------------------------------ gate


def test_first_step_is_unmasked_for_text_queries_too():
    N, T, P, heads, d = 3, 4, 6, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(N, heads, T + P, d, generator=g) for _ in range(3))
    fg = torch.rand(N, P, generator=g) > 0.5
    plan = msa_plan(fg, N, text_len=T)
    keys = lambda t, n: torch.cat([t[n], *[t[(n - i) % N][:, T:] for i in range(1, N)]], 1)
    full = torch.stack([F.scaled_dot_product_attention(q[n], keys(k, n), keys(v, n)) for n in range(N)])
    gates = msa_gates(plan)
    for gate in gates:
        gate.on_input(StepState(i=0, t=torch.tensor(1000.0), num_steps=2, x_t=q))
    # the original's attn_mask=None at t = 1: every query (text rows too) sees every key
    torch.testing.assert_close(plan_attention(plan, q, k, v, text_len=T, layer="x"), full, atol=1e-5, rtol=0)
    for gate in gates:
        gate.on_input(StepState(i=1, t=torch.tensor(990.0), num_steps=2, x_t=q))
    own = torch.stack([F.scaled_dot_product_attention(q[n][:, :T], k[n], v[n]) for n in range(N)])
    torch.testing.assert_close(plan_attention(plan, q, k, v, text_len=T, layer="x")[:, :, :T], own, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ warping


def _original_warp(packed, correspondence, counter_cc, t):
    """The original's warpcorrespondence (num_heads=1, numref=3) on its layout: packed latents [3, L, C],
    correspondence rows of pairs (0,1), (0,2), (1,2) concatenated, counter_cc their counts."""
    res = int(math.sqrt(packed.shape[1]))
    feats = F.interpolate(packed.transpose(1, 2).reshape(3, -1, res, res), (R, R))
    mask = torch.zeros(3, 1, R, R)
    copy = torch.zeros_like(feats)
    kernel = torch.ones(1, 1, 3, 3) / 9

    def sample(src, rows):
        vals = F.grid_sample(src[None], -rows[:, [3, 2]][None, :, None], align_corners=False, mode="bicubic")
        return vals[0, :, :, 0], (R * (0.5 - rows * 0.5)).floor().long()

    start, seg = int(counter_cc[0]), 1
    for j in range(2):
        vals, dst = sample(feats[-1], correspondence[start:start + int(counter_cc[seg])])
        copy[j, :, dst[:, 0], dst[:, 1]] = vals
        mask[j, :, dst[:, 0], dst[:, 1]] = 1.0
        start += int(counter_cc[seg])
        seg += 1
    if t < 0.9:
        mask = (F.conv2d(mask, kernel, padding="same").clamp(0, 1) >= 0.9).float()
    feats = mask * copy + (1 - mask) * feats
    second = torch.zeros(3, 1, R, R)
    vals, dst = sample(feats[1], correspondence[:int(counter_cc[0])])
    copy[0, :, dst[:, 0], dst[:, 1]] = vals
    second[0, :, dst[:, 0], dst[:, 1]] = 1.0 - mask[0, :, dst[:, 0], dst[:, 1]]
    if t < 0.9:
        second = (F.conv2d(second, kernel, padding="same").clamp(0, 1) >= 0.9).float()
    feats[0] = second[0] * copy[0] + (1 - second[0]) * feats[0]
    return F.interpolate(feats, (res, res), mode="nearest").flatten(2).transpose(1, 2)


def _rows(g, lo, hi):
    """Rows for every pixel centre of the block [lo, hi)^2 (shuffled; blocks overlap, so masks are partly
    covered), sources anywhere (PyTorch3D NDC)."""
    i, j = torch.meshgrid(torch.arange(lo, hi), torch.arange(lo, hi), indexing="ij")
    dst = torch.stack([i.flatten(), j.flatten()], -1)[torch.randperm((hi - lo) ** 2, generator=g)]
    ndc = 1 - (2 * dst + 1) / R
    return torch.cat([ndc, torch.rand(dst.shape[0], 2, generator=g) * 1.8 - 0.9], 1).float()


@pytest.mark.parametrize("t", [0.95, 0.85])
def test_warp_matches_the_original_procedure(t):
    g = torch.Generator().manual_seed(0)
    packed = torch.randn(3, 16 * 16, 4, generator=g)
    corr = {(0, 1): _rows(g, 10, 90), (0, 2): _rows(g, 40, 110), (1, 2): _rows(g, 20, 100)}
    cat = torch.cat([corr[(0, 1)], corr[(0, 2)], corr[(1, 2)]])
    counts = torch.tensor([len(corr[(0, 1)]), len(corr[(0, 2)]), len(corr[(1, 2)])])
    ref = _original_warp(packed, cat, counts, t)

    hook = LatentWarpHook(corr, (16, 16), thresh=0.8)
    state = StepState(i=0, t=torch.tensor(t * 1000), num_steps=2, x_t=packed.clone())
    hook.on_input(state)
    torch.testing.assert_close(state.x_t, ref, atol=1e-5, rtol=0)
    for n in (0, 1):  # the warp did act on both images, image 0 also outside the anchor's block (pair (0, 1))
        assert (ref[n] - packed[n]).abs().max() > 0.1
    assert (ref[2] == packed[2]).all()


def test_erosion_pads_with_zeros_so_the_border_goes():
    # identity correspondences everywhere, anchor = 1, others = 0: at t < 0.9 the eroded mask (3x3 mean of the
    # zero-padded mask >= 0.9) loses the one-pixel border ring of the 128 grid, which nearest-downsampling to 32
    # reads at rows / cols 0 (pixel 4 i); at t >= 0.9 no erosion
    k = (2 * torch.arange(R) + 1) / R - 1
    y, x = torch.meshgrid(k, k, indexing="ij")
    ident = torch.stack([-y.flatten(), -x.flatten(), -y.flatten(), -x.flatten()], -1)
    lat = torch.zeros(3, 1, 32, 32)
    lat[2] = 1.0
    corr = {(0, 2): ident, (1, 2): ident, (0, 1): ident}
    out = warp_latents(lat, corr, t=0.85)
    expect = torch.ones(32, 32)
    expect[0, :] = 0.0
    expect[:, 0] = 0.0
    torch.testing.assert_close(out[1, 0], expect, atol=1e-5, rtol=0)
    torch.testing.assert_close(warp_latents(lat, corr, t=0.95)[1, 0], torch.ones(32, 32), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ scores


def test_crop_by_mask_square_box_as_the_original():
    from syncd.scores import crop_by_mask

    img = Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10))
    m = np.zeros((10, 10), np.uint8)
    m[2:4, 1:7] = 255  # tight box x [1, 7), y [2, 4): centre (4, 3), half-extents (3, 1) -> square [1, 0, 7, 6)
    out = crop_by_mask(img, Image.fromarray(m))
    assert np.array_equal(np.asarray(out), np.arange(100).reshape(10, 10)[0:6, 1:7])
    m = np.zeros((10, 10), np.uint8)
    m[8:10, 7:10] = 255  # box x [7, 10), y [8, 10): centre (8.5 -> 8 half to even, 9), s = round(1.5) = 2
    out = np.asarray(crop_by_mask(img, Image.fromarray(m)))  # square x [6, 10), y [7, 11): one row below the image
    expect = np.zeros((4, 4), np.uint8)
    expect[:3] = np.arange(100).reshape(10, 10)[7:10, 6:10]  # black padding outside (PIL / torchvision crop)
    assert np.array_equal(out, expect)
    m = np.full((10, 10), 255, np.uint8)
    m[4:6, 3:7] = 0  # box = the whole image -> the original crops the inverted mask's box: [3, 3, 7, 7)
    assert np.array_equal(np.asarray(crop_by_mask(img, Image.fromarray(m))), np.arange(100).reshape(10, 10)[3:7, 3:7])


# ------------------------------------------------------------------------------------------------ defaults, metadata


def test_generation_defaults_are_the_originals():
    from syncd.generate import JPEG_QUALITY, build_parser

    a = build_parser().parse_args(["--outdir", "o"])
    assert a.true_cfg_scale == 2.5  # FluxControlCustomPipeline guidance_scale_real
    assert a.repeat_each_id == 2  # ObjaverseDataset repeat_each_id
    assert a.warp_thresh == 0.8 and a.seed == 42
    assert a.dinov2_model == "facebook/dinov2-with-registers-large"  # dinov2_vitl14_reg
    assert JPEG_QUALITY == 75  # PIL's default quality of the original's .jpg saves


def test_deformable_metadata_prompts_are_the_background_captions():
    import random
    from argparse import Namespace

    from syncd.generate import deformable_prompts

    args = Namespace(prompts=None, num=3, num_tuples=1)
    (t,) = deformable_prompts(args, random.Random(0))
    assert len(t["captions"]) == 3
    for cap, full in zip(t["captions"], t["prompts"]):
        assert full.startswith(cap.rstrip(".") + ". ") and full.endswith(". wide angle shot")


def test_metadata_prompts_are_captions_without_the_generation_text(tmp_path):
    """gen_deformable.py stores the background prompts, gen_rigid.py the cleaned captions (batch['prompts'])."""
    import json

    from syncd.generate import main as gen

    bgs = ["a cat in a garden", "a cat on a sofa", "a cat on a beach"]
    (tmp_path / "d.json").write_text(json.dumps([{"category": "cat", "background": bgs, "description": "a tabby"}]))
    caps = ["A Rustic torus on sand.", "a torus", "a torus on grass", "x", "y", "z"]
    (tmp_path / "r.json").write_text(json.dumps({"torus": caps}))
    common = ["--model", "tiny-flux", "--height", "64", "--inference_steps", "2", "--no-progress"]
    gen([*common, "--outdir", str(tmp_path / "d"), "--prompts", str(tmp_path / "d.json")])
    (d,) = json.loads((tmp_path / "d" / "metadata_0.json").read_text())
    assert sorted(d["prompts"]) == sorted(bgs) and d["objaverse_id"] == ""
    torus = str(Path(__file__).resolve().parents[2] / "assets" / "render" / "torus.obj")
    gen([*common, "--mode", "rigid", "--mesh_dir", torus, "--num_tuples", "1", "--outdir", str(tmp_path / "r"),
         "--prompts", str(tmp_path / "r.json")])
    (r,) = json.loads((tmp_path / "r" / "metadata_0.json").read_text())
    assert r["prompts"] == ["a torus on sand.", "a torus", "a torus on grass"]


def test_uint8_conversion_rounds_deformable_and_truncates_rigid():
    from syncd.generate import to_pil

    # (x / 2 + 0.5) * 255 = 127.9: postprocess rounds to 128, gen_rigid's astype(uint8) gives 127
    x = torch.full((1, 3, 1, 1), 2 * (127.9 / 255) - 1)
    assert np.asarray(to_pil(x)[0])[0, 0].tolist() == [128] * 3
    assert np.asarray(to_pil(x, truncate=True)[0])[0, 0].tolist() == [127] * 3


# ------------------------------------------------------------------------------------------------ LLM prompts


def test_llm_requests_keep_the_originals_whitespace():
    from syncd.llm_prompts import BG_DEFORMABLE, BG_RIGID, DESC_DEFORMABLE

    bg = BG_DEFORMABLE.format(n=25, cat="Fox")
    assert "Follow these guidance for the captions:\n" + " " * 28 + "1. generate captions of Fox" in bg
    assert "\n\n" + " " * 28 + "Example captions" in bg and bg.endswith("watercolor style. ")
    desc = DESC_DEFORMABLE.format(n=25, cat="Fox")
    assert "speculation.\n\n" + " " * 28 + "Example" in desc and desc.endswith("black spots. ")
    rigid = BG_RIGID.format(n=10, cat="a mug")
    assert "\n" + " " * 32 + "2. Generate captions of a mug with another object" in rigid
    assert rigid.endswith("palm trees in the background.\n" + " " * 32)


def test_llm_defaults_and_rigid_caption_rows():
    from syncd.generate import build_parser, mesh_captions

    a = build_parser().parse_args(["--outdir", "o"])
    assert a.category[:3] == ["Hamster", "Rabbit", "Fox"] and len(a.category) == 16  # assets/categories.txt
    meshes = [Path("m/red_mug.obj"), Path("m/chair.glb")]
    csv = {"red_mug": "a red mug", "lamp": "a lamp", "other": "x"}
    assert mesh_captions(csv, meshes) == {"red_mug": "a red mug"}  # only the meshes at hand are asked about
    assert mesh_captions(None, meshes) == {"red_mug": "red mug", "chair": "chair"}


# ------------------------------------------------------------------------------------------------ the original code
# Runs the original's own functions (nupurkmr9/syncd @757965c, read from a checkout named by SYNCD_ORIG, default
# /work/orig/syncd; skipped without it or without einops) on the same inputs as ours.

def _orig_root():
    """(checkout root, einops.rearrange) or skip. einops is the original's dependency, not ours."""
    import os

    root = Path(os.environ.get("SYNCD_ORIG", "/work/orig/syncd"))
    if not (root / "dataset" / "src" / "editor.py").is_file():
        pytest.skip("the original SynCD checkout is not available (set SYNCD_ORIG)")
    return root, pytest.importorskip("einops").rearrange


def _load(path: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _orig_function(path: Path, name: str, namespace: dict):
    """One top-level function of a module whose imports we cannot satisfy, compiled from its source."""
    import ast

    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def test_against_the_original_code_on_tiny_flux():
    from common.attention.plan import install_plan
    from common.models.tiny import build_tiny
    from common.train.conditioning import flux_latent_image_ids
    from syncd.msa import install_recording, stacked_key_rotary

    root, rearrange = _orig_root()
    E = _load(root / "dataset" / "src" / "editor.py", "syncd_orig_editor")
    tr = build_tiny("tiny-flux").transformer.float().eval()
    E.pos_embed = tr.pos_embed  # the original's FluxPosEmbed(16, 56, 56) is the real FLUX's; tiny has its own axes
    heads = tr.config.num_attention_heads
    for m in tr.modules():
        if m.__class__.__name__ == "FluxAttention":
            m.scale = m.head_dim ** -0.5  # older diffusers' Attention.scale, read by the original
    N, T, G = 3, 512, 16  # T = 512 is hard-coded there; N P >= T + P as its slicing assumes
    P = G * G
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, P, tr.config.in_channels, generator=g)
    enc = torch.randn(N, T, tr.config.joint_attention_dim, generator=g)
    pooled = torch.randn(N, tr.config.pooled_projection_dim, generator=g)
    txt_ids, img_ids = torch.zeros(T, 3), flux_latent_image_ids((2 * G, 2 * G))
    orig_kw = {"txt_ids": txt_ids, "img_ids_concat": flux_latent_image_ids((N * 2 * G, 2 * G))}
    default = dict(tr.attn_processors)

    def run(t, **jak):
        with torch.no_grad():
            return tr(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                      timestep=torch.full((N,), t), guidance=torch.full((N,), 3.5), txt_ids=txt_ids, img_ids=img_ids,
                      joint_attention_kwargs=jak, return_dict=False)[0]

    def original(t, **kw):
        tr.set_attn_processor({n: E.SharedAttnProc(p, selfattn=True, single_transformer=n.startswith("single"), NUM=N)
                               for n, p in default.items()})
        try:
            return run(t, timestep=torch.full((N,), t), **orig_kw, **kw)
        finally:
            tr.set_attn_processor(dict(default))

    def gated(plan, t):
        for gate in msa_gates(plan):
            gate.on_input(StepState(i=0, t=torch.tensor(t * 1000), num_steps=3, x_t=x))
        return plan

    # rigid: gen_rigid.py's additive mask from known masks (already dilated here)
    fg = torch.rand(N, G, G, generator=g) > 0.6
    m = rearrange(fg.float()[:, None], "(b n) c h w -> b 1 n c h w", n=N)
    m = torch.cat([m] + [torch.roll(m, shifts=i, dims=2) for i in range(1, N)], 1)
    m = rearrange(m, "b n1 n c h w-> (b n) (n1 h w) c")
    m = torch.cat([torch.ones_like(m[:, :T, :]), m], 1)
    m = torch.einsum("b i d, b j d -> b i j", torch.ones_like(m[:, :T + P]), m)
    m[:, :T + P, :T + P] = 1
    m[:, :T, T + P:] = 0
    mask = rearrange(m.masked_fill(m == 0, -65504.0).unsqueeze(0).expand(heads, -1, -1, -1), "nh b ... -> b nh ...")
    rot = stacked_key_rotary(tr, T, (2 * G, 2 * G), N)
    for t in (1.0, 0.9):
        ref = original(t, attention_mask=mask)
        with install_plan(tr):
            ours = run(t, plan=gated(msa_plan(fg, N, text_len=T, key_rotary=rot), t))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)

    # deformable: the original's AttentionStore (24 heads hard-coded -> the tiny model's) over three steps
    class Editor(E.AttentionStore):
        def after_step(self):
            super().after_step()
            self.attention_mask = self.attention_mask[:, :heads]

    spans = [(3, 5), (2, 3), (7, 9)]
    ed = Editor(token_indices=[list(s) for s in spans], num_att_layers=len(default), WIDTH=16 * G)
    plan = msa_plan(None, N, text_len=T, key_rotary=rot)
    store = AttentionStore(spans, (G, G), dilate=1, layers_per_step=len(default),
                           on_step=lambda st: setattr(plan, "token_masks", st.masks()))
    for t in (1.0, 0.9, 0.8):
        ref = original(t, editor=ed)
        handle = install_recording(tr)
        try:
            ours = run(t, plan=gated(plan, t), attn_store=store)
        finally:
            handle.restore()
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        assert torch.equal(store.estimate(), ed.attention_maps.reshape(N, G, G).float())

    # Otsu on random maps
    maps = torch.rand(4, 64, generator=g) ** 3
    torch.testing.assert_close(torch.stack([otsu_binarize(r) for r in maps]), E.otsu(maps.clone()), atol=0, rtol=0)


def test_against_the_original_warp_and_crop():
    root, rearrange = _orig_root()
    warp = _orig_function(root / "dataset" / "src" / "flux_depth_syncd.py", "warpcorrespondence",
                          {"torch": torch, "math": math, "rearrange": rearrange})
    g = torch.Generator().manual_seed(1)
    packed = torch.randn(3, 32 * 32, 8, generator=g)
    corr = {(0, 1): _rows(g, 5, 80), (0, 2): _rows(g, 30, 120), (1, 2): _rows(g, 10, 100)}
    keys = [(0, 1), (0, 2), (1, 2)]  # itertools.combinations order, the original's concatenation
    cat = torch.cat([corr[k] for k in keys])
    counts = torch.tensor([len(corr[k]) for k in keys])
    for t in (0.95, 0.85):
        ref = warp(cat, counts, packed.clone(), 1, torch.tensor(t), numref=3)
        hook = LatentWarpHook(corr, (32, 32), thresh=0.8)
        state = StepState(i=0, t=torch.tensor(t * 1000), num_steps=2, x_t=packed.clone())
        hook.on_input(state)
        torch.testing.assert_close(state.x_t, ref, atol=1e-5, rtol=0)

    from syncd.scores import crop_by_mask

    U = _load(root / "method" / "data" / "utils_.py", "syncd_orig_utils")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    rng = np.random.default_rng(1)
    for _ in range(20):
        m = np.zeros((40, 40), np.uint8)
        y0, x0 = rng.integers(0, 38, 2)
        m[y0:y0 + rng.integers(2, 30), x0:x0 + rng.integers(2, 30)] = 255
        ref, _ = U.crop_by_mask(img, Image.fromarray(m))
        assert np.array_equal(np.asarray(crop_by_mask(img, Image.fromarray(m))), np.asarray(ref))
