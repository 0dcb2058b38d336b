"""Metrics against direct computations on tiny random backbones built in code."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.eval import tiny
from common.eval.aesthetic import AestheticMLP, aesthetic_from_features, load_aesthetic_head
from common.eval.cache import FeatureCache
from common.eval.clip import clip_i, clip_score, clip_t
from common.eval.extractor import CLIP_224, DINO_256_224, IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor
from common.eval.kid import CLEANFID_PREPROCESS, kid, mmd2_unbiased
from common.io import save_weights
from eval_fixtures import random_image


@pytest.fixture(scope="module")
def clip_model():
    return tiny.tiny_clip()


@pytest.fixture
def images(tmp_path):
    return [random_image(tmp_path / f"{i}.png", i, size=(80 + 10 * i, 60)) for i in range(5)]


def test_clipscore_scale_and_clipping():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    txt = torch.tensor([[-1.0, 0.2], [3.0, 0.0], [1.0, 0.0]])  # cos < 0, cos = 1, cos = 1/sqrt(2)
    got = clip_score(img, txt)
    assert got[0] == 0.0  # negative cosine clipped, not negated
    assert got[1] == pytest.approx(2.5)
    assert got[2] == pytest.approx(2.5 / np.sqrt(2))


def test_clip_t_matches_direct_computation(clip_model, images):
    prompts = ["a cat", "a dog on the beach", "a red chair", "a teapot", "x"]
    got = clip_t(clip_model, images, prompts)
    model = clip_model.module
    import open_clip

    with torch.no_grad():
        pix = torch.stack([CLIP_224(Image.open(p).convert("RGB")) for p in images])
        i = F.normalize(model.encode_image(pix).double(), dim=-1)
        t = F.normalize(model.encode_text(open_clip.get_tokenizer("ViT-B-32")(prompts)).double(), dim=-1)
    cos = (i * t).sum(-1)
    torch.testing.assert_close(got["cosine"], cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["clipscore"], 2.5 * cos.clamp(min=0), atol=1e-5, rtol=0)
    # batching does not change the result
    clip_model.batch_size = 2
    torch.testing.assert_close(clip_t(clip_model, images, prompts)["cosine"], cos, atol=1e-5, rtol=0)
    clip_model.batch_size = 32


def test_clip_i_is_the_mean_of_the_full_cosine_matrix():
    g, r = torch.randn(7, 12), torch.randn(4, 12)
    gn, rn = g.numpy().astype(np.float64), r.numpy().astype(np.float64)
    mat = [[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in rn] for a in gn]
    per_image = clip_i(g, r)
    assert per_image.shape == (7,)
    assert float(per_image.mean()) == pytest.approx(float(np.mean(mat)), abs=1e-12)
    np.testing.assert_allclose(per_image.numpy(), np.mean(mat, axis=1), atol=1e-12)


def test_dino_preprocessing_shapes_and_normalisation():
    flat = Image.new("RGB", (500, 300), (255, 128, 0))
    x = DINO_256_224(flat)
    assert x.shape == (3, 224, 224)
    expect = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x.mean((1, 2)), expect.float(), atol=1e-4, rtol=0)
    # the shorter side goes to 256 before the centre crop: a 224-wide strip survives from a 256 x 427 image
    stripes = Image.new("RGB", (600, 300), (0, 0, 0))
    stripes.paste((255, 255, 255), (0, 0, 100, 300))  # left sixth white -> cropped away
    assert DINO_256_224(stripes)[0].max() < (0.1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert CLEANFID_PREPROCESS(flat).shape == (3, 299, 299)
    assert CLEANFID_PREPROCESS(flat)[0].max() == pytest.approx(255.0)
    ext = tiny.tiny_vit()
    assert ext.encode_images([flat, stripes]).shape == (2, 32)


def _np_mmd(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_unbiased_formula_matches_float64_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 6)), rng.normal(0.3, 1.2, size=(9, 6))
    assert mmd2_unbiased(torch.from_numpy(x).float(), torch.from_numpy(y).float()) == pytest.approx(
        _np_mmd(x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)), rel=1e-9)


def test_kid_self_near_zero_shifted_positive():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g)
    b = torch.randn(200, 16, generator=g)
    same = kid(a, b, num_subsets=20, max_subset_size=100, seed=1)
    shifted = kid(a, b + 1.0, num_subsets=20, max_subset_size=100, seed=1)
    itself = kid(a, a, num_subsets=20, max_subset_size=100, seed=1)
    slight = kid(a, b + 0.3, num_subsets=20, max_subset_size=100, seed=1)
    # against itself: ~0 on the scale of a real shift (slightly negative: subsets of one set share points)
    assert abs(same.mean) < 0.02 * shifted.mean and abs(itself.mean) < 0.02 * shifted.mean
    assert shifted.mean > slight.mean > 10 * abs(same.mean)  # grows with the shift
    assert len(shifted.subsets) == 20 and shifted.std > 0 and shifted.subset_size == 100
    assert shifted.std == pytest.approx(float(np.std(shifted.subsets)))
    assert kid(a, b + 1.0, num_subsets=20, max_subset_size=100, seed=1) == shifted  # seeded


def test_cache_hit_does_not_call_the_backbone(tmp_path, images):
    base = tiny.tiny_vit()
    calls = []

    def counting(x):
        calls.append(x.shape[0])
        return base.image_fn(x)

    ext = FeatureExtractor(base.name, base.preprocess, counting)
    cache = FeatureCache(tmp_path / "cache")
    first = cache.encode(ext, images)
    assert sum(calls) == 5 and cache.misses == 5
    again = FeatureCache(tmp_path / "cache").encode(ext, list(reversed(images)))
    assert sum(calls) == 5  # nothing recomputed
    torch.testing.assert_close(again, first.flip(0))
    torch.testing.assert_close(first, base.encode_images(images))
    # another preprocessing is another key; an edited file is another hash
    other = FeatureExtractor(base.name, CLIP_224, counting)
    cache.encode(other, images[:1])
    assert sum(calls) == 6
    random_image(images[0], 999)
    cache.encode(ext, images[:2])
    assert sum(calls) == 7


def test_aesthetic_head_and_loading(tmp_path):
    head = tiny.tiny_aesthetic(16)
    feats = torch.randn(4, 16)
    got = aesthetic_from_features(head, feats)
    with torch.no_grad():
        expect = head(F.normalize(feats, dim=-1))
    torch.testing.assert_close(got, expect)
    assert sorted(head.state_dict())[:2] == ["layers.0.bias", "layers.0.weight"]  # LAION's key layout
    save_weights(head.state_dict(), tmp_path / "aes.pth")
    loaded = load_aesthetic_head(str(tmp_path / "aes.pth"))
    assert isinstance(loaded, AestheticMLP)
    torch.testing.assert_close(aesthetic_from_features(loaded, feats), got)


def test_cache_keys_tell_local_checkpoints_and_dtypes_apart(tmp_path):
    import copy

    from common.eval.extractor import weights_tag

    a, b, a2 = tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "copy_of_a.pth"
    torch.save({"w": torch.zeros(3)}, a)
    torch.save({"w": torch.ones(3)}, b)
    a2.write_bytes(a.read_bytes())
    assert weights_tag(a) != weights_tag(b) and weights_tag(a) == weights_tag(a2)
    ext = tiny.tiny_clip()
    half = copy.copy(ext)
    half.dtype = torch.float16
    assert ext.key != half.key


def test_cleanfid_resize_is_float_per_channel_without_rounding():
    from common.eval.kid import CLEANFID_PREPROCESS

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8))
    x = CLEANFID_PREPROCESS(img)
    assert x.shape == (3, 299, 299)
    ref = np.asarray(Image.fromarray(np.asarray(img, np.float32)[..., 1], mode="F").resize((299, 299),
                                                                                             Image.BICUBIC))
    assert np.allclose(x[1].numpy(), ref)
    assert not torch.equal(x, x.round())  # no quantisation after the resize
