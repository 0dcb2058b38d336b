"""Masked Shared Attention (SynCD §1.2): N images generated jointly; each image's queries see their own
text + image tokens and only the *foreground* image tokens of the other images (text queries see nothing
of the others). The mechanism is common/attention's plan (`AttentionPlan.shared` with token masks); this
module adds what is SynCD's own: the original's additive mask (for inspection and tests), the stacked
key positions, the timestep gate, and the online foreground estimate (Otsu over category-token affinity).
"""
from __future__ import annotations

from typing import Callable, Sequence

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


def msa_gates(plan: AttentionPlan, num_train_timesteps: int = 1000) -> list[PlanGate]:
    """Hooks for the original's `attn_mask=... if t < 1 else None`: at t < 1 the MSA mask (text queries see only
    their own image); at the first step (t = 1) no mask at all, so text queries also see the other images."""
    return [timestep_gate(plan, num_train_timesteps),
            PlanGate(plan, lambda s: float(s.t) / num_train_timesteps >= 1.0, attribute="text_sees_others")]


def otsu_binarize(x: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """x: [...] affinities -> the original's (`editor.py: otsu`) map: min-max normalised z, threshold t/bins
    (t = 0..bins-1) maximising w_low * w_high * (mean_low - mean_high)^2 over the actual values (low: z < t/bins,
    high: z >= t/bins; a strictly larger score wins, the threshold starts at 0); then z < thr -> 0, z > thr -> 1 and
    values equal to thr keep it (the original's in-place writes). Float, same shape as x."""
    flat = x.flatten().float()
    lo, hi = flat.min(), flat.max()
    z = (flat - lo) / (hi - lo).clamp_min(1e-12)  # the original divides by 0 (NaN) for a constant map
    n = z.numel()
    best, thr = 0.0, 0.0
    for t in range(bins):
        cut = t / bins
        low, high = z[z < cut], z[z >= cut]
        if low.numel() == 0 or high.numel() == 0:  # the original's NaN mean never wins
            continue
        g = float((low.numel() / n) * (high.numel() / n) * (low.mean() - high.mean()) ** 2)
        if g > best:
            best, thr = g, cut
    out = z.clone()
    out[z < thr] = 0.0
    out[z > thr] = 1.0
    return out.view_as(x)


def category_token_span(tokenizer, prompt: str, category: str, default: tuple[int, int] = (2, 3)
                        ) -> tuple[int, int]:
    """[start, end) of the category phrase's tokens in the tokenized prompt (exact subsequence match of
    the phrase's own tokens, special tokens dropped; the last match when it occurs twice, as the original's
    `get_token_indices`); `default` when absent (the original's [2, 3))."""
    ids = tokenizer(prompt).input_ids
    sub = tokenizer(category, add_special_tokens=False).input_ids
    span = default
    if not sub:
        return span
    for s in range(len(ids) - len(sub) + 1):
        if ids[s:s + len(sub)] == sub:
            span = (s, s + len(sub))
    return span


class AttentionStore:
    """Online foreground estimate (the original's `AttentionStore`): per layer, the text-to-image affinity
    softmax_text(q_text . k_img / sqrt(d)) averaged over heads, summed over the category-token span, averaged over
    layers and accumulated over steps; `estimate()` is its Otsu map, `masks()` that map > 0, dilated.

    `record(text_q [N, heads, T, d], image_k [N, heads, P, d])` is called by `RecordingFluxProcessor`, before the
    layer's attention. With `layers_per_step` (the number of recording layers), the record of the step's last layer
    closes the step at once and calls `on_step(self)` - as the original, whose step ends inside the last layer's
    editor call, so that layer's attention already uses the mask from this step's affinities."""

    def __init__(self, spans: Sequence[tuple[int, int]], grid: tuple[int, int], dilate: int = 1,
                 layers_per_step: int | None = None, on_step: Callable[["AttentionStore"], None] | None = None):
        self.spans, self.grid, self.dilate = list(spans), grid, dilate
        self.layers_per_step, self.on_step = layers_per_step, on_step
        self.acc: torch.Tensor | None = None
        self.layers = 0
        self.step_sum: torch.Tensor | None = None

    def record(self, text_q: torch.Tensor, image_k: torch.Tensor) -> None:
        # the original: sim = q[:, :T] k^T * scale -> [T, P], permuted to [P, T], softmax over the text tokens
        scores = (text_q.float() @ image_k.float().transpose(-1, -2)) * text_q.shape[-1] ** -0.5  # [N, h, T, P]
        aff = scores.transpose(-1, -2).softmax(-1).mean(1)  # [N, P, T]
        span = torch.stack([aff[i, :, a:b].sum(-1) for i, (a, b) in enumerate(self.spans)])  # [N, P]
        self.acc = span if self.acc is None else self.acc + span
        self.layers += 1
        if self.layers_per_step is not None and self.layers == self.layers_per_step:
            self.end_step()
            if self.on_step is not None:
                self.on_step(self)

    def end_step(self) -> None:
        if self.acc is None:
            return
        avg = self.acc / max(1, self.layers)
        self.step_sum = avg if self.step_sum is None else self.step_sum + avg
        self.acc, self.layers = None, 0

    def estimate(self) -> torch.Tensor | None:
        """float [N, h, w]: the Otsu map (0 / 1, a value equal to the threshold kept), what the original saves
        with --save_attn_mask (before dilation); None before the first recorded step."""
        if self.step_sum is None:
            return None
        h, w = self.grid
        return torch.stack([otsu_binarize(m) for m in self.step_sum]).view(-1, h, w)

    def masks(self) -> torch.Tensor | None:
        """bool [N, h, w] foreground tokens for the MSA mask: estimate > 0, box-dilated (the original's 3x3
        convolution of ones, clamped, > 0); None before the first recorded step."""
        est = self.estimate()
        if est is None:
            return None
        out = est > 0
        return dilate_mask(out, self.dilate) if self.dilate > 0 else out


def area_token_mask(mask: torch.Tensor, grid: tuple[int, int], dilate: int = 4) -> torch.Tensor:
    """Rigid objects: render alpha [N, H, W] -> bool [N, h, w]: area-downsample, > 0, box dilation
    (dilate=4 is the original's 9x9 box)."""
    small = F.adaptive_avg_pool2d(mask.float()[:, None], grid)[:, 0] > 0
    return dilate_mask(small, dilate) if dilate > 0 else small


# ---------------------------------------------------------------- recording processor (deformable masks)
register_attention_key("attn_store")


class RecordingFluxProcessor(FluxPlanAttnProcessor):
    """FluxPlanAttnProcessor that also hands (text queries, own image keys) to an `AttentionStore` given as
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
        store.record(q[:, :text_len].transpose(1, 2), k[:, text_len:].transpose(1, 2))


def install_recording(transformer, default_plan: AttentionPlan | None = None):
    """Recording plan processors on all FLUX attention layers; returns the restore handle."""
    return set_processors(transformer, lambda name, m: RecordingFluxProcessor(name, default_plan), "all")
