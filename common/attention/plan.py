"""Attention plans: which tokens of which images each query token sees, and processors that honour one.

A batch holds blocks of `num_images` images (the CFG halves [negative; positive] are separate blocks and
never mix). Each image attends to its own tokens (text + image on FLUX), and to the *image* tokens of its
context images — neighbours / references (SyncTweedies' sample-wise attention), or all the others
(SynCD's shared attention) — restricted per token by object masks (`token_masks`, SynCD's masked shared
attention), and to image tokens held in a K/V bank (`KVBank`: references run once per step in "write"
mode, the target reads their keys/values). Key layout per query image: [own text; own image; image of
context slot 1; ...; bank tokens]; slot i of SynCD's shared attention is image (n - i) mod N.

The plan travels with each call (`cross_attention_kwargs={"plan": plan}` for a UNet,
`joint_attention_kwargs` for FLUX, usually through `Conditioning.attention`); a processor may also be
given a default plan (fixed for every call, as SyncTweedies installs it). With nothing to add or mask a processor computes
exactly what diffusers' stock processor computes.
"""
from __future__ import annotations

import ast
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from common.attention.backends import KeyLayout, attend, build_mask
from common.attention.processors import Where, set_processors

#: Per-call keys our processors read from cross_attention_kwargs / joint_attention_kwargs.
ATTENTION_KEYS = {"plan", "kv_bank", "ip_token_index", "entity_token_index"}


def register_attention_key(name: str) -> None:
    """A method's own per-call key (e.g. "mip"): layers whose processor ignores it do not warn about it."""
    ATTENTION_KEYS.add(name)


