"""Low-rank compression: the reference's kept rank, its reconstruction error, exactness at full rank, loading."""
from __future__ import annotations

import math

import pytest
import torch

from customdiffusion import formats as F
from customdiffusion.apply import apply_customdiffusion
from customdiffusion.compress import compress, compress_weight, compressed_path, kept_rank


def _low_rank(out=24, inp=16, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(inp, r, generator=g, dtype=torch.float64)).Q
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)[:r]
    w0 = torch.randn(out, inp, generator=g, dtype=torch.float64)
    return w0, w0 + u @ torch.diag(s) @ v.T, s


def test_full_ratio_is_exact():
    w0, w, s = _low_rank()
    uv = compress_weight(w, w0, ratio=1.0)
    assert uv["u"].shape[1] >= len(s)
    assert (w0 + uv["u"] @ uv["v"] - w).abs().max() < 1e-5


def test_ratio_rank_and_error():
    w0, w, s = _low_rank()
    cum = torch.cumsum(s / s.sum(), 0)
    i = int(torch.nonzero(cum > 0.6)[0])  # the crossing index; the reference keeps i directions
    uv = compress_weight(w, w0, ratio=0.6)
    assert uv["u"].shape[1] == i == kept_rank(s, 0.6) == 1
    rel = torch.linalg.norm(w - (w0 + uv["u"] @ uv["v"])) / torch.linalg.norm(w - w0)
    assert math.isclose(rel.item(), math.sqrt((s[i:] ** 2).sum() / (s ** 2).sum()), rel_tol=1e-9)


def test_compressed_load_and_flag(tiny, concept, tmp_path):
    pipe = tiny()
    w = concept(pipe)
    small = compress(w, dict(pipe.unet.named_parameters()), ratio=0.6)
    F.save(small, compressed_path(tmp_path / "delta.safetensors"))
    target = tiny()
    w0 = {k: p.detach().clone() for k, p in target.unet.named_parameters()}
    apply_customdiffusion(target, tmp_path / "compressed_delta.safetensors", compress=True)
    params = dict(target.unet.named_parameters())
    for k, uv in small.unet.items():
        assert torch.allclose(params[k], w0[k] + uv["u"] @ uv["v"], atol=1e-6)
    # a full-weight delta with --compress is copied, never added to W0
    F.save(w, tmp_path / "delta.bin")
    other = tiny()
    with pytest.warns(UserWarning, match="full weights"):
        apply_customdiffusion(other, tmp_path / "delta.bin", compress=True)
    params = dict(other.unet.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in w.unet.items())


def test_compress_cli(tiny, concept, tmp_path):
    from customdiffusion.compress import main

    F.save(concept(tiny()), tmp_path / "delta.bin")
    out = main(["--delta_ckpt", str(tmp_path / "delta.bin"), "--ckpt", "tiny-sd"])
    assert out == tmp_path / "compressed_delta.bin" and F.load(out).compressed


def test_compress_never_replaces_its_input_or_an_existing_output(tiny, concept, tmp_path, cli, snapshot):
    from customdiffusion.compress import main

    F.save(concept(tiny()), tmp_path / "delta.safetensors")
    F.save(concept(tiny(), seed=3), tmp_path / "up", "diffusers")
    main(["--delta_ckpt", str(tmp_path / "delta.safetensors"), "--ckpt", "tiny-sd"])
    before = snapshot(tmp_path)
    base = ["--ckpt", "tiny-sd", "--delta_ckpt"]
    cases = [
        ([str(tmp_path / "delta.safetensors"), "--output", str(tmp_path / "delta.safetensors")], "is the input"),
        ([str(tmp_path / "delta.safetensors"), "--output", str(tmp_path / "." / "delta.safetensors"), "--overwrite"],
         "is the input"),
        ([str(tmp_path / "up"), "--output", str(tmp_path / "up" / "pytorch_custom_diffusion_weights.safetensors"),
          "--overwrite"], "is the input"),
        ([str(tmp_path / "delta.safetensors")], "already exists"),  # the default output of the first run
    ]
    for extra, needle in cases:
        code, err = cli(main, [*base, *extra])
        assert code == 2 and len(err) == 1 and needle in err[0], (extra, err)
    assert snapshot(tmp_path) == before
    out = main([*base, str(tmp_path / "delta.safetensors"), "--overwrite", "--compression_ratio", "1.0"])
    assert out == tmp_path / "compressed_delta.safetensors" and F.load(out).compressed


def test_kept_rank_matches_the_original_loop():
    """src/compress.py: `for i, t in enumerate(s): explain += t / all_; if explain > ratio: break`, keeps i."""
    def original(s, ratio):
        explain, all_ = 0, s.sum()
        for i, t in enumerate(s):
            explain += t / all_
            if explain > ratio:
                break
        return i

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        s = torch.rand(int(torch.randint(1, 40, (), generator=g)), generator=g, dtype=torch.float64) ** 3
        s = s.sort(descending=True).values
        for ratio in (0.2, 0.6, 0.95):
            assert kept_rank(s, ratio) == original(s, ratio)
