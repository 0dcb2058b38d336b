"""`train_mipadapter.py --variant sdxl|sdxl_plus`: the original train_sdxl.py / train_sdxl_plus.py on the shared
Trainer (accelerate, mixed precision, multi-GPU, exact resume). Trained: exactly to_k_ip, to_v_ip and
text_to_weight of every cross-attention layer; the image projection comes from the IP-Adapter checkpoint and
stays frozen (the original computes gradients for it and throws them away). Loss: epsilon MSE, t ~ U{0..999},
DDPM noising with the model's betas (not its sampler); per sample 5% image drop, 5% text drop, 5% both (the
entity words are never dropped)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from common.cli import ArgumentParser, parse_args
from common.errors import UsageError
from common.models.image_encoders import load_image_encoder
from common.models.ip_adapter import random_ip_adapter_state, read_ip_adapter
from common.models.loading import load_pipeline, pipeline_family
from common.pipelines.conditioning import build_conditioning
from common.train import Trainer, TrainingMethod, add_training_args, compute_dtype
from common.train.conditioning import sdxl_add_time_ids
from mipadapter.adapter import WEIGHTS, write_mip_manifest
from mipadapter.data import SubjectDataset, collate, read_ids
from mipadapter.model import VARIANTS, MIPAdapter, get_variant
from mipadapter.pipeline import entity_lengths
from mipadapter.processor import STATE_KEY, MIPState


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train_mipadapter.py", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("MIP-Adapter (train_sdxl.py / train_sdxl_plus.py flags)")
    g.add_argument("--variant", choices=tuple(VARIANTS), default="sdxl",
                   help="sdxl (train_sdxl.py: ViT-bigG/14, 4 tokens) or sdxl_plus (train_sdxl_plus.py: ViT-H/14, 16)")
    g.add_argument("--pretrained_model_name_or_path", "--model", required=True,
                   help="SDXL base (sdxl) / RealVisXL_V1.0 (sdxl_plus): preset, hub id or folder")
    g.add_argument("--pretrained_ip_adapter_path", default=None,
                   help="IP-Adapter checkpoint to start from (ip-adapter_sdxl.bin / ip-adapter-plus_sdxl_vit-h.bin); "
                        "random init when omitted")
    g.add_argument("--image_encoder_path", default=None, help="CLIP vision folder or preset (default: the variant's)")
    g.add_argument("--data_root", required=True, help="folder with images/, masks/, jsons/")
    g.add_argument("--data_pkl_file", default=None,
                   help="list of sample ids (configs/selected_indexes_sam_10k.pkl; .json/.txt too; default: all)")
    g.add_argument("--eval_data_root", default="", help="customconcept101/ (accepted; in-training eval: run "
                   "scripts/eval_mipadapter.py --generate on a checkpoint instead)")
    g.add_argument("--resolution", type=int, default=512, help="training crop size")
    g.add_argument("--noise_offset", type=float, default=None, help="noise offset (default: none)")
    g.add_argument("--weight_decay", dest="adam_weight_decay", type=float, default=argparse.SUPPRESS,
                   help="AdamW weight decay (alias of --adam_weight_decay)")
    g.add_argument("--save_steps", dest="checkpointing_steps", type=int, default=argparse.SUPPRESS,
                   help="checkpoint every N steps (alias of --checkpointing_steps)")
    g.add_argument("--stop_step", dest="max_train_steps", type=int, default=argparse.SUPPRESS,
                   help="stop after N steps (alias of --max_train_steps)")
    g.add_argument("--local_rank", type=int, default=-1, help="accepted for torch.distributed launchers")
    g.add_argument("--infer_scale", type=float, default=None, help="λ written to the manifest (README: 0.75 / 0.65)")
    g.add_argument("--num_objects", type=int, default=2, choices=(2,), help="objects per sample (the data has 2)")
    g.add_argument("--num_train_imgs", type=int, default=None, help="accepted, unused (as in the original)")
    g.add_argument("--i_drop_rate", type=float, default=0.05, help="probability of dropping the reference images")
    g.add_argument("--t_drop_rate", type=float, default=0.05, help="probability of dropping the caption")
    g.add_argument("--ti_drop_rate", type=float, default=0.05, help="probability of dropping both")
    g.add_argument("--zero_gate", action="store_true",
                   help="start text_to_weight at zero (the step-0 model is then exactly the IP-Adapter)")
    add_training_args(p, output_dir="sd-ip_adapter", learning_rate=1e-4, adam_weight_decay=1e-2,
                      num_train_epochs=1000, train_batch_size=8, dataloader_num_workers=0, lr_warmup_steps=0,
                      max_grad_norm=0.0, checkpointing_steps=2000, max_train_steps=30000, validation_steps=0)
    return p


def drop_masks(draw: torch.Tensor, i_rate: float, t_rate: float, ti_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop image, drop text) bool [B] from one uniform draw per sample, as the original's rand_num bands."""
    image = draw < i_rate
    text = (draw >= i_rate) & (draw < i_rate + t_rate)
    both = (draw >= i_rate + t_rate) & (draw < i_rate + t_rate + ti_rate)
    return image | both, text | both


