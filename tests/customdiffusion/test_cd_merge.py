"""Closed-form merge: constraints, KKT optimality, de-duplication, rank errors, tiny SD/SDXL pipelines."""
from __future__ import annotations

import pytest
import torch

from common.errors import UsageError
from customdiffusion import formats as F
from customdiffusion.merge import MergeSolver, dedupe_rows, main, merge_concepts, merge_weight, token_features


def _problem(seed=0, out=12, d=16, s=40, m=5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    w0, c_reg, c_p, w_n = r(out, d), r(s, d), r(m, d), r(out, d)
    return w0, c_reg, c_p, c_p @ w_n.T


def test_constraints_and_kkt():
    w0, c_reg, c_p, v_p = _problem()
    w = merge_weight(w0, c_reg, c_p, v_p)
    assert (c_p @ w.T - v_p).abs().max() < 1e-4
    # KKT system of min ||C_reg W^T - C_reg W0^T||^2 s.t. C_p W^T = V_p, solved by a generic least-squares solver
    d, m = c_p.shape[1], c_p.shape[0]
    kkt = torch.zeros(d + m, d + m, dtype=torch.float64)
    kkt[:d, :d], kkt[:d, d:], kkt[d:, :d] = 2 * c_reg.T @ c_reg, c_p.T, c_p
    rhs = torch.cat([2 * c_reg.T @ c_reg @ w0.T, v_p])
    sol = torch.linalg.lstsq(kkt, rhs).solution[:d].T
    assert (w - sol).abs().max() < 1e-6


def test_optimality_and_identity():
    w0, c_reg, c_p, v_p = _problem(1)
    w = merge_weight(w0, c_reg, c_p, v_p)
    cost = lambda x: torch.linalg.norm(c_reg @ x.T - c_reg @ w0.T)
    null = torch.eye(c_p.shape[1], dtype=torch.float64) - torch.linalg.pinv(c_p) @ c_p  # projector onto ker C_p
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        delta = torch.randn(w.shape, generator=g, dtype=torch.float64) @ null  # C_p delta^T = 0
        assert (c_p @ delta.T).abs().max() < 1e-9
        for eps in (1e-3, 1e-1, 1.0):
            assert cost(w + eps * delta) >= cost(w) - 1e-9
    assert torch.allclose(merge_weight(w0, c_reg, c_p, c_p @ w0.T), w0, atol=1e-10)


def test_duplicate_rows_removed():
    w0, c_reg, c_p, v_p = _problem(2)
    dup_c = torch.cat([c_p, c_p[1:3], c_p[:1]])
    dup_v = torch.cat([v_p, v_p[1:3], v_p[:1]])
    assert dedupe_rows(dup_c) == list(range(c_p.shape[0]))
    assert torch.equal(merge_weight(w0, c_reg, dup_c, dup_v), merge_weight(w0, c_reg, c_p, v_p))


def test_rank_deficient_errors():
    w0, c_reg, c_p, v_p = _problem(3, s=40)
    low = c_reg[:, :3] @ torch.randn(3, c_reg.shape[1], dtype=torch.float64)  # rank 3 < d
    with pytest.raises(UsageError, match="rank 3 < 16"):
        merge_weight(w0, low, c_p, v_p)
    dependent = torch.cat([c_p, c_p[:1] + c_p[1:2]])
    with pytest.raises(UsageError, match="linearly dependent"):
        MergeSolver(c_reg, dependent)


def _trained_like(pipe):
    """Random final-LayerNorm affine parameters: at init (weight 1, bias 0) every feature row has zero mean, so
    C_reg^T C_reg is singular -- unlike a trained CLIP's features."""
    from common.models.tokens import text_pairs

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, enc in text_pairs(pipe):
            for mod in enc.modules():
                if isinstance(mod, torch.nn.LayerNorm):
                    mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
                    mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g))
    return pipe


