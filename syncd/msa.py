"""Masked Shared Attention (SynCD §1.2): N images generated jointly; each image's queries see their own
text + image tokens and only the *foreground* image tokens of the other images (text queries see nothing
of the others). The mechanism is common/attention's plan (`AttentionPlan.shared` with token masks); this
module adds what is SynCD's own: the original's additive mask (for inspection and tests), the stacked
key positions, the timestep gate, and the online foreground estimate (Otsu over category-token affinity).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from common.attention.plan import AttentionPlan, FluxPlanAttnProcessor, register_attention_key
from common.attention.processors import set_processors
from common.attention.schedule import PlanGate
from common.data.masks import dilate_mask
from common.train.conditioning import flux_latent_image_ids, flux_text_ids

NEG = -65504.0  # the original's additive "minus infinity" (fp16 min)


def msa_additive_mask(fg: torch.Tensor, text_len: int) -> torch.Tensor:
    """The original's mask M_n for every image n. fg: bool [N, P] foreground tokens.

    Returns float [N, T+P, T+N*P] in {0, -65504}: key layout [text_n; img_n; img_{n-1}; ...; img_{n-N+1}]
    (slot i holds image (n - i) mod N); own text + own image always visible; text rows see only them."""
    n, p = fg.shape
    t = text_len
    rows = []
    for i in range(n):
        slots = [fg[(i - s) % n] for s in range(1, n)]
        key = torch.cat([torch.ones(t + p, dtype=torch.bool), *[s.bool() for s in slots]])
        m = key[None].expand(t + p, -1).clone()
        m[:, :t + p] = True
        m[:t, t + p:] = False
        rows.append(m)
    allowed = torch.stack(rows)
    return torch.where(allowed, torch.tensor(0.0), torch.tensor(NEG))


def stacked_key_rotary(transformer, text_len: int, latent_hw: tuple[int, int], num_images: int,
                       device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for the gathered key sequence [T + N*P]: text ids ++ ids of an image N times taller
    (the N images stacked vertically, own image first), as the original lays out shared keys.
    latent_hw: the VAE latent size (before 2x2 packing: P = h*w/4 tokens)."""
    h, w = latent_hw
    img = flux_latent_image_ids((num_images * h, w), device=device)
    ids = torch.cat([flux_text_ids(text_len, device=device), img])
    return transformer.pos_embed(ids)


def msa_plan(fg: torch.Tensor | None, num_images: int, *, text_len: int | None = None,
             key_rotary: tuple[torch.Tensor, torch.Tensor] | None = None, backend: str = "sdpa") -> AttentionPlan:
    """SynCD's MSA as an attention plan. fg: bool [N, h, w] or [N, P] foreground (None: full sharing)."""
    return AttentionPlan.shared(num_images, fg, text_len=text_len, key_rotary=key_rotary, backend=backend)


def timestep_gate(plan: AttentionPlan, num_train_timesteps: int = 1000) -> PlanGate:
    """Hook: masks only where the normalised timestep t < 1 (the first step runs full shared attention;
    the deformable mask does not exist there yet)."""
    return PlanGate(plan, lambda s: float(s.t) / num_train_timesteps < 1.0)