@dataclass(eq=False)
class KVBank:
    """Keys/values of reference images, per layer. mode: "write" (store this pass's image-token K/V),
    "read" (append the stored K/V to every query image's keys) or "off".

    store[layer] = (k, v), each [R, heads, P, d] (keys after norm and rotary). masks: bool [R, h, w] or
    [R, P] foreground of the written images (None: all tokens visible). read_index: long [B, r], which
    written rows reading row b sees (None: all R rows). detach: store without gradient (references run
    with the LoRA off and are not trained through). text_len: prompt tokens ahead of the image tokens
    in a FLUX single-block sequence when no plan says it.

    project_on_read (UNet self-attention only): store the layer's input hidden states [R, P, C] instead, and
    project them with the reading pass's to_k / to_v. SynCD's SDXL model does this: its references run with
    the LoRA off, but their keys/values come from the LoRA'd projections of the target pass (which therefore
    also train on the reference tokens).
    """

    mode: str = "off"
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    masks: torch.Tensor | None = None
    read_index: torch.Tensor | None = None
    detach: bool = True
    text_len: int | None = None
    project_on_read: bool = False
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def write(self, layer: str, k: torch.Tensor, v: torch.Tensor) -> None:
        self.store[layer] = (k.detach(), v.detach()) if self.detach else (k, v)

    def write_inputs(self, layer: str, hidden_states: torch.Tensor) -> None:
        """project_on_read: keep the written images' attention inputs [R, P, C]."""
        self.inputs[layer] = hidden_states.detach() if self.detach else hidden_states

    def projected(self, layer: str, project: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> KVBank:
        """project_on_read: a read-mode bank over this layer's stored inputs projected by `project`
        ([R, P, C] -> k, v [R, heads, P, d]), with this bank's masks and read_index."""
        if layer not in self.inputs:
            raise KeyError(f"K/V bank has nothing for layer {layer!r}: run a 'write' pass first")
        k, v = project(self.inputs[layer])
        return KVBank(mode="read", store={layer: (k, v)}, masks=self.masks, read_index=self.read_index, detach=False)

    def read(self, layer: str, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v) [B, heads, r*P, d] and visibility [B, r*P] for a reading batch of `batch` rows."""
        if layer not in self.store:
            raise KeyError(f"K/V bank has nothing for layer {layer!r}: run a 'write' pass first")
        k, v = self.store[layer]
        rows = self.read_index
        if rows is None:
            rows = torch.arange(k.shape[0], device=k.device)[None].expand(batch, -1)
        rows = rows.to(k.device)
        p = k.shape[2]
        vis = token_visibility(self.masks, p, k.device)
        vis = torch.ones(k.shape[0], p, dtype=torch.bool, device=k.device) if vis is None else vis
        gather = lambda t: t[rows].permute(0, 2, 1, 3, 4).flatten(2, 3)  # [B, heads, r*P, d]
        return gather(k), gather(v), vis[rows].flatten(1)

    def clear(self) -> None:
        self.store.clear()
        self.inputs.clear()


def token_visibility(masks: torch.Tensor | None, tokens: int, device=None) -> torch.Tensor | None:
    """Object masks bool [N, h, w] (or flat [N, P]) -> bool [N, tokens] at a layer's token grid.

    A UNet layer with `tokens` = gh * gw tokens sees the mask nearest-resized to its grid (gh/gw keeps the
    mask's aspect; odd sizes round up as stride-2 convolutions do).
    """
    if masks is None:
        return None
    masks = masks.to(device) if device is not None else masks
    if masks.ndim == 2:
        if masks.shape[1] != tokens:
            raise ValueError(f"token mask has {masks.shape[1]} tokens, the layer has {tokens}")
        return masks.bool()
    h, w = masks.shape[-2:]
    for rnd in (round, math.ceil, math.floor):
        f = math.sqrt(h * w / tokens)
        gh, gw = max(1, int(rnd(h / f))), max(1, int(rnd(w / f)))
        if gh * gw == tokens:
            break
    else:
        raise ValueError(f"cannot map a {h}x{w} mask onto {tokens} tokens")
    if (gh, gw) == (h, w):
        return masks.flatten(1).bool()
    small = F.interpolate(masks[:, None].float(), size=(gh, gw), mode="nearest")
    return (small[:, 0] > 0.5).flatten(1)


@dataclass(eq=False)
class AttentionPlan:
    """Which tokens of which images each query sees. Mutable: hooks flip `reference_enabled` /
    `masks_enabled` per step (e.g. SynCD's gate: no masks at the first step).

    num_images: images per block; neighbours: offsets of context images (circular wraps within the
    block); graph: explicit neighbour lists per image (replaces `neighbours`); reference: image ids every
    image of the block also sees, with weight `reference_weight` (a log-bias; 1 = plain joint attention);
    token_masks: bool [num_images, h, w] or [num_images, P], foreground tokens others may see (None: all);
    text_sees_others: text queries also see other images' visible tokens; segments: long [L] for one
    sequence holding several images (canvas): image tokens see their own segment only, -1 = text;
    key_rotary: (cos, sin) for the gathered key sequence [T + slots*P] on FLUX (None: every image keeps
    its own positions); text_len: text tokens of a FLUX single-block sequence; kv_bank: see KVBank;
    backend: "sdpa" (dense mask) or "flex" (block mask); max_batch: images per chunk (memory bound);
    text_key_mask: bool [num_images, L_text], prompt tokens visible to a cross-attention (attn2) query.
    """

    num_images: int = 1
    neighbours: tuple[int, ...] = ()
    circular: bool = True
    reference: tuple[int, ...] = ()
    reference_weight: float = 1.0
    reference_enabled: bool = True
    max_batch: int = 1000
    graph: tuple[tuple[int, ...], ...] | None = None
    token_masks: torch.Tensor | None = None
    masks_enabled: bool = True
    text_sees_others: bool = False
    segments: torch.Tensor | None = None
    key_rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    text_len: int | None = None
    kv_bank: KVBank | None = None
    backend: str = "sdpa"
    text_key_mask: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def shared(cls, num_images: int, token_masks: torch.Tensor | None = None, **kw: Any) -> "AttentionPlan":
        """SynCD's shared attention: every image sees all others, slot i = image (n - i) mod N."""
        return cls(num_images=num_images, neighbours=tuple(-i for i in range(1, num_images)), circular=True,
                   token_masks=token_masks, **kw)

    def context_of(self, v: int) -> list[tuple[int, float]]:
        """(image, log-weight) pairs image `v` attends to: itself, its neighbours, then the references."""
        n = self.num_images
        if self.graph is not None:
            candidates = list(self.graph[v])
        else:
            candidates = [(v + o) % n if self.circular else v + o for o in self.neighbours]
        out, seen = [(v, 0.0)], {v}
        for j in candidates:
            if 0 <= j < n and j not in seen:
                out.append((j, 0.0))
                seen.add(j)
        if self.reference_enabled:
            w = math.log(self.reference_weight) if self.reference_weight > 0 else -math.inf
            for r in self.reference:
                if r not in seen:
                    out.append((r, w))
                    seen.add(r)
        return out

    def groups(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [B, k] of context images, log-weight [B, k]) for B = blocks * num_images images.

        Column 0 is the image itself; rows shorter than k are padded with the image at weight -inf.
        """
        key = ("groups", batch, str(device), self.reference_enabled)
        if key in self._cache:
            return self._cache[key]
        n = self.num_images
        if batch % n:
            raise ValueError(f"batch {batch} is not a multiple of num_images {n}")
        per_image = [self.context_of(v) for v in range(n)]
        width = max(len(c) for c in per_image)
        rows, biases = [], []
        for b in range(batch):
            block, v = divmod(b, n)
            ctx = per_image[v] + [(v, -math.inf)] * (width - len(per_image[v]))
            rows.append([block * n + j for j, _ in ctx])
            biases.append([w for _, w in ctx])
        out = (torch.tensor(rows, device=device), torch.tensor(biases, device=device))
        self._cache[key] = out
        return out

    def visibility(self, images: torch.Tensor, tokens: int) -> torch.Tensor | None:
        """bool [..., tokens] for image ids `images` (batch rows; taken modulo num_images), or None."""
        if self.token_masks is None or not self.masks_enabled:
            return None
        masks = self.token_masks
        key = ("vis", tokens, str(images.device), id(masks), masks._version)  # in-place updates invalidate
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "vis" or k[3:] == key[3:]}
            self._cache[key] = token_visibility(masks, tokens, images.device)
        return self._cache[key][images % self.num_images]

    def is_trivial(self) -> bool:
        """True when the plan adds nothing to plain per-image attention."""
        no_groups = self.graph is None and not self.neighbours and not (self.reference and self.reference_enabled)
        return no_groups and self.segments is None and self.kv_bank is None and self.key_rotary is None


def plan_attention(plan: AttentionPlan | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   text_len: int, layer: str, bank: KVBank | None = None,
                   rotate_keys: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of each image's queries over its planned keys.

    q, k, v: [B, heads, L, d], L = text_len + P own tokens (text first; text_len = 0 on UNet layers);
    `rotate_keys` (FLUX with plan.key_rotary) rotates the gathered key sequence [B, heads, T + slots*P, d].
    Returns [B, heads, L, d].
    """
    bank = bank if bank is not None else (plan.kv_bank if plan is not None else None)
    if bank is not None and bank.mode == "write":
        bank.write(layer, k[:, :, text_len:], v[:, :, text_len:])
    reading = bank is not None and bank.mode == "read"
    batch, own_len = q.shape[0], q.shape[2]
    if plan is None:
        plan = AttentionPlan()
    index, weight = plan.groups(batch, q.device)
    if index.shape[1] == 1 and not reading and plan.segments is None and rotate_keys is None:
        return F.scaled_dot_product_attention(q, k, v)
    p = own_len - text_len
    bank_kv = bank.read(layer, batch) if reading else None
    step = max(1, plan.max_batch)
    outs = []
    for s in range(0, batch, step):
        rows = slice(s, s + step)
        keys, values, vis, bias = [k[rows]], [v[rows]], [], []
        others, w = index[rows, 1:], weight[rows, 1:]  # [b, S-1]
        b = others.shape[0]
        if others.shape[1]:
            gather = lambda t: t[others][:, :, :, text_len:].permute(0, 2, 1, 3, 4).flatten(2, 3)
            keys.append(gather(k))
            values.append(gather(v))
            slot_vis = plan.visibility(others, p)
            slot_vis = torch.ones(*others.shape, p, dtype=torch.bool, device=q.device) if slot_vis is None else slot_vis
            finite = w > -math.inf
            vis.append((slot_vis & finite[..., None]).flatten(1))
            bias.append(torch.where(finite, w, torch.zeros_like(w)).repeat_interleave(p, dim=1))
        kk = torch.cat(keys, dim=2)
        if rotate_keys is not None:
            kk = rotate_keys(kk)
        if bank_kv is not None:
            kk = torch.cat([kk, bank_kv[0][rows]], dim=2)
            values.append(bank_kv[1][rows])
            vis.append(bank_kv[2][rows])
            bias.append(torch.zeros_like(bank_kv[2][rows], dtype=weight.dtype))
        vv = torch.cat(values, dim=2)
        own_vis = torch.ones(b, own_len, dtype=torch.bool, device=q.device)
        visible = torch.cat([own_vis, *vis], dim=1)
        key_bias = None
        if bias and any((x != 0).any() for x in bias):
            key_bias = torch.cat([torch.zeros(b, own_len, device=q.device, dtype=weight.dtype), *bias], dim=1)
        segments = None if plan.segments is None else plan.segments.to(q.device)[None].expand(b, -1)
        layout = KeyLayout(own_len, text_len, visible, key_bias, plan.text_sees_others, segments)
        if visible.all() and key_bias is None and segments is None and (text_len == 0 or plan.text_sees_others):
            outs.append(F.scaled_dot_product_attention(q[rows], kk, vv))  # nothing masked: plain joint attention
        else:
            outs.append(attend(q[rows], kk, vv, layout, plan.backend))
    return torch.cat(outs)


# --------------------------------------------------------------------------------------------- processors


class PlanAttnProcessor:
    """UNet attention (attn1 self-attention; attn2 cross-attention) that honours an AttentionPlan.

    Drop-in for diffusers' AttnProcessor2_0: with no plan (or a trivial one) it computes exactly the same.
    attn1: the plan's image groups, token masks and K/V bank. attn2: `plan.text_key_mask` (prompt tokens
    each image's queries may see); image-token K/V (IP-Adapter) are the IP processors' business.
    """

    def __init__(self, name: str = "", default_plan: AttentionPlan | None = None):
        self.name, self.default_plan = name, default_plan

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 plan: AttentionPlan | None = None, kv_bank: KVBank | None = None, *args, **kwargs) -> torch.Tensor:
        plan = plan if plan is not None else self.default_plan
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, _, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        cross = encoder_hidden_states is not None
        if not cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        split = lambda x: x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, L, d]
        query, key, value = split(query), split(key), split(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        bank = kv_bank if kv_bank is not None else (plan.kv_bank if plan is not None else None)
        if bank is not None and bank.project_on_read and not cross and bank.mode != "off":
            if bank.mode == "write":
                bank.write_inputs(self.name, hidden_states)
                bank = KVBank(mode="off")  # the written images attend to themselves
            else:
                def project(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    r = h.shape[0]
                    to_heads = lambda x: x.view(r, -1, attn.heads, head_dim).transpose(1, 2)
                    k_ref, v_ref = to_heads(attn.to_k(h)), to_heads(attn.to_v(h))
                    return (attn.norm_k(k_ref) if attn.norm_k is not None else k_ref), v_ref

                bank = bank.projected(self.name, project)
        if cross and plan is not None and plan.text_key_mask is not None:
            rows = torch.arange(batch, device=query.device) % plan.num_images
            keep = plan.text_key_mask.to(query.device)[rows][:, None, None, :]  # [B, 1, 1, L_text]
            attention_mask = keep if attention_mask is None else torch.where(
                keep, attention_mask, torch.tensor(float("-inf"), dtype=attention_mask.dtype))
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        elif cross or ((plan is None or plan.is_trivial()) and bank is None):
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False)
        else:
            if attention_mask is not None:
                raise ValueError("an attention plan on self-attention does not combine with an attention_mask")
            hidden_states = plan_attention(plan, query, key, value, text_len=0, layer=self.name, bank=bank)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class FluxPlanAttnProcessor:
    """FLUX attention for double-stream (joint) and single-stream blocks that honours an AttentionPlan.

    Equivalent to diffusers' FluxAttnProcessor (same projections, RMS norms, rotary embedding in
    `image_rotary_emb`); with no plan it computes exactly the same. Joint blocks know the text length
    from encoder_hidden_states; single blocks take it from `plan.text_len` (FluxDenoiser fills it in).
    """

    def __init__(self, name: str = "", default_plan: AttentionPlan | None = None):
        self.name, self.default_plan = name, default_plan

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None,
                 plan: AttentionPlan | None = None, kv_bank: KVBank | None = None) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        plan = plan if plan is not None else self.default_plan
        bank = kv_bank if kv_bank is not None else (plan.kv_bank if plan is not None else None)
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        plain = (plan is None or plan.is_trivial()) and bank is None
        rotate_later = plan is not None and plan.key_rotary is not None
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            if not rotate_later:
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if plain:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                        backend=getattr(self, "_attention_backend", None))
        else:
            if attention_mask is not None:
                raise ValueError("an attention plan does not combine with an attention_mask")
            if encoder_hidden_states is not None:
                text_len = encoder_hidden_states.shape[1]
            elif plan is not None and plan.text_len is not None:
                text_len = plan.text_len
            elif bank is not None and bank.text_len is not None:
                text_len = bank.text_len
            else:
                raise ValueError("a FLUX single-block plan needs plan.text_len (the prompt's token count)")
            rotate = None
            if rotate_later:
                cos, sin = plan.key_rotary
                rotate = lambda kk: apply_rotary_emb(kk, (cos.to(kk.device), sin.to(kk.device)), sequence_dim=2)
            t = lambda x: x.transpose(1, 2)  # [B, L, heads, d] <-> [B, heads, L, d]
            out = t(plan_attention(plan, t(query), t(key), t(value), text_len=text_len, layer=self.name,
                                   bank=bank, rotate_keys=rotate))
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            text, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]],
                                             dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(text.contiguous())
        return out