def test_degenerate_features_refused(tiny, concept):
    """With LayerNorms at init the features span only d-1 dimensions: a clear error, not garbage."""
    from customdiffusion.merge import DEFAULT_CAPTIONS, read_captions

    base = tiny()
    with torch.no_grad():  # LayerNorms at their init values: every feature row is zero-mean
        for mod in base.text_encoder.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
    with pytest.raises(UsageError, match="rank 31 < 32"):
        merge_concepts(base, [concept(base)], ["cat"], read_captions(DEFAULT_CAPTIONS))


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_merge_on_tiny_pipeline(tiny, concept, name):
    from customdiffusion.merge import DEFAULT_CAPTIONS, read_captions

    base = _trained_like(tiny(name))
    c1, c2 = concept(base, seed=1), concept(base, seed=2, tokens=("<tok_b>",))
    merged = merge_concepts(base, [c1, c2], ["cat", "wooden pot"], read_captions(DEFAULT_CAPTIONS))
    assert list(merged.tokens) == ["<new1>", "<new2>"]
    assert torch.equal(merged.tokens["<new2>"][0], c2.tokens["<tok_b>"][0])
    # `base` now knows both tokens: each concept's target features map as that concept's own weights do
    for n, (c, cat) in enumerate([(c1, "cat"), (c2, "wooden pot")]):
        feats = token_features(base, [f"<new{n + 1}> {cat}", f"photo of a <new{n + 1}> {cat}"])
        for key, w_merged in merged.unet.items():
            want, got = feats @ c.unet[key].T, feats @ w_merged.T
            assert (want - got).abs().max() < 1e-3 * max(1.0, want.abs().max().item()), key


def test_merge_input_errors(tiny, concept, tmp_path):
    base = _trained_like(tiny())
    c1 = concept(base)
    caps = [f"caption number {i} about a red house" for i in range(50)]
    with pytest.raises(UsageError, match="2 models but 1 categories"):
        merge_concepts(base, [c1, c1], ["cat"], caps)
    with pytest.raises(UsageError, match="only single-token"):
        merge_concepts(base, [concept(base, tokens=("<a>", "<b>"))], ["cat"], caps)
    with pytest.raises(UsageError, match="does not match"):
        merge_concepts(tiny(), [c1, concept(tiny("tiny-sdxl"))], ["cat", "dog"], caps)


def test_merge_cli(tiny, concept, tmp_path):
    base = _trained_like(tiny())
    base.save_pretrained(tmp_path / "base")
    F.save(concept(base, seed=1), tmp_path / "a" / "delta.bin")
    F.save(concept(base, seed=2), tmp_path / "b", "diffusers")
    out = main(["--paths", f"{tmp_path / 'a' / 'delta.bin'}+{tmp_path / 'b'}", "--categories", "cat+wooden pot",
                "--ckpt", str(tmp_path / "base"), "--save_path", str(tmp_path / "opt"), "--device", "cpu"])
    assert out == tmp_path / "opt" / "optimized_cat+wooden_pot" / "delta.safetensors"
    assert list(F.load(out).tokens) == ["<new1>", "<new2>"]


def test_merge_cli_bad_inputs_one_line(tiny, concept, tmp_path, cli, snapshot):
    base = _trained_like(tiny())
    base.save_pretrained(tmp_path / "base")
    F.save(concept(base, seed=1), tmp_path / "a" / "delta.bin")
    F.save(concept(base, seed=2), tmp_path / "b", "diffusers")
    a, b = str(tmp_path / "a" / "delta.bin"), str(tmp_path / "b")
    common = ["--ckpt", str(tmp_path / "base"), "--save_path", str(tmp_path / "opt"), "--device", "cpu"]
    main(["--paths", f"{a}+{b}", "--categories", "cat+wooden pot", *common])
    before = snapshot(tmp_path)
    cases = [
        (["--paths", a, "--categories", "cat"], "merging needs at least two"),
        (["--paths", f"{a}+{a}", "--categories", "cat+dog"], "the same concept twice"),
        (["--paths", f"{b}+{tmp_path / 'a' / '..' / 'b'}", "--categories", "cat+dog"], "the same concept twice"),
        (["--paths", f"{a}+{b}", "--categories", "cat+wooden pot"], "already exists"),
        (["--paths", f"{a}+{b}", "--categories", "cat+dog", "--num_inference_steps", "0"], "positive integer"),
    ]
    for extra, needle in cases:
        code, err = cli(main, [*extra, *common])
        assert code == 2 and len(err) == 1 and needle in err[0], (extra, err)
    assert snapshot(tmp_path) == before


