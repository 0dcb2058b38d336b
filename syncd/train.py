"""SynCD fine-tuning (§2): FLUX (references as clean tokens beside the target on one canvas, full joint
attention, Beta(4, 2) sigmas with the canvas resolution shift, loss on target tokens only) or SDXL
(references noised to t, their self-attention K/V written with the LoRA off and read by the target, masked
to the references' foreground). LoRA through common.train.lora; the Trainer owns the loop."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from common.attention.plan import AttentionPlan, KVBank, install_plan
from common.cli import ArgumentParser, add_model_args, parse_args
from common.errors import UsageError
from common.models.adapters import write_manifest
from common.models.loading import load_pipeline, preset_family
from common.pipelines.conditioning import build_conditioning
from common.pipelines.latents import encode_images
from common.train import Trainer, TrainingMethod, add_training_args, compute_dtype
from common.train.conditioning import flux_guidance, sdxl_add_time_ids
from common.train.flow import flow_matching_loss, resolution_shift, sample_timestep_density, shift_sigmas
from common.train.lora import add_lora, lora_disabled, save_lora_weights
from syncd.canvas import make_canvas, noise_canvas, pack_canvas, slot_mask
from syncd.checkpoint import PREFIX, RANK, SDXL_PREFIX, SDXL_TARGETS, TRAIN_TARGETS, save_syncd_checkpoint, syncd_state_dict
from syncd.data import SynCDDataset, collate

DEFAULT_MODELS = {"flux": "flux-dev", "sdxl": "bghira/terminus-xl-gamma-v1"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="SynCD: fine-tune FLUX or SDXL on multi-image SynCD tuples")
    p.add_argument("--model", default="flux", help="flux | sdxl, or a model spec whose family is used (default: flux)")
    add_model_args(p)
    p.add_argument("--train_data_dir", "--rootdir", dest="train_data_dir", nargs="+", default=None,
                   help="SynCD folder(s) with *metadata.json, images and masks/ (required)")
    p.add_argument("--resolution", "--img_size", dest="resolution", type=int, default=None,
                   help="per-image resolution (default: 512 FLUX, 1024 SDXL)")
    p.add_argument("--numref", type=int, default=-1, help="references per tuple; -1 = all images of a tuple")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: 32 FLUX, 4 SDXL)")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
    p.add_argument("--optimizer", default="prodigy", choices=("prodigy", "adamw"),
                   help="Prodigy (prodigyopt; lr 1.0) as the original, or AdamW (default: %(default)s)")
    p.add_argument("--uniform_schedule", action="store_true", help="sigmas ~ U(0,1) instead of Beta(4, 2)")
    p.add_argument("--guidance", type=float, default=1.0, help="FLUX guidance embedding in training (default: 1.0)")
    p.add_argument("--filter_aesthetics", type=float, default=-1, help="aesthetic filter threshold; -1 = off")
    p.add_argument("--filter_dino", type=float, default=-1, help="DINOv2 pair filter threshold; -1 = off")
    p.add_argument("--drop_both", type=float, default=0.05, help="P(drop text and image)")
    p.add_argument("--drop_image", type=float, default=0.05, help="P(drop image only)")
    p.add_argument("--drop_text", type=float, default=0.05, help="P(drop text only)")
    p.add_argument("--masked", action="store_true", help="SDXL: references visible through their foreground only")
    p.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens (FLUX)")
    p.add_argument("--validation_prompt", default=None, help="prompt of the validation images")
    p.add_argument("--num_validation_images", type=int, default=1, help="validation images per run")
    p.add_argument("--validation_inference_steps", type=int, default=10, help="steps of the validation sampler")
    add_training_args(p, output_dir="syncd-model", seed=23, learning_rate=None, train_batch_size=1,
                      gradient_accumulation_steps=2, adam_weight_decay=1e-4, lr_warmup_steps=0,
                      dataloader_num_workers=0, checkpointing_steps=2500, validation_steps=0)
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    model = args.model
    if model in ("flux", "sdxl"):
        args.family = model
        args.pretrained_model_name_or_path = args.pretrained_model_name_or_path or DEFAULT_MODELS[model]
    else:
        args.pretrained_model_name_or_path = args.pretrained_model_name_or_path or model
        args.family = preset_family(args.pretrained_model_name_or_path) or ("flux" if "flux" in model.lower() else "sdxl")
    if args.family not in ("flux", "sdxl"):
        raise UsageError(f"SynCD trains FLUX or SDXL, not {args.family}")
    if not args.train_data_dir:
        raise UsageError("give --train_data_dir (SynCD folders with *metadata.json)")
    if args.resolution is None:
        args.resolution = 512 if args.family == "flux" else 1024
    factor = 16 if args.family == "flux" else 8  # VAE factor (x 2 for FLUX's packed latents)
    if args.resolution <= 0 or args.resolution % factor:
        raise UsageError(f"--resolution must be a positive multiple of {factor} for {args.family}, got {args.resolution}")
    args.rank = args.rank or (RANK if args.family == "flux" else 4)
    if args.rank < 1:
        raise UsageError(f"--rank must be >= 1, got {args.rank}")
    if args.learning_rate is None:
        args.learning_rate = 1.0 if args.optimizer == "prodigy" else (1e-4 if args.family == "flux" else 5e-6)
    if args.numref == 0 or args.numref < -1:
        raise UsageError(f"--numref must be -1 (all) or >= 1, got {args.numref}")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        args.mixed_precision = "no"
    return args


class SynCDMethod(TrainingMethod):
    name = "syncd"
    weights_name = "pytorch_model"

    def __init__(self, args: argparse.Namespace, dataset: SynCDDataset):
        self.args, self.dataset = args, dataset
        self.family = args.family

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, accelerator) -> None:
        self.accelerator = accelerator
        dtype = compute_dtype(accelerator)
        self.pipe = pipe = load_pipeline(self.args.pretrained_model_name_or_path, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(accelerator.device)
        for name in ("vae", "text_encoder", "text_encoder_2"):
            mod = getattr(pipe, name, None)
            if mod is not None:
                mod.requires_grad_(False)
        alpha = self.args.lora_alpha or self.args.rank
        if self.family == "flux":
            self.transformer = pipe.transformer
            self.params = add_lora(self.transformer, self.args.rank, alpha, target_modules=list(TRAIN_TARGETS))
        else:
            self.unet = pipe.unet
            self.params = add_lora(self.unet, self.args.rank, alpha, target_modules=list(SDXL_TARGETS))
            install_plan(self.unet, "attn1")

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer} if self.family == "flux" else {"unet": self.unet}

    def trainable_parameters(self):
        return self.params

    def make_optimizer(self, params, args, lr_factor: float = 1.0) -> torch.optim.Optimizer:
        if args.optimizer == "adamw":
            from common.train.optim import make_optimizer
            return make_optimizer(params, args, lr_factor)
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UsageError("--optimizer prodigy needs prodigyopt (pip install prodigyopt); or use --optimizer adamw") from None
        return Prodigy(list(params), lr=args.learning_rate * lr_factor, weight_decay=args.adam_weight_decay,
                       decouple=True, use_bias_correction=True, safeguard_warmup=True)

    # ------------------------------------------------------------------------------------------ loss
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, n, 3, H, W] -> latents [B, n, C, h, w] (FLUX: x scaling, no shift; SDXL: diffusers')."""
        b, n = images.shape[:2]
        flat = images.flatten(0, 1).to(self.accelerator.device, self.pipe.vae.dtype)
        with torch.no_grad():
            if self.family == "flux":
                lat = self.pipe.vae.encode(flat).latent_dist.sample() * self.pipe.vae.config.scaling_factor
            else:
                lat = encode_images(self.pipe.vae, flat)
        return lat.float().unflatten(0, (b, n))

    def loss(self, batch: dict[str, Any], accelerator) -> tuple[torch.Tensor, dict[str, float]]:
        return self._flux_loss(batch) if self.family == "flux" else self._sdxl_loss(batch)

    def _flux_loss(self, batch):
        device = self.accelerator.device
        lat = self._encode(batch["images"])
        b, n, c, h, w = lat.shape
        canvas = make_canvas(lat)
        scheme = "uniform" if self.args.uniform_schedule else "beta"
        u = sample_timestep_density(scheme, b, beta_a=4.0, beta_b=2.0, device=device)
        seq = canvas.shape[-2] * canvas.shape[-1] // 4
        sigmas = shift_sigmas(u, resolution_shift(seq))
        noise = torch.randn_like(canvas)
        x_t = noise_canvas(canvas, noise, sigmas, n)
        tokens, img_ids = pack_canvas(x_t)
        target = pack_canvas(noise - canvas)[0]
        with torch.no_grad():
            cond = build_conditioning(self.pipe, batch["prompts"], do_cfg=False, device=device,
                                      max_sequence_length=self.args.max_sequence_length)
        dtype = next(self.transformer.parameters()).dtype
        pred = self.transformer(hidden_states=tokens.to(dtype), timestep=sigmas.to(dtype),
                                guidance=flux_guidance(self.pipe.transformer, self.args.guidance, b, device=device),
                                pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                                txt_ids=cond.text_ids, img_ids=img_ids, return_dict=False)[0]
        mask = slot_mask((h, w), n, 0, device)
        loss = flow_matching_loss(pred.float(), target.float(), token_mask=mask)
        return loss, {"sigma": sigmas.mean()}

    def _sdxl_loss(self, batch):
        device = self.accelerator.device
        lat = self._encode(batch["images"])
        b, n, c, h, w = lat.shape
        sched = self.pipe.scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=device)
        noise = torch.randn_like(lat)
        tt = t.repeat_interleave(n)
        noisy = sched.add_noise(lat.flatten(0, 1), noise.flatten(0, 1), tt).unflatten(0, (b, n))
        with torch.no_grad():
            cond = build_conditioning(self.pipe, batch["prompts"], do_cfg=False, device=device)
        res = self.args.resolution
        time_ids = sdxl_add_time_ids((res, res), (0, 0), (res, res), batch=b, device=device)
        dtype = next(self.unet.parameters()).dtype
        masks = batch["masks"][:, 1:].flatten(0, 1).to(device) if self.args.masked else None
        bank = KVBank(mode="write", masks=masks)
        refs = noisy[:, 1:].flatten(0, 1)
        rep = lambda x: x.repeat_interleave(n - 1, 0)
        with torch.no_grad(), lora_disabled(self.unet):
            self.unet(refs.to(dtype), t.repeat_interleave(n - 1), encoder_hidden_states=rep(cond.embeds),
                      added_cond_kwargs={"text_embeds": rep(cond.pooled), "time_ids": rep(time_ids)},
                      cross_attention_kwargs={"plan": AttentionPlan(kv_bank=bank)}, return_dict=False)
        bank.mode = "read"
        bank.read_index = torch.arange(b * (n - 1), device=device).view(b, n - 1)
        pred = self.unet(noisy[:, 0].to(dtype), t, encoder_hidden_states=cond.embeds,
                         added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids},
                         cross_attention_kwargs={"plan": AttentionPlan(kv_bank=bank)}, return_dict=False)[0]
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(lat[:, 0], noise[:, 0], t)
        else:
            target = noise[:, 0]
        return F.mse_loss(pred.float(), target.float()), {}

    # ------------------------------------------------------------------------------------------ outputs
    def state_to_save(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.transformer if self.family == "flux" else self.unet)
        return syncd_state_dict(model, PREFIX if self.family == "flux" else SDXL_PREFIX)

    def save_final(self, directory) -> None:
        directory = Path(directory)
        model = self.accelerator.unwrap_model(self.transformer if self.family == "flux" else self.unet)
        save_syncd_checkpoint(model, directory / f"{self.weights_name}.safetensors",
                              PREFIX if self.family == "flux" else SDXL_PREFIX)
        # the same LoRA in diffusers' format + a kind "lora" manifest, so `apply_adapter(pipe, <dir>/lora)` and
        # every plain sampler can load it (without references it is only the fine-tuned base)
        save_lora_weights(directory / "lora", family=self.family,
                          **({"transformer": model} if self.family == "flux" else {"unet": model}))
        write_manifest(directory, kind="syncd", base_family=self.family, weights=f"{self.weights_name}.safetensors",
                       info={"rank": self.args.rank, "lora_alpha": self.args.lora_alpha or self.args.rank,
                             "resolution": self.args.resolution,
                             "base_model": self.args.pretrained_model_name_or_path})

    def validate(self, step: int) -> list:
        if self.family != "flux" or not self.args.validation_prompt:
            return []
        from syncd.pipeline import generate

        item = self.dataset[0]
        refs = item["images"][1:]
        g = torch.Generator(self.accelerator.device).manual_seed(self.args.seed)
        return generate(self.pipe, self.args.validation_prompt, refs, num_inference_steps=self.args.validation_inference_steps,
                        generator=g, num_images=self.args.num_validation_images, progress=False)


def main(argv: Sequence[str] | None = None) -> Trainer:
    args = resolve_args(parse_args(build_parser(), argv))
    dataset = SynCDDataset(args.train_data_dir, args.resolution, args.numref, args.filter_aesthetics,
                           args.filter_dino, args.drop_both, args.drop_image, args.drop_text)
    method = SynCDMethod(args, dataset)
    trainer = Trainer(args, method, dataset, collate_fn=collate)
    trainer.train()
    return trainer


__all__ = ["SynCDMethod", "build_parser", "main"]