def otsu_binarize(x: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """x: [...] affinities -> {0, 1} float, threshold by Otsu over `bins` bins after min-max normalisation."""
    flat = x.flatten().float()
    lo, hi = flat.min(), flat.max()
    z = (flat - lo) / (hi - lo).clamp_min(1e-12)
    hist = torch.histc(z, bins=bins, min=0.0, max=1.0)
    centers = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
    edges = torch.arange(1, bins, dtype=torch.float32) / bins
    best, thr = -1.0, 0.5
    for k in range(1, bins):
        w0, w1 = hist[:k].sum(), hist[k:].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0 = (hist[:k] * centers[:k]).sum() / w0
        m1 = (hist[k:] * centers[k:]).sum() / w1
        var = float(w0 * w1 * (m0 - m1) ** 2)
        if var > best:
            best, thr = var, float(edges[k - 1])
    return (z > thr).float().view_as(x)


def category_token_span(tokenizer, prompt: str, category: str, default: tuple[int, int] = (2, 3)
                        ) -> tuple[int, int]:
    """[start, end) of the category phrase's tokens in the tokenized prompt (exact subsequence match of
    the phrase's own tokens, special tokens dropped); `default` when absent (the original's [2, 3))."""
    ids = tokenizer(prompt).input_ids
    sub = tokenizer(category, add_special_tokens=False).input_ids
    if not sub:
        return default
    for s in range(len(ids) - len(sub) + 1):
        if ids[s:s + len(sub)] == sub:
            return s, s + len(sub)
    return default


class AttentionStore:
    """Online foreground estimate: per image, the affinity of image tokens to the category-token span,
    averaged over layers and accumulated over steps; `masks()` binarises it (Otsu, 10 bins) and dilates.

    `record(image_q [N, heads, P, d], text_k [N, heads, T, d])` is called by `RecordingFluxProcessor`."""

    def __init__(self, spans: Sequence[tuple[int, int]], grid: tuple[int, int], dilate: int = 1):
        self.spans, self.grid, self.dilate = list(spans), grid, dilate
        self.acc: torch.Tensor | None = None
        self.layers = 0
        self.step_sum: torch.Tensor | None = None

    def record(self, image_q: torch.Tensor, text_k: torch.Tensor) -> None:
        scores = (image_q.float() @ text_k.float().transpose(-1, -2)) * image_q.shape[-1] ** -0.5
        aff = scores.softmax(-1).mean(1)  # [N, P, T]
        span = torch.stack([aff[i, :, a:b].sum(-1) for i, (a, b) in enumerate(self.spans)])  # [N, P]
        self.acc = span if self.acc is None else self.acc + span
        self.layers += 1

    def end_step(self) -> None:
        if self.acc is None:
            return
        avg = self.acc / max(1, self.layers)
        self.step_sum = avg if self.step_sum is None else self.step_sum + avg
        self.acc, self.layers = None, 0

    def masks(self) -> torch.Tensor | None:
        """bool [N, h, w] foreground (None before the first recorded step)."""
        if self.step_sum is None:
            return None
        h, w = self.grid
        out = torch.stack([otsu_binarize(m) for m in self.step_sum]).view(-1, h, w) > 0
        return dilate_mask(out, self.dilate) if self.dilate > 0 else out


def area_token_mask(mask: torch.Tensor, grid: tuple[int, int], dilate: int = 4) -> torch.Tensor:
    """Rigid objects: render alpha [N, H, W] -> bool [N, h, w]: area-downsample, > 0, box dilation
    (dilate=4 is the original's 9x9 box)."""
    small = F.adaptive_avg_pool2d(mask.float()[:, None], grid)[:, 0] > 0
    return dilate_mask(small, dilate) if dilate > 0 else small


# ---------------------------------------------------------------- recording processor (deformable masks)
register_attention_key("attn_store")


class RecordingFluxProcessor(FluxPlanAttnProcessor):
    """FluxPlanAttnProcessor that also hands (image queries, text keys) to an `AttentionStore` given as
    `joint_attention_kwargs["attn_store"]`. The projections are recomputed for the record (data generation
    only; the attention itself is the plan processor's, unchanged)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 plan=None, kv_bank=None, attn_store: AttentionStore | None = None):
        if attn_store is not None:
            with torch.no_grad():
                self._record(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                             plan if plan is not None else self.default_plan, attn_store)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                plan=plan, kv_bank=kv_bank)

    @staticmethod
    def _record(attn, hidden_states, encoder_hidden_states, rotary, plan, store: AttentionStore) -> None:
        from diffusers.models.embeddings import apply_rotary_emb

        heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))
        q = attn.norm_q(heads(attn.to_q(hidden_states)))
        k = attn.norm_k(heads(attn.to_k(hidden_states)))
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), q], 1)
            k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), k], 1)
        else:
            text_len = plan.text_len if plan is not None and plan.text_len is not None else 0
        if rotary is not None:
            q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
        store.record(q[:, text_len:].transpose(1, 2), k[:, :text_len].transpose(1, 2))


def install_recording(transformer, default_plan: AttentionPlan | None = None):
    """Recording plan processors on all FLUX attention layers; returns the restore handle."""
    return set_processors(transformer, lambda name, m: RecordingFluxProcessor(name, default_plan), "all")
