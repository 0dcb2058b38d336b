"""Closed-form merge of separately fine-tuned concepts ("Custom Diffusion (Opt)", spec §1.8).

Per cross-attention K/V layer, with text features as rows:
    min_W ||C_reg W^T - C_reg W0^T||_F^2   s.t.   C_p W^T = V_p
where C_reg [s, d] are the token features of generic captions (stay close to the base model there) and
C_p [m, d] / V_p [m, out] the features of each concept's target prompts and what that concept's own weights
map them to. Lagrange gives, with M = C_reg^T C_reg [d, d] and D = C_p M^{-1} [m, d]:
    W = W0 + (V_p - C_p W0^T)^T (D C_p^T)^{-1} D.
Solved in float64; M and D C_p^T are factorised once and shared by every layer. SDXL's features are the
concatenation of both text encoders' (what its UNet attends to), d = 2048.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.cli import ArgumentParser, parse_args, positive_int
from common.errors import UsageError
from common.pipelines.prompts import encode_prompt
from customdiffusion.attention import is_kv
from customdiffusion.formats import FORMATS, CustomDiffusionWeights
from customdiffusion.outputs import refuse_existing, same_path

DEFAULT_CAPTIONS = Path(__file__).resolve().parent.parent / "assets" / "regularization_captions.txt"
NUM_REG_CAPTIONS = 200


# ----------------------------------------------------------------------------------------------- the solve


def dedupe_rows(c: torch.Tensor) -> list[int]:
    """Indices of the first occurrence of every distinct row of c [m, d] (exact equality), in order."""
    keep: list[int] = []
    for i in range(c.shape[0]):
        if not any(torch.equal(c[i], c[j]) for j in keep):
            keep.append(i)
    return keep


def _rank(x: torch.Tensor) -> int:
    """Numerical rank at float32 resolution: text features come from float32 (or lower) models, so singular
    values below s_max * max(shape) * eps_fp32 are noise, and solving through them would amplify it."""
    s = torch.linalg.svdvals(x.double())
    return int((s > s[0] * max(x.shape) * torch.finfo(torch.float32).eps).sum()) if s.numel() else 0


class MergeSolver:
    """Factorises the parts shared by all layers: M = C_reg^T C_reg and A = C_p M^{-1} C_p^T.

    c_reg: [s, d], c_p: [m, d] (duplicate rows already removed). Raises UsageError when M is singular
    (too few regularisation tokens) or C_p is not of full row rank.
    """

    def __init__(self, c_reg: torch.Tensor, c_p: torch.Tensor):
        c_reg, c_p = c_reg.double(), c_p.double()
        d = c_reg.shape[1]
        if c_p.shape[1] != d:
            raise UsageError(f"target features have width {c_p.shape[1]} but regularisation features {d}")
        rank = _rank(c_reg)
        if rank < d:
            raise UsageError(f"regularisation features C_reg [{c_reg.shape[0]}x{d}] have rank {rank} < {d}, so "
                             "C_reg^T C_reg is singular; use more (or longer) regularisation captions")
        if c_p.shape[0] > d or _rank(c_p) < c_p.shape[0]:
            raise UsageError(f"the {c_p.shape[0]} target feature rows are linearly dependent (width {d}); "
                             "merge fewer concepts or use distinct categories")
        m_chol = torch.linalg.cholesky(c_reg.T @ c_reg)
        self.d_mat = torch.cholesky_solve(c_p.T, m_chol).T  # D = C_p M^{-1}: [m, d]
        self.a_lu = torch.linalg.lu_factor(self.d_mat @ c_p.T)  # A = D C_p^T: [m, m]
        self.c_p = c_p

    def __call__(self, w0: torch.Tensor, v_p: torch.Tensor) -> torch.Tensor:
        """w0: [out, d], v_p: [m, out] -> merged W [out, d] (float64)."""
        w0 = w0.double()
        err = v_p.double() - self.c_p @ w0.T  # [m, out]
        lam = torch.linalg.lu_solve(*self.a_lu, err)  # A^{-1} err: [m, out] (A is symmetric)
        return w0 + lam.T @ self.d_mat


def merge_weight(w0: torch.Tensor, c_reg: torch.Tensor, c_p: torch.Tensor, v_p: torch.Tensor) -> torch.Tensor:
    """One layer: w0 [out, d], c_reg [s, d], c_p [m, d], v_p [m, out] -> W [out, d] (float64).
    Duplicate rows of c_p (and the matching rows of v_p) are dropped first."""
    keep = dedupe_rows(c_p)
    return MergeSolver(c_reg, c_p[keep])(w0, v_p[keep])


# ------------------------------------------------------------------------------------------ text features


def read_captions(path: str | Path, limit: int = NUM_REG_CAPTIONS) -> list[str]:
    """The first `limit` lines of a caption file, stripped, blank ones included (the original's
    `[x.strip() for x in f.readlines()][:200]`: a blank line adds its end-of-text row to C_reg)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"regularization caption file not found: {path}; pass --regularization_prompt")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()][:limit]
    if not any(lines):
        raise UsageError(f"{path} holds no captions")
    return lines


