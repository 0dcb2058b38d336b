"""MIP-Adapter's weighted merge (spec §1.3) as a cross-attention processor.

Per cross-attention layer and call, with latent queries Q [B, N] and K references:
  H_t   = Attn(Q, W_k c_t, W_v c_t)                                  text branch (unchanged)
  H^k   = λ Attn(Q, W'_k c_i^k, W'_v c_i^k)                          one softmax per reference, shared W'_k, W'_v
  a^k   = mean_{rows 1..L_k} mean_heads softmax_N(scale K_e^k Q^T)    where entity word k looks (detached, fp32)
  w^k   = a^k / (Σ_j a^j + eps)                                      cross-object normalisation
  ĝ     = g / mean_N g,  g = sigmoid(u^T H_t)                        learned text gate (`text_to_weight`)
  Z     = H_t + Σ_k ĝ w^k H^k   -> to_out
The weights are head-independent, so they are folded into the per-reference attention probabilities and one
matmul with the K·T image values gives Σ_k ĝ w^k H^k: the K per-reference outputs [B, N, C] are never
materialised, and only the L_k entity rows of the word map are computed (the original builds all 77).

The per-call state (`MIPState`: object tokens, entity embeddings and lengths, optional masks) comes through
`cross_attention_kwargs={"mip": state}`; nothing per call is stored on a processor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from common.attention.plan import register_attention_key

STATE_KEY = "mip"
#: Denominator epsilon of the cross-object normalisation (the original has none; maps are fp32 here).
EPS = 1e-12

register_attention_key(STATE_KEY)


@dataclass(eq=False)
class MIPState:
    """Per-call state of the merge. tokens: [B, K, T, D] image tokens per object (an object's images already
    averaged); entity_embeds: [B, K, L, D] each entity word encoded alone like a prompt; entity_lengths:
    long [B, K], tokens of word k under tokenizer 1 without BOS/EOS (rows 1..L_k are used).
    negative_*: the unconditional half for CFG (zero-image tokens, the "" encoding); the negative half keeps
    the positive lengths (spec §1.3). masks: [B, K, h, w] in [0, 1], an optional user region per reference
    multiplied into w^k (resized to each layer's grid); latent_hw: the UNet input's (h, w), needed for masks.
    scale: λ (None: the processor's own); enabled: False turns the image branch off (--ip_step_range).
    debug: a dict to which each processor appends {"a", "w", "gate"} under its layer name (tests, weight maps).
    """

    tokens: torch.Tensor
    entity_embeds: torch.Tensor
    entity_lengths: torch.Tensor
    negative_tokens: torch.Tensor | None = None
    negative_entity_embeds: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    latent_hw: tuple[int, int] | None = None
    scale: float | None = None
    enabled: bool = True
    debug: dict[str, list[dict[str, torch.Tensor]]] | None = None
    _rows: dict[int, tuple] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        b, k = self.tokens.shape[:2]
        if self.entity_embeds.shape[:2] != (b, k) or tuple(self.entity_lengths.shape) != (b, k):
            raise ValueError(f"MIPState: tokens {tuple(self.tokens.shape)}, entity_embeds "
                             f"{tuple(self.entity_embeds.shape)} and entity_lengths {tuple(self.entity_lengths.shape)} "
                             "must share [B, K]")
        if int(self.entity_lengths.min()) < 1:
            raise ValueError("every entity word needs at least one token")

    @property
    def num_objects(self) -> int:
        return self.tokens.shape[1]

    def rows(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """(tokens, entity_embeds, lengths, masks, max length) for a UNet batch of `batch` rows: the positive rows,
        or [negative; positive] when the batch is CFG-doubled. Cached: built once per call, not per layer."""
        if batch in self._rows:
            return self._rows[batch]
        b = self.tokens.shape[0]
        lengths = self.entity_lengths
        masks = self.masks
        if batch == b:
            out = (self.tokens, self.entity_embeds, lengths, masks)
        elif batch == 2 * b:
            neg_t = self.negative_tokens if self.negative_tokens is not None else torch.zeros_like(self.tokens)
            if self.negative_entity_embeds is None:
                raise ValueError("a CFG batch needs MIPState.negative_entity_embeds (the \"\" encoding)")
            out = (torch.cat([neg_t, self.tokens]), torch.cat([self.negative_entity_embeds, self.entity_embeds]),
                   torch.cat([lengths, lengths]), None if masks is None else torch.cat([masks, masks]))
        else:
            raise ValueError(f"MIPState has {b} rows but the UNet batch has {batch} (expected {b} or {2 * b})")
        self._rows[batch] = (*out, int(lengths.max()))
        return self._rows[batch]


def layer_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """(h, w) of a UNet layer with `tokens` positions for an input latent of `latent_hw` (stride-2 rounding up)."""
    h, w = latent_hw
    f = 1
    while math.ceil(h / f) * math.ceil(w / f) > tokens:
        f *= 2
    if math.ceil(h / f) * math.ceil(w / f) != tokens:
        raise ValueError(f"a layer with {tokens} tokens does not fit the latent size {latent_hw}")
    return math.ceil(h / f), math.ceil(w / f)


def relevance_maps(attn: Attention, query: torch.Tensor, entity_embeds: torch.Tensor, lengths: torch.Tensor,
                   max_len: int) -> torch.Tensor:
    """a^k [B, K, N] fp32: spatial softmax of the entity rows 1..L_k against the queries, heads then rows
    averaged, no gradient. query: [B, heads, N, d]; entity_embeds: [B, K, L, D]; lengths: long [B, K]."""
    b, heads, n, d = query.shape
    k = entity_embeds.shape[1]
    with torch.no_grad():
        if attn.norm_cross:  # as the original: the entity words pass the layer's cross-attention norm too
            flat = attn.norm_encoder_hidden_states(entity_embeds.flatten(0, 1))
            entity_embeds = flat.view(b, k, *flat.shape[1:])
        keys = attn.to_k(entity_embeds[:, :, 1:1 + max_len])  # [B, K, Lmax, inner]
        keys = keys.reshape(b, k * max_len, heads, d).transpose(1, 2)
        if attn.norm_k is not None:
            keys = attn.norm_k(keys)
        scores = torch.matmul(keys.float(), query.detach().float().transpose(-1, -2)) * attn.scale
        maps = scores.softmax(dim=-1).mean(dim=1).view(b, k, max_len, n)  # softmax over space, heads averaged
        rows = torch.arange(max_len, device=maps.device) < lengths.to(maps.device)[..., None]  # [B, K, Lmax]
        return (maps * rows[..., None]).sum(2) / lengths.to(maps.device, maps.dtype)[..., None]


def cross_object_weights(maps: torch.Tensor) -> torch.Tensor:
    """w^k = a^k / (Σ_j a^j + EPS), [B, K, N]; K = 1 gives exactly 1 (the merge is then plain IP-Adapter x ĝ)."""
    if maps.shape[1] == 1:
        return torch.ones_like(maps)
    return maps / (maps.sum(dim=1, keepdim=True) + EPS)


class MIPAdapterAttnProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' IP-Adapter processor (its `to_k_ip[0]` / `to_v_ip[0]` parameters, shared by all references, so
    diffusers' converters load released weights into it) plus the gate `text_to_weight` and the weighted merge.

    Without a "mip" state (or with λ = 0 / enabled False) it computes exactly diffusers' AttnProcessor2_0.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int = 4, scale: float = 1.0,
                 name: str = ""):
        super().__init__(hidden_size, cross_attention_dim, num_tokens=(num_tokens,), scale=scale)
        self.text_to_weight = torch.nn.Linear(hidden_size, 1, bias=False)
        self.name = name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 mip: MIPState | None = None) -> torch.Tensor:
        """hidden_states: [B, N, C] or [B, C, H, W]; encoder_hidden_states: text [B, 77, D] (a diffusers
        (text, image) tuple is reduced to its text part); returns the same shape as hidden_states."""
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states = encoder_hidden_states[0]
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        grid = None
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
            grid = (height, width)
        batch, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        inner = key.shape[-1]
        d = inner // attn.heads
        query = query.view(batch, -1, attn.heads, d).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, d).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False)
        text = text.transpose(1, 2).reshape(batch, -1, inner).to(query.dtype)  # H_t [B, N, inner]

        scale = self.scale[0] if mip is None or mip.scale is None else mip.scale
        if mip is not None and mip.enabled and scale != 0:
            text = text + self.merged_image_branch(attn, query, text, mip, float(scale), grid)

        out = attn.to_out[0](text)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def gate(self, text: torch.Tensor) -> torch.Tensor:
        """ĝ [B, N] = g / mean_N g with g = sigmoid(text_to_weight(H_t)); H_t: [B, N, inner] before to_out."""
        g = torch.sigmoid(self.text_to_weight(text.to(self.text_to_weight.weight.dtype))).squeeze(-1)
        return g / g.mean(dim=1, keepdim=True)

    def merged_image_branch(self, attn: Attention, query: torch.Tensor, text: torch.Tensor, mip: MIPState,
                            scale: float, grid: tuple[int, int] | None) -> torch.Tensor:
        """Σ_k λ ĝ w^k H^k as [B, N, inner]. query: [B, heads, N, d]; text: H_t [B, N, inner]."""
        b, heads, n, d = query.shape
        tokens, embeds, lengths, masks, max_len = mip.rows(b)
        k, t = tokens.shape[1], tokens.shape[2]
        tokens = tokens.to(self.to_k_ip[0].weight.dtype)
        ip_key = self.to_k_ip[0](tokens).reshape(b, k * t, heads, d).transpose(1, 2).to(query.dtype)
        ip_value = self.to_v_ip[0](tokens).reshape(b, k * t, heads, d).transpose(1, 2).to(query.dtype)
        scores = torch.matmul(query, ip_key.transpose(-1, -2)) * attn.scale  # [B, heads, N, K*T]
        probs = scores.view(b, heads, n, k, t).float().softmax(dim=-1)  # one softmax per reference

        maps = None if k == 1 else relevance_maps(attn, query, embeds.to(query.dtype), lengths, max_len)
        w = torch.ones(b, 1, n, device=query.device) if maps is None else cross_object_weights(maps)
        if masks is not None:
            hw = grid or layer_grid(mip.latent_hw or _square(n), n)
            w = w * F.interpolate(masks.float(), size=hw, mode="area").flatten(2).to(w.device)
        g = self.gate(text)
        weights = scale * g.float()[:, None, :] * w  # [B, K, N]
        if mip.debug is not None:
            mip.debug.setdefault(self.name, []).append(
                {"a": maps if maps is not None else w.detach(), "w": w.detach(), "gate": g.detach()})
        scaling = weights.permute(0, 2, 1)[:, None, :, :, None]
        # in place when no gradient is recorded (softmax's backward needs its output): one [B, h, N, K, T] buffer
        probs = probs * scaling if probs.requires_grad else probs.mul_(scaling)
        merged = torch.matmul(probs.to(ip_value.dtype).reshape(b, heads, n, k * t), ip_value)  # [B, heads, N, d]
        return merged.transpose(1, 2).reshape(b, n, heads * d).to(text.dtype)


def _square(n: int) -> tuple[int, int]:
    s = int(round(math.sqrt(n)))
    if s * s != n:
        raise ValueError("masks on a non-square latent need MIPState.latent_hw")
    return s, s


def plain_image_branch_reference(attn: Attention, query: torch.Tensor, tokens: torch.Tensor,
                                 to_k_ip: torch.nn.Linear, to_v_ip: torch.nn.Linear) -> torch.Tensor:
    """Per-reference outputs H^k / λ [B, K, N, inner] the slow, direct way (tests and the benchmark's
    original formulation). query: [B, heads, N, d]; tokens: [B, K, T, D]."""
    b, heads, n, d = query.shape
    outs = []
    for k in range(tokens.shape[1]):
        key = to_k_ip(tokens[:, k]).view(b, -1, heads, d).transpose(1, 2)
        value = to_v_ip(tokens[:, k]).view(b, -1, heads, d).transpose(1, 2)
        outs.append(F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(b, n, heads * d))
    return torch.stack(outs, 1)