def make_plan_processor(name: str, module: torch.nn.Module, default_plan: AttentionPlan | None = None):
    """The plan processor for a layer: FLUX attention (joint or single) or UNet attention."""
    if type(module).__name__ == "FluxAttention":
        return FluxPlanAttnProcessor(name, default_plan)
    return PlanAttnProcessor(name, default_plan)


def install_plan(model: torch.nn.Module, where: Where | None = None, default_plan: AttentionPlan | None = None):
    """Plan processors on the matching layers (UNet default "attn1", FLUX default "all"); returns the
    restore handle of `set_processors`. The plan itself comes with each call (or `default_plan`)."""
    if where is None:
        where = "all" if hasattr(model, "single_transformer_blocks") else "attn1"
    return set_processors(model, lambda name, module: make_plan_processor(name, module, default_plan), where)


# ------------------------------------------------------------------ quiet diffusers about our per-call keys


class _OurKeysFilter(logging.Filter):
    """diffusers warns once per layer and call when a processor does not take a cross_attention_kwargs key;
    layers without a plan processor ignore our keys by design, so that warning is dropped for them only."""

    _pattern = re.compile(r"kwargs (\[.*?\]) are not expected by")

    def filter(self, record: logging.LogRecord) -> bool:
        match = self._pattern.search(record.getMessage())
        if not match:
            return True
        try:
            keys = set(ast.literal_eval(match.group(1)))
        except (ValueError, SyntaxError):
            return True
        return not keys <= ATTENTION_KEYS


for _name in ("diffusers.models.attention_processor", "diffusers.models.transformers.transformer_flux"):
    if not any(isinstance(f, _OurKeysFilter) for f in logging.getLogger(_name).filters):
        logging.getLogger(_name).addFilter(_OurKeysFilter())

__all__ = ["ATTENTION_KEYS", "AttentionPlan", "FluxPlanAttnProcessor", "KVBank", "PlanAttnProcessor", "build_mask",
           "install_plan", "make_plan_processor", "plan_attention", "token_visibility"]
