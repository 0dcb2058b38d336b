"""SynCD's "encoder-free" FLUX layout (§2.1, §3.3): target + references side by side on one wide latent
canvas [C, h, n*w], packed as one wide image (row-major "(h n w)" token order, RoPE ids of the wide grid),
references kept clean while the target is noised, the loss on target tokens only, and the neg_mode
block-diagonal plan (each image sees only itself; text sees everything)."""
from __future__ import annotations

import torch

from common.attention.plan import AttentionPlan
from common.train.conditioning import flux_latent_image_ids, flux_pack_latents, flux_unpack_latents


def make_canvas(latents: torch.Tensor) -> torch.Tensor:
    """latents [B, n, C, h, w] (target first) -> canvas [B, C, h, n*w] (width concatenation)."""
    return torch.cat(latents.unbind(1), dim=-1)


def split_canvas(canvas: torch.Tensor, n: int) -> torch.Tensor:
    """canvas [B, C, h, n*w] -> [B, n, C, h, w]."""
    return torch.stack(canvas.chunk(n, dim=-1), dim=1)


def pack_canvas(canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """canvas [B, C, h, n*w] -> (tokens [B, (h/2)(n*w/2), 4C], ids [(h/2)(n*w/2), 3])."""
    return flux_pack_latents(canvas), flux_latent_image_ids(canvas.shape[-2:], device=canvas.device)


def unpack_canvas(tokens: torch.Tensor, canvas_hw: tuple[int, int]) -> torch.Tensor:
    return flux_unpack_latents(tokens, canvas_hw)


def slot_mask(latent_hw: tuple[int, int], n: int, slot: int = 0, device=None) -> torch.Tensor:
    """bool [L] over the packed canvas tokens: True on image `slot` (0 = target)."""
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    col = torch.arange(n * w, device=device).repeat(h)
    return (col // w) == slot


def slot_ids(latent_hw: tuple[int, int], n: int, device=None) -> torch.Tensor:
    """long [L]: which image each packed canvas token belongs to."""
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    return (torch.arange(n * w, device=device).repeat(h) // w).long()


def noise_canvas(canvas: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, n: int) -> torch.Tensor:
    """x_t on the canvas [B, C, h, n*w]: (1 - s) z + s eps on the target slot, z (clean) on the references.
    sigmas [B] keep their dtype (float32 sigmas with bf16 latents give a float32 x_t, as the original's)."""
    w = canvas.shape[-1] // n
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * canvas + s * noise
    on_target = torch.arange(canvas.shape[-1], device=canvas.device) < w  # [n*w]
    return torch.where(on_target, noisy, canvas.to(noisy.dtype))


def clamp_references(x: torch.Tensor, z_ref: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x <- (1 - m) z_ref + m x: references re-set to their clean latents (m = 1 on the target slot)."""
    return (1 - m) * z_ref + m * x


def neg_mode_plan(latent_hw: tuple[int, int], n: int, text_len: int, *, device=None, backend: str = "sdpa"
                  ) -> AttentionPlan:
    """neg_mode: block-diagonal attention over the canvas (each image only itself; text sees all and is seen
    by all) - the text- and image-unconditional pass of §3.3."""
    seg = torch.cat([torch.full((text_len,), -1, dtype=torch.long, device=device), slot_ids(latent_hw, n, device)])
    return AttentionPlan(num_images=1, segments=seg, text_len=text_len, backend=backend)