@torch.no_grad()
def token_features(pipe: Any, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Rows 1..EOS of each prompt's text features (rows 4..EOS when it starts with 'photo of a'), stacked.

    Features are what the UNet's cross-attention sees (`encode_prompt`): [sum of rows, d]; SDXL concatenates
    both encoders. Padding after EOS never changes rows up to EOS (CLIP attends causally).
    """
    tok = pipe.tokenizer
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        embeds = encode_prompt(pipe, chunk, do_cfg=False).embeds
        for text, feat in zip(chunk, embeds):
            n = len(tok(text, truncation=True, max_length=tok.model_max_length).input_ids)
            first = 4 if "photo of a" in text[:15] else 1
            rows.append(feat[first:n].float().cpu())
    return torch.cat(rows)


def target_prompts(category: str, token: str | None) -> list[str]:
    """The two prompts whose features a concept must keep: '<newN> cat' and 'photo of a <newN> cat'
    ('painting in the style of ...' for styles, i.e. categories containing 'art')."""
    subject = f"{token} {category}" if token else category
    second = f"painting in the style of {subject}" if "art" in subject else f"photo of a {subject}"
    return [subject, second]


# -------------------------------------------------------------------------------------------- whole models


def merge_concepts(pipe: Any, concepts: Sequence[CustomDiffusionWeights], categories: Sequence[str],
                   captions: Sequence[str]) -> CustomDiffusionWeights:
    """Merge N single-concept models onto the base `pipe` (modified: gets `<new1>..<newN>`).

    Model n's one modifier token becomes `<new n>` (numbering counts models without a token too, as the
    reference). Only K/V are merged; the result holds merged K/V for every cross-attention layer.
    """
    from customdiffusion.apply import check_against_unet, materialize
    from common.models.tokens import add_tokens_to_pipeline

    if len(concepts) != len(categories):
        raise UsageError(f"{len(concepts)} models but {len(categories)} categories; give one category per model "
                         "(both '+'-separated)")
    if len(concepts) < 1:
        raise UsageError("nothing to merge: pass at least one model")
    unet = pipe.unet
    base = {n: p.detach() for n, p in unet.named_parameters()}
    full, tokens = [], {}
    for n, concept in enumerate(concepts):
        if len(concept.tokens) > 1:
            raise UsageError(f"model {n + 1} has {len(concept.tokens)} modifier tokens ({'+'.join(concept.tokens)}); "
                             "only single-token models can be merged (merge separately trained concepts)")
        check_against_unet(concept, unet, source=f"model {n + 1}")
        full.append(materialize(concept, unet))
        if concept.tokens:
            tokens[f"<new{n + 1}>"] = next(iter(concept.tokens.values()))
    layers = [name for name in full[0].unet if is_kv(name)]
    for n, concept in enumerate(full):
        if set(k for k in concept.unet if is_kv(k)) != set(layers):
            raise UsageError(f"model {n + 1} has other K/V layers than model 1; were both trained on this base model?")
    if tokens:
        n_enc = len(next(iter(tokens.values())))
        add_tokens_to_pipeline(pipe, list(tokens), [torch.stack([v[i] for v in tokens.values()]) for i in range(n_enc)])
    c_reg = token_features(pipe, captions)
    c_targets, owners = [], []
    for n, category in enumerate(categories):
        token = f"<new{n + 1}>" if f"<new{n + 1}>" in tokens else None
        feats = token_features(pipe, target_prompts(category, token))
        c_targets.append(feats)
        owners += [n] * feats.shape[0]
    c_p = torch.cat(c_targets)
    keep = dedupe_rows(c_p)
    solver = MergeSolver(c_reg, c_p[keep])
    c_keep, owner_keep = c_p[keep].double(), [owners[i] for i in keep]
    merged = {}
    for name in layers:
        w_n = [full[n].unet[name].double() for n in range(len(full))]
        v_p = torch.stack([c_keep[r] @ w_n[owner_keep[r]].T for r in range(len(keep))])  # [m, out]
        merged[name] = solver(base[name], v_p).to(base[name].dtype)
    return CustomDiffusionWeights(merged, tokens)


# ------------------------------------------------------------------------------------------------------ CLI


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="merge_customdiffusion.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", required=True, help="'+'-separated concept checkpoints (any layout)")
    p.add_argument("--categories", required=True, help="'+'-separated category of each model, e.g. 'wooden pot+cat'")
    p.add_argument("--ckpt", "--pretrained_model_name_or_path", "--model", dest="ckpt", required=True,
                   help="base model: preset (tiny-sd), hub id or folder")
    p.add_argument("--save_path", default="optimized_logs", help="folder for optimized_<categories>/")
    p.add_argument("--prompts", default=None, help="prompt or prompt file to sample with the merged model")
    p.add_argument("--regularization_captions", "--regularization_prompt", dest="regularization_prompt",
                   default=str(DEFAULT_CAPTIONS),
                   help="caption file, one caption per line; its first 200 lines give the regularisation features "
                        "(the original's data/regularization_captions.txt from the CustomConcept101 download works "
                        "as it is; the default is our own generic list)")
    p.add_argument("--format", default="delta", choices=FORMATS, help="output layout")
    p.add_argument("--no_safe_serialization", action="store_true", help="write torch .bin instead of .safetensors")
    p.add_argument("--sdxl", action="store_true", help="the base is SDXL (detected from the model anyway)")
    p.add_argument("--num_inference_steps", type=positive_int, default=200, help="sampling steps for --prompts")
    p.add_argument("--seed", type=int, default=68, help="sampling seed for --prompts")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing merged output")
    return p


def check_paths(paths: Sequence[str]) -> None:
    """A merge needs at least two distinct concepts (the same checkpoint twice would merge it with itself)."""
    if len(paths) < 2:
        raise UsageError(f"--paths names {len(paths)} concept(s); merging needs at least two, '+'-separated "
                         "(one concept needs no merge: sample it directly)")
    for i, a in enumerate(paths):
        if not Path(a).exists():
            raise UsageError(f"Custom Diffusion checkpoint not found: {a}; check --paths")
        for b in paths[:i]:
            if same_path(a, b):
                raise UsageError(f"--paths names the same concept twice ({b} and {a}); merge distinct concepts")


def output_path(save_path: str | Path, categories: str, fmt: str, safe: bool) -> Path:
    folder = Path(save_path) / f"optimized_{categories.replace(' ', '_')}"
    if fmt == "diffusers":
        return folder
    ext = ".safetensors" if safe else (".ckpt" if fmt == "ldm" else ".bin")
    return folder / ("checkpoints/delta_epoch=000000" + ext if fmt == "ldm" else "delta" + ext)


def main(argv: Sequence[str] | None = None) -> Path:
    from common.models.loading import load_pipeline
    from common.models.tokens import split_plus
    from customdiffusion import formats

    args = parse_args(build_parser(), argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths, categories = split_plus(args.paths), split_plus(args.categories)
    check_paths(paths)
    if len(paths) != len(categories):
        raise UsageError(f"{len(paths)} models but {len(categories)} categories; give one category per model "
                         "(both '+'-separated)")
    captions = read_captions(args.regularization_prompt)
    out = output_path(args.save_path, args.categories, args.format, not args.no_safe_serialization)
    refuse_existing(out, args.overwrite, "merged output")
    if args.format == "diffusers" and args.overwrite:
        formats.remove_diffusers_layout(out)
    pipe = load_pipeline(args.ckpt, device=device)
    concepts = [formats.load(p, pipe.unet.config) for p in paths]
    merged = merge_concepts(pipe, concepts, categories, captions)
    formats.save(merged, out, args.format, pipe.unet.config, safe_serialization=not args.no_safe_serialization)
    print(f"wrote {out}")
    if args.prompts:
        from customdiffusion.sample import sample_to_folder

        base = load_pipeline(args.ckpt, device=device)
        sample_to_folder(base, out, prompts=args.prompts, outdir=out if out.is_dir() else out.parent,
                         num_images=10, batch_size=1, seed=args.seed, num_inference_steps=args.num_inference_steps,
                         overwrite=args.overwrite)
    return out