def test_regularization_captions_flag_reads_the_original_caption_file(tiny, concept, tmp_path, monkeypatch):
    """`--regularization_captions FILE` (the original's data/regularization_captions.txt) feeds the merge."""
    import customdiffusion.merge as M

    base = _trained_like(tiny())
    base.save_pretrained(tmp_path / "base")
    F.save(concept(base, seed=1), tmp_path / "a.safetensors")
    F.save(concept(base, seed=2), tmp_path / "b.safetensors")
    captions = tmp_path / "regularization_captions.txt"
    captions.write_text("\n".join(f"caption {i} of a small red house by a lake" for i in range(250)) + "\n")
    seen = []
    real = M.merge_concepts
    monkeypatch.setattr(M, "merge_concepts", lambda pipe, c, cats, caps: seen.append(list(caps)) or real(pipe, c, cats, caps))
    main(["--paths", f"{tmp_path / 'a.safetensors'}+{tmp_path / 'b.safetensors'}", "--categories", "cat+dog",
          "--ckpt", str(tmp_path / "base"), "--save_path", str(tmp_path / "opt"), "--device", "cpu",
          "--regularization_captions", str(captions)])
    assert seen == [[f"caption {i} of a small red house by a lake" for i in range(200)]]


def _original_gdupdate_w_exact(K, V, Ktarget1, Vtarget1, W):
    """The original's gdupdateWexact (src/diffusers_composenW.py), transcribed (LU solve per target row)."""
    C = K.T @ K
    lu, piv = torch.linalg.lu_factor(C)
    d = torch.cat([torch.linalg.lu_solve(lu, piv, Ktarget1[i].reshape(-1, 1)) for i in range(Ktarget1.size(0))], 1).T
    e2 = d @ Ktarget1.T
    e1 = Vtarget1.T - W @ Ktarget1.T
    delta = e1 @ torch.linalg.inv(e2)
    return W + delta @ d


def test_merge_weight_matches_the_original_update():
    w0, c_reg, c_p, v_p = _problem(seed=3)
    c_p_dup, v_p_dup = torch.cat([c_p, c_p[:2]]), torch.cat([v_p, v_p[:2]])  # the original drops repeats too
    ours = merge_weight(w0, c_reg, c_p_dup, v_p_dup)
    ref = _original_gdupdate_w_exact(c_reg, (w0 @ c_reg.T).T, c_p, v_p, w0.clone())
    assert torch.allclose(ours, ref, rtol=0, atol=1e-10)


def test_token_features_match_the_original_unpadded_encoding(tiny):
    """The original encodes each prompt unpadded and keeps rows 1: (4: after 'photo of a')."""
    pipe = tiny()
    prompts = ["a red house", "photo of a cat", "", "painting in the style of a dog"]
    ref = []
    with torch.no_grad():
        for text in prompts:
            ids = pipe.tokenizer(text, truncation=True, max_length=pipe.tokenizer.model_max_length,
                                 padding="do_not_pad").input_ids
            feat = pipe.text_encoder(torch.tensor(ids).reshape(1, -1))[0]
            ref.append(feat[:, 4:] if "photo of a" in text[:15] else feat[:, 1:])
    ref = torch.cat([r.reshape(-1, r.shape[-1]) for r in ref]).float()
    got = token_features(pipe, prompts)
    assert got.shape == ref.shape and torch.allclose(got, ref, rtol=0, atol=1e-5)


def test_read_captions_keeps_blank_lines_like_the_original(tmp_path):
    from customdiffusion.merge import read_captions

    path = tmp_path / "caps.txt"
    path.write_text("  a house \n\nlake at dusk\n" + "".join(f"c{i}\n" for i in range(300)))
    with open(path) as f:
        want = [x.strip() for x in f.readlines()][:200]
    assert read_captions(path) == want and want[1] == ""
