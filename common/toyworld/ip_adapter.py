"""A toy IP-Adapter for toy-sdxl: toy-clip's vision tower as the image encoder, and a small training loop.

No released IP-Adapter fits toy-sdxl, and MIP-Adapter starts from one (spec mipadapter §1.5). This module is
method-free: it builds the encoder and trains the plain ("ip-adapter", linear projection, T = 4 tokens)
IP-Adapter in the released key layout, so `common.models.ip_adapter` and `mipadapter` load it as they load
`ip-adapter_sdxl.bin`.

* Encoder: toy-clip's `vision_model` + `visual_projection` as a `CLIPVisionModelWithProjection` (64-d pooled
  image embeds of a 32 px picture; no new weights: the tensors are toy-clip's).
* Data: single-object scenes (`make_scene`, seed `seed`); the target caption drops the colour word ("a circle on
  a blue background"), so the colour must come from the reference: the same shape and colour, large and centred
  on white (on black for a white object), as MIP-Adapter's references are object crops on white.
* Training: image projection + every cross-attention layer's to_k_ip / to_v_ip (initialised as copies of the
  layer's to_k / to_v, as IP-Adapter does), through diffusers' `ImageProjection` and `IPAdapterAttnProcessor2_0`
  as `common.models.ip_adapter` installs them; epsilon MSE on VAE latents precomputed once; 10 % of samples
  drop the image (zero image embeds, the CFG negative) and 10 % the caption.
The loop uses common.train's pieces (`noise_latents`, `masked_mse`, `sdxl_add_time_ids`) but not the Trainer:
it runs in one process in about a minute, and its result is a few hundred kB committed beside the toy models.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common.toyworld.judge import ASSETS
from common.toyworld.scenes import BASE_SHAPES, IMAGE_SIZE, Scene, make_scene, render, single_object_scene

TOY_IP_ADAPTER_DIR = ASSETS / "toy-ip-adapter"
WEIGHTS = "ip_adapter.safetensors"


# --------------------------------------------------------------------------------------------------- encoder


def toy_image_encoder(path: str | os.PathLike | None = None):
    """toy-clip's vision tower + visual projection as a `common.models.image_encoders.ImageEncoder`
    (CLIPVisionModelWithProjection, projection_dim 64, 32 px, CLIP mean/std; float32, eval)."""
    from transformers import CLIPVisionModelWithProjection

    from common.models.image_encoders import ImageEncoder, default_processor
    from common.toyworld.judge import load_toy_clip

    clip = load_toy_clip(path)
    config = clip.config.vision_config
    config.projection_dim = clip.config.projection_dim  # lives on CLIPConfig, not on its vision part
    model = CLIPVisionModelWithProjection(config)
    model.load_state_dict({k: v for k, v in clip.state_dict().items()
                           if k.startswith(("vision_model.", "visual_projection."))}, strict=True)
    return ImageEncoder(model.eval().requires_grad_(False), default_processor(config.image_size))


# ------------------------------------------------------------------------------------------------------ data


def reference_scene(shape: str, color: str) -> Scene:
    """What a reference shows: the object large and centred on white (black behind a white object)."""
    return single_object_scene(shape, color, "black" if color == "white" else "white")


def colourless_caption(scene: Scene) -> str:
    """The scene's short caption without the objects' colour words: 'a circle and a square on a white background'."""
    things = " and ".join(f"a {o.shape}" for o in scene.objects)
    background = scene.background
    return f"{things} on {'an' if background[0] in 'aeiou' else 'a'} {background} background"


@dataclass
class IPData:
    """Precomputed training tensors: latents [N, 4, 16, 16] (scaled), embeds [N, 77, 64], pooled [N, 64],
    image_embeds [N, 64] (references' pooled features); empty_* the "" caption's encoding."""

    latents: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    image_embeds: torch.Tensor
    empty_embeds: torch.Tensor
    empty_pooled: torch.Tensor


@torch.no_grad()
def training_data(pipe: Any, encoder: Any, n: int, seed: int = 0, shapes: Sequence[str] = BASE_SHAPES) -> IPData:
    """`n` single-object scenes of dataset seed `seed` (targets), their colourless captions, their references."""
    scenes = [make_scene(i, seed, shapes, two_object_prob=0.0) for i in range(n)]
    pixels = torch.stack([torch.from_numpy(np.asarray(render(s), dtype=np.float32)) for s in scenes])
    pixels = pixels.permute(0, 3, 1, 2) / 127.5 - 1
    vae = pipe.vae
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
    captions = [colourless_caption(s) for s in scenes]
    embeds, _, pooled, _ = pipe.encode_prompt([*captions, ""], device=vae.device, do_classifier_free_guidance=False)
    refs = [render(reference_scene(s.objects[0].shape, s.objects[0].color)) for s in scenes]
    image_embeds = encoder.encode(refs, "pooled")
    return IPData(latents.float(), embeds[:-1], pooled[:-1], image_embeds.float(), embeds[-1:], pooled[-1:])


# -------------------------------------------------------------------------------------------------- training


def image_proj_state(projection: torch.nn.Module) -> dict[str, torch.Tensor]:
    """diffusers' `ImageProjection` back in the released keys (proj.weight/bias, norm.weight/bias)."""
    return {"proj.weight": projection.image_embeds.weight, "proj.bias": projection.image_embeds.bias,
            "norm.weight": projection.norm.weight, "norm.bias": projection.norm.bias}


def train_ip_adapter(pipe: Any, data: IPData, *, steps: int = 400, batch_size: int = 32, lr: float = 2e-3,
                     seed: int = 0, drop_image: float = 0.1, drop_text: float = 0.1, progress: bool = False
                     ) -> tuple[dict[str, dict[str, torch.Tensor]], list[float]]:
    """Train an IP-Adapter on toy-sdxl's UNet through diffusers' own IP-Adapter processors and projection
    (`common.models.ip_adapter`); the UNet is left as it was (the adapter is removed at the end).
    Returns (state in the released layout {"image_proj", "ip_adapter"}, fp32; loss per step)."""
    from diffusers import DDPMScheduler

    from common.models.ip_adapter import cross_attention_layers, load_ip_adapter, random_ip_adapter_state
    from common.train.conditioning import sdxl_add_time_ids
    from common.train.diffusion import masked_mse, noise_latents

    unet = pipe.unet
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    init = random_ip_adapter_state(unet, "plain", data.image_embeds.shape[-1], seed=seed)
    for n, _, attn in cross_attention_layers(unet):  # IP-Adapter's init: copies of the layer's to_k / to_v
        init["ip_adapter"][f"{n}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
        init["ip_adapter"][f"{n}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
    unet.requires_grad_(False)
    adapter = load_ip_adapter(unet, init, scale=1.0)
    try:
        projection = unet.encoder_hid_proj.image_projection_layers[adapter.index]
        layers = [(n, attn.processor) for n, _, attn in cross_attention_layers(unet)]
        params = [*projection.parameters()]
        params += [w for _, proc in layers for w in (proc.to_k_ip[0].weight, proc.to_v_ip[0].weight)]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        n = data.latents.shape[0]
        time_ids = sdxl_add_time_ids((IMAGE_SIZE, IMAGE_SIZE), (0, 0), (IMAGE_SIZE, IMAGE_SIZE), batch=batch_size)
        losses = []
        iterator = range(steps)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="toy IP-Adapter")
        for _ in iterator:
            idx = torch.randint(0, n, (batch_size,), generator=gen)
            draw = torch.rand(batch_size, generator=gen)
            no_image = (draw < drop_image)[:, None]
            no_text = ((draw >= drop_image) & (draw < drop_image + drop_text))[:, None]
            embeds = torch.where(no_text[..., None], data.empty_embeds, data.embeds[idx])
            pooled = torch.where(no_text, data.empty_pooled, data.pooled[idx])
            feats = torch.where(no_image, torch.zeros_like(data.image_embeds[idx]), data.image_embeds[idx])
            noised = noise_latents(scheduler, data.latents[idx], generator=gen)
            added = {"text_embeds": pooled, "time_ids": time_ids, "image_embeds": [feats[:, None]]}  # 1 image each
            pred = unet(noised.x_t, noised.t, embeds, added_cond_kwargs=added).sample
            loss = masked_mse(pred, noised.target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        state = {"image_proj": {k: v.detach().clone() for k, v in image_proj_state(projection).items()},
                 "ip_adapter": {}}
        for n, proc in layers:
            state["ip_adapter"][f"{n}.to_k_ip.weight"] = proc.to_k_ip[0].weight.detach().clone()
            state["ip_adapter"][f"{n}.to_v_ip.weight"] = proc.to_v_ip[0].weight.detach().clone()
    finally:
        adapter.remove()
        for name, p in unet.named_parameters():
            p.requires_grad_(flags[name])
    return state, losses


def save_toy_ip_adapter(state: dict[str, dict[str, torch.Tensor]], folder: str | os.PathLike = TOY_IP_ADAPTER_DIR,
                        dtype: torch.dtype = torch.float16) -> Path:
    """The released layout, flattened into `folder/ip_adapter.safetensors` (fp16, as the toy models)."""
    from common.models.ip_adapter import save_ip_adapter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cast = {k: {n: t.detach().to("cpu", dtype).contiguous() for n, t in d.items()} for k, d in state.items()}
    return save_ip_adapter(cast, folder / WEIGHTS)


def load_toy_ip_adapter_state(folder: str | os.PathLike = TOY_IP_ADAPTER_DIR) -> dict[str, dict[str, torch.Tensor]]:
    """The committed toy IP-Adapter as float32 {"image_proj", "ip_adapter"}."""
    from common.models.ip_adapter import read_ip_adapter

    state = read_ip_adapter(Path(folder) / WEIGHTS)
    return {k: {n: t.float() for n, t in d.items()} for k, d in state.items()}


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m common.toyworld.ip_adapter`: train the toy IP-Adapter on toy-sdxl and write it (fp16)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m common.toyworld.ip_adapter", description=main.__doc__)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=32, help="samples per step")
    p.add_argument("--learning_rate", type=float, default=2e-3, help="AdamW learning rate (constant)")
    p.add_argument("--scenes", type=int, default=2048, help="single-object training scenes (dataset seed --seed)")
    p.add_argument("--seed", type=int, default=0, help="scene dataset, init, batches and noise")
    p.add_argument("--output_dir", default=str(TOY_IP_ADAPTER_DIR), help="folder for ip_adapter.safetensors")
    a = p.parse_args(argv)
    from common.models.loading import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline("toy-sdxl")
    data = training_data(pipe, toy_image_encoder(), a.scenes, seed=a.seed)
    state, losses = train_ip_adapter(pipe, data, steps=a.steps, batch_size=a.batch_size, lr=a.learning_rate,
                                     seed=a.seed, progress=True)
    tenth = max(1, len(losses) // 10)
    print("loss per tenth of the run:", " ".join(f"{sum(losses[i:i + tenth]) / len(losses[i:i + tenth]):.4f}"
                                                 for i in range(0, len(losses), tenth)))
    path = save_toy_ip_adapter(state, a.output_dir)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