def kv_init(unet: torch.nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """train_sdxl.py without --pretrained_ip_adapter_path: every to_k_ip / to_v_ip starts as a copy of its layer's
    to_k / to_v (only the image projection is random). Rewrites state["ip_adapter"] in place; returns state."""
    names = list(unet.attn_processors)
    for key in list(state["ip_adapter"]):
        n, part = key.split(".")[:2]
        if part in ("to_k_ip", "to_v_ip"):
            layer = unet.get_submodule(names[int(n)].rsplit(".processor", 1)[0])
            state["ip_adapter"][key] = getattr(layer, part[:4]).weight.detach().clone()
    return state


class MIPTraining(TrainingMethod):
    name = "mipadapter"
    weights_name = "mip_adapter"

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.variant = get_variant(args.variant)
        self.adapter: MIPAdapter | None = None
        self.last_inputs: dict[str, Any] = {}

    def setup(self, accelerator) -> None:
        a, dtype, device = self.args, compute_dtype(accelerator), accelerator.device
        self.pipe = load_pipeline(a.pretrained_model_name_or_path)
        if pipeline_family(self.pipe) != "sdxl":
            raise UsageError(f"MIP-Adapter trains on SDXL, got a {pipeline_family(self.pipe)} model")
        self.pipe.set_progress_bar_config(disable=True)
        # the original's DDPMScheduler.from_pretrained(subfolder="scheduler"): DDPM noising from the model's betas,
        # not the pipeline's sampler (SDXL's Euler add_noise is x0 + sigma * eps, for a sigma-scaled input)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
            getattr(self.pipe, name).requires_grad_(False)
        self.pipe.vae.to(device, torch.float32)  # the original keeps the VAE in fp32
        self.pipe.text_encoder.to(device, dtype)
        self.pipe.text_encoder_2.to(device, dtype)
        self.unet = self.pipe.unet.to(device)
        self.encoder = load_image_encoder(a.image_encoder_path or self.variant.image_encoder, torch_dtype=dtype,
                                          device=device)
        self.encoder.model.requires_grad_(False)
        cfg = self.encoder.model.config
        feat = cfg.projection_dim if self.variant.feature == "pooled" else cfg.hidden_size
        if a.pretrained_ip_adapter_path:
            state, source = read_ip_adapter(a.pretrained_ip_adapter_path), a.pretrained_ip_adapter_path
        else:
            state, source = kv_init(self.unet, random_ip_adapter_state(self.unet, self.variant.ip, feat)), "random init"
        self.adapter = MIPAdapter(self.unet, state, source=source, variant=self.variant.name, require_gate=False,
                                  zero_gate=a.zero_gate, num_tokens=self.variant.tokens)
        if self.adapter.missing and accelerator.is_main_process:
            print(f"{source}: no text_to_weight gates for {len(self.adapter.missing)} layers (an IP-Adapter "
                  f"checkpoint): they start from {'zeros' if a.zero_gate else 'the default Linear init'}")
        if self.adapter.dropped and accelerator.is_main_process:
            print(f"{source}: dropped image_proj {', '.join(self.adapter.dropped)} (shape mismatch)")
        self.unet.to(device, dtype).requires_grad_(False)  # frozen weights in the compute dtype
        for p in self.adapter.trainable_parameters():  # trained ones in fp32 (mixed precision keeps masters)
            p.data = p.data.float()
            p.requires_grad_(True)
        self.adapter.image_proj.to(device, dtype)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet}

    def trainable_parameters(self):
        return self.adapter.trainable_parameters()

    @torch.no_grad()
    def _conditions(self, batch: dict[str, Any], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, MIPState]:
        a = self.args
        b = batch["pixel_values"].shape[0]
        drop_image, drop_text = drop_masks(batch["drop"], a.i_drop_rate, a.t_drop_rate, a.ti_drop_rate)
        captions = ["" if d else c for c, d in zip(batch["captions"], drop_text.tolist())]
        cond = build_conditioning(self.pipe, captions, do_cfg=False, device=device)
        refs = batch["ref_pixels"].to(device, self.encoder.dtype).flatten(0, 1)  # [B*2, 3, 224, 224]
        size = self.encoder.model.config.image_size
        if refs.shape[-1] != size:  # tiny encoders take 28 x 28
            refs = F.interpolate(refs, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        keep = (~drop_image).to(device).repeat_interleave(batch["ref_pixels"].shape[1])
        if self.variant.feature == "penultimate":  # plus: zero the pixels before the encoder
            feats = self.encoder._features(refs * keep[:, None, None, None].to(refs.dtype), "penultimate")
        else:  # sdxl: zero the pooled image embeds
            feats = self.encoder._features(refs, "pooled") * keep[:, None].to(refs.dtype)
        tokens = self.adapter.image_proj(feats.to(next(self.adapter.image_proj.parameters()).dtype))
        tokens = tokens.view(b, -1, *tokens.shape[1:])
        words = [w for ws in batch["words"] for w in ws]
        entity = build_conditioning(self.pipe, words, do_cfg=False, device=device).embeds
        lengths = entity_lengths(self.pipe, words).view(b, -1).to(device)
        state = MIPState(tokens, entity.view(b, -1, *entity.shape[1:]), lengths, scale=1.0)
        time_ids = sdxl_add_time_ids(batch["original_size"], batch["crop_top_left"],
                                     (a.resolution, a.resolution), dtype=cond.embeds.dtype, device=device)
        self.last_inputs = {"captions": captions, "features": feats, "drop_image": drop_image, "state": state}
        return cond.embeds, cond.pooled, time_ids, state

    def loss(self, batch: dict[str, Any], accelerator) -> torch.Tensor:
        device = accelerator.device
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, torch.float32)
            latents = self.pipe.vae.encode(pixels).latent_dist.sample() * self.pipe.vae.config.scaling_factor
            latents = latents.to(compute_dtype(accelerator))
            embeds, pooled, time_ids, state = self._conditions(batch, device)
            noise = torch.randn_like(latents)
            if self.args.noise_offset:
                noise = noise + self.args.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=device,
                                                                     dtype=latents.dtype)
            sched = self.noise_scheduler
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device)
            x_t = sched.add_noise(latents, noise, t)
            self.last_inputs.update(latents=latents, noise=noise, timesteps=t, noisy_latents=x_t)
        pred = self.unet(x_t, t, encoder_hidden_states=embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                         cross_attention_kwargs={STATE_KEY: state}).sample
        return F.mse_loss(pred.float(), noise.float())

    def state_to_save(self) -> dict[str, torch.Tensor]:
        st = self.adapter.state()
        return {f"{k}.{n}": t for k in st for n, t in st[k].items()}

    def save_final(self, directory) -> None:
        self.adapter.save(Path(directory) / WEIGHTS)
        write_mip_manifest(directory, variant=self.variant.name,
                           image_encoder=self.args.image_encoder_path or self.variant.image_encoder,
                           scale=self.args.infer_scale if self.args.infer_scale is not None else self.variant.scale,
                           info={"base": self.args.pretrained_model_name_or_path,
                                 "init": self.args.pretrained_ip_adapter_path})


def main(argv: Sequence[str] | None = None) -> Trainer:
    args = parse_args(build_parser(), argv)
    ids = read_ids(args.data_pkl_file) if args.data_pkl_file else None
    dataset = SubjectDataset(args.data_root, ids, args.resolution)
    trainer = Trainer(args, MIPTraining(args), dataset, collate_fn=collate)
    trainer.train()
    return trainer
