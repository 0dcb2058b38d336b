"""MuDI training: Seg-Mix LoRA on SDXL (DCO by default) or FLUX (flow matching), flags of the original
`train_segmix_lora_sdxl.py` / `flux/train_segmix_lora_flux.py`.

What is MuDI's lives here and in mudi.data / mudi.losses: the Seg-Mix data, the masked loss, DCO against the
same network with its LoRA off, the masked prior loss, `save-N` LoRA dumps. LoRA comes from common.train.lora,
the loop / accelerate / resume from common.train.Trainer, SDXL and FLUX training inputs from
common.train.conditioning / common.train.flow.

Where we differ on purpose (README "MuDI"): the FLUX loss is masked by the Seg-Mix map (the original computes
it and never uses it); the DCO reference disables every LoRA, text encoders' included (the original keeps the
text-encoder LoRA on in its reference); the SDXL Seg-Mix mask map has the latent size of --resolution (the
original hard-codes 128x128, which breaks any resolution but 1024); --random_flip works on SDXL too; prior
preservation also works on FLUX; with prior preservation DCO's reference uses the instance half only; LoRA
weights stay float32 under bf16; --snr_gamma, EDM-style training, Prodigy, kohya export and cached latents are
refused with a message instead of failing later. As the original (tests/mudi/test_mudi_original.py): DCO as
-logsigmoid(-beta diff), latents / noise dtype, FLUX's noise-then-u draw order, the LoRA initialisation.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.cli import ArgumentParser, parse_args
from common.errors import UsageError
from common.io import atomic_write_json
from common.models.loading import load_model, load_pipeline, pipeline_family, preset_family, resolve_spec
from common.pipelines.latents import encode_images
from common.pipelines.prompts import encode_tokens, tokenize
from common.pipelines.text2image import generate
from common.train import Trainer, TrainingMethod, add_training_args, compute_dtype, place_frozen
from common.train.conditioning import flux_guidance, flux_latent_image_ids, flux_pack_latents, flux_unpack_latents, \
    sdxl_add_time_ids
from common.train.diffusion import noise_latents
from common.train.flow import flow_interpolate, loss_weighting, sample_timestep_density, scheduler_sigmas
from common.train.lora import TEXT_ENCODER_TARGET_MODULES, add_lora, lora_disabled, save_lora_weights
from mudi.data import MuDIDataset, SegMixOptions, collate
from mudi.losses import dco_loss, masked_mean_mse
from mudi.metadata import CLASS_METADATA_FILE, read_metadata

#: MuDI trains the attention projections only (also on FLUX, unlike diffusers' FLUX default list).
MUDI_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
#: Defaults that differ between the two original trainers: (SDXL, FLUX).
FAMILY_DEFAULTS = {
    "segmix_prob": (0.6, 0.3),
    "checkpointing_steps": (500, 20000),
    "mixed_precision": ("fp16", None),
    "output_dir": ("lora-dreambooth-model", "flux-dreambooth-lora"),
    "dco_beta": (1000.0, 0.0),
}
MODEL_ALIASES = {"flux": "flux-dev"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="MuDI: Seg-Mix LoRA training of SDXL (DCO) or FLUX on several subjects.")
    m = p.add_argument_group("model")
    m.add_argument("--pretrained_model_name_or_path", "--model", dest="pretrained_model_name_or_path",
                   default="sdxl", help="base model: sdxl, flux (= flux-dev), tiny-sdxl, tiny-flux, a hub id or folder; "
                                        "its family picks the SDXL or the FLUX trainer")
    m.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="SDXL: another VAE (the README uses madebyollin/sdxl-vae-fp16-fix)")
    m.add_argument("--revision", default=None, help="hub revision of the base model")
    m.add_argument("--variant", default=None, help="weights variant of the base model, e.g. fp16")
    d = p.add_argument_group("data")
    d.add_argument("--instance_data_dir", default=None, help="folder with metadata.jsonl, images and masks (required)")
    d.add_argument("--dataset_name", default=None, help="not supported: MuDI needs masks; use --instance_data_dir")
    d.add_argument("--dataset_config_name", default=None, help="unused (see --dataset_name)")
    d.add_argument("--cache_dir", default=None, help="hub cache folder for the base model")
    d.add_argument("--image_column", default="image", help="unused: metadata.jsonl uses file_name (as the original)")
    d.add_argument("--caption_column", default="text", help="unused: metadata.jsonl uses text (as the original)")
    d.add_argument("--repeats", type=int, default=1, help="repeat the instance images this many times per epoch")
    d.add_argument("--class_data_dir", default=None,
                   help=f"prior images with masks and {CLASS_METADATA_FILE} (scripts/prior_mudi.py writes one)")
    d.add_argument("--class_prompt", default=None, help="unused: class prompts come from class_metadata.jsonl")
    d.add_argument("--with_prior_preservation", action="store_true", help="add the (masked) prior-preservation loss")
    d.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the prior loss")
    d.add_argument("--num_class_images", type=int, default=100,
                   help="with prior preservation an epoch has max(instance images x repeats, min(files in "
                        "--class_data_dir, N)) items, as the original (class images are made by scripts/prior_mudi.py)")
    d.add_argument("--sample_batch_size", type=int, default=4, help="unused here: see scripts/prior_mudi.py")
    d.add_argument("--prior_generation_precision", default=None, help="unused here: see scripts/prior_mudi.py")
    d.add_argument("--resolution", type=int, default=None, help="training size (default: SDXL 1024, FLUX 512)")
    d.add_argument("--center_crop", action="store_true", help="center crop (else random crop) after resizing")
    d.add_argument("--random_flip", action="store_true", help="flip subjects horizontally with probability 1/2")
    s = p.add_argument_group("MuDI")
    s.add_argument("--segmix_prob", type=float, default=None,
                   help="probability of a Seg-Mix sample per item (default: SDXL 0.6, FLUX 0.3; README 0.3)")
    s.add_argument("--segmix_start_step", type=int, default=0, help="optimizer step from which Seg-Mix is on")
    s.add_argument("--segmix_num_subjects", type=int, default=2,
                   help="subjects per Seg-Mix composite (the original: 2); needs that many ids")
    s.add_argument("--relative_scale", type=float, default=0.0,
                   help="0: random scales; s > 0: the 2nd id at s x the 1st; s < 0: the 1st at |s| x the 2nd")
    s.add_argument("--soft_alpha", type=float, default=1.0,
                   help="loss weight of Seg-Mix background (1: no masking, 0: subjects only)")
    s.add_argument("--dco_beta", type=float, default=None,
                   help="DCO beta; > 0 uses DCO against the LoRA-free model, 0 the plain masked MSE "
                        "(default: SDXL 1000, FLUX 0)")
    s.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank); README: 32")
    s.add_argument("--use_dora", action="store_true", help="DoRA instead of LoRA (SDXL)")
    s.add_argument("--train_text_encoder", action="store_true", help="also LoRA on the CLIP text encoder(s)")
    s.add_argument("--text_encoder_lr", type=float, default=5e-6, help="learning rate of the text-encoder LoRA")
    s.add_argument("--adam_weight_decay_text_encoder", type=float, default=1e-3, help="weight decay of the text LoRA")
    s.add_argument("--save_steps", type=int, default=500,
                   help="dump the LoRA every N steps: SDXL output_dir/save-N (from --segmix_start_step on), "
                        "FLUX output_dir/step_N, as the originals")
    s.add_argument("--validation_prompt", default=None, help="prompt sampled during training")
    s.add_argument("--num_validation_images", type=int, default=4, help="images per validation")
    s.add_argument("--validation_epochs", type=int, default=50,
                   help="validate every N epochs (used unless --validation_steps is given)")
    s.add_argument("--snr_gamma", type=float, default=None, help="not supported (the original raises too)")
    s.add_argument("--do_edm_style_training", action="store_true", help="not supported (shape bug in the original)")
    f = p.add_argument_group("FLUX")
    f.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens")
    f.add_argument("--guidance_scale", type=float, default=3.5, help="guidance embedding value (README: 1)")
    f.add_argument("--weighting_scheme", default="none", choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
                   help="timestep density / loss weighting")
    f.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal mean")
    f.add_argument("--logit_std", type=float, default=1.0, help="logit_normal std")
    f.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode density")
    f.add_argument("--cache_latents", action="store_true", help="not supported: Seg-Mix composes new images")
    f.add_argument("--upcast_before_saving", action="store_true", help="no-op: the LoRA trains in float32")
    f.add_argument("--wandb_name", default=None, help="tracker run name")
    c = p.add_argument_group("compatibility")
    c.add_argument("--optimizer", default="AdamW", help="AdamW (Prodigy is not supported here)")
    for name in ("prodigy_beta3",):
        c.add_argument(f"--{name}", type=float, default=None, help="Prodigy only (unsupported)")
    for name in ("prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup"):
        c.add_argument(f"--{name}", type=lambda v: str(v).lower() in ("1", "true", "yes"), default=True,
                       help="Prodigy only (unsupported)")
    c.add_argument("--output_kohya_format", action="store_true", help="not supported (diffusers format only)")
    c.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="no-op: attention runs through torch SDPA")
    c.add_argument("--local_rank", type=int, default=-1, help="set by launchers; accelerate reads the env")
    c.add_argument("--push_to_hub", action="store_true", help="not supported: upload output_dir yourself")
    c.add_argument("--hub_token", default=None, help="unused")
    c.add_argument("--hub_model_id", default=None, help="unused")
    add_training_args(p, output_dir=None, seed=None, learning_rate=1e-4, adam_weight_decay=1e-4,
                      dataloader_num_workers=0, checkpointing_steps=None, mixed_precision=None,
                      validation_steps=None)
    return p


def model_family(spec: str) -> str:
    """sdxl or flux, from a preset / hub id, or a local folder's model_index.json."""
    family = preset_family(spec)
    index = Path(spec) / "model_index.json"
    if family is None and index.is_file():
        name = json.loads(index.read_text()).get("_class_name", "")
        family = "flux" if name.startswith("Flux") else "sdxl" if "XL" in name else None
    return family or "sdxl"


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill family-dependent defaults and refuse what is not supported, before anything loads."""
    args.pretrained_model_name_or_path = MODEL_ALIASES.get(args.pretrained_model_name_or_path,
                                                           args.pretrained_model_name_or_path)
    family = model_family(args.pretrained_model_name_or_path)
    if family not in ("sdxl", "flux"):
        raise UsageError(f"MuDI trains SDXL or FLUX, not a {family} model")
    args.family = family
    column = 0 if family == "sdxl" else 1
    for name, values in FAMILY_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[column])
    if args.resolution is None:
        args.resolution = 1024 if family == "sdxl" else 512
    if args.seed is None:
        args.seed = 0
    refused = {
        "dataset_name": "--dataset_name is not supported: MuDI needs masks; pass --instance_data_dir with metadata.jsonl",
        "snr_gamma": "--snr_gamma is not supported (the original raises NotImplementedError)",
        "do_edm_style_training": "--do_edm_style_training is not supported (the original mis-weights the loss)",
        "cache_latents": "--cache_latents is not supported: Seg-Mix composes new images every step",
        "output_kohya_format": "--output_kohya_format is not supported; the LoRA is saved in diffusers format",
        "push_to_hub": "--push_to_hub is not supported; upload --output_dir with `hf upload` afterwards",
    }
    for name, message in refused.items():
        if getattr(args, name):
            raise UsageError(message)
    if args.optimizer.lower() != "adamw":
        raise UsageError(f"--optimizer {args.optimizer} is not supported here; use AdamW")
    if not args.instance_data_dir:
        raise UsageError("give --instance_data_dir (a folder with metadata.jsonl, images and masks)")
    if args.with_prior_preservation and not args.class_data_dir:
        raise UsageError("--with_prior_preservation needs --class_data_dir (make one with scripts/prior_mudi.py)")
    if args.rank < 1:
        raise UsageError(f"--rank must be >= 1, got {args.rank}")
    if args.save_steps < 1:
        raise UsageError(f"--save_steps must be >= 1, got {args.save_steps}")
    if args.dco_beta < 0:
        raise UsageError(f"--dco_beta must be >= 0, got {args.dco_beta}")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        args.mixed_precision = "no"  # fp16 autocast needs a GPU; the CPU runs float32
    return args


def build_dataset(args: argparse.Namespace) -> MuDIDataset:
    meta = read_metadata(args.instance_data_dir)
    class_meta = read_metadata(args.class_data_dir, CLASS_METADATA_FILE) if args.with_prior_preservation else None
    options = SegMixOptions(resolution=args.resolution, segmix_prob=args.segmix_prob,
                            segmix_start_step=args.segmix_start_step, relative_scale=args.relative_scale,
                            soft_alpha=args.soft_alpha, num_subjects=args.segmix_num_subjects,
                            center_crop=args.center_crop, random_flip=args.random_flip, model=args.family,
                            repeats=args.repeats, num_class_images=args.num_class_images)
    return MuDIDataset(meta, options, class_meta)


def training_latent_dtype(family: str, vae_override: str | None, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the training latents (and so of the noise drawn like them), as the original trainers:
    FLUX casts to the mixed-precision dtype; SDXL too, except with --pretrained_vae_model_name_or_path (the
    README's fp16-fix VAE), where the float32 VAE output is kept."""
    if family == "sdxl" and vae_override:
        return torch.float32
    return weight_dtype


class MuDIMethod(TrainingMethod):
    """Trainable: LoRA on the denoiser's attention (and optionally on the CLIP text encoders)."""

    name = "mudi"
    weights_name = "pytorch_lora_weights"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.family = args.family
        self.final_step: int | None = None

    # -------------------------------------------------------------------------------------------- setup
    def setup(self, accelerator) -> None:
        args = self.args
        self.accelerator, self.device = accelerator, accelerator.device
        kw = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
        pipe = load_pipeline(args.pretrained_model_name_or_path, **kw)
        if pipeline_family(pipe) != self.family:
            raise UsageError(f"{args.pretrained_model_name_or_path} is a {pipeline_family(pipe)} pipeline, "
                             f"expected {self.family}")
        if args.pretrained_vae_model_name_or_path:
            from diffusers import AutoencoderKL

            pipe.vae = load_model(resolve_spec(args.pretrained_vae_model_name_or_path), AutoencoderKL)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        dtype = compute_dtype(accelerator)
        pipe.vae.requires_grad_(False)
        place_frozen(pipe.vae, self.device, torch.float32 if self.family == "sdxl" else dtype)  # SDXL VAE overflows in fp16
        self.text_encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
        for enc in self.text_encoders:
            enc.requires_grad_(False)
            place_frozen(enc, self.device, dtype)
        denoiser = pipe.unet if self.family == "sdxl" else pipe.transformer
        denoiser.requires_grad_(False)
        place_frozen(denoiser, self.device, dtype)
        self.lora_params = add_lora(denoiser, args.rank, target_modules=MUDI_TARGET_MODULES,
                                    use_dora=args.use_dora)
        self.text_lora_params: list[torch.nn.Parameter] = []
        if args.train_text_encoder:
            # SDXL: both CLIP encoders; FLUX: the CLIP encoder only (as the original)
            trained = self.text_encoders if self.family == "sdxl" else self.text_encoders[:1]
            for enc in trained:
                self.text_lora_params += add_lora(enc, args.rank, target_modules=TEXT_ENCODER_TARGET_MODULES)
        if self.family == "sdxl":
            from diffusers import DDPMScheduler

            self.unet = denoiser
            self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        else:
            from diffusers import FlowMatchEulerDiscreteScheduler

            self.transformer = denoiser
            self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        for i, enc in enumerate(self.text_encoders):
            setattr(self, self._encoder_attr(i), enc)

    @staticmethod
    def _encoder_attr(i: int) -> str:
        return "text_encoder" if i == 0 else f"text_encoder_{i + 1}"

    @property
    def denoiser_name(self) -> str:
        return "unet" if self.family == "sdxl" else "transformer"

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {self.denoiser_name: getattr(self, self.denoiser_name)}
        if self.args.train_text_encoder:
            n = len(self.text_encoders) if self.family == "sdxl" else 1
            mods.update({self._encoder_attr(i): self.text_encoders[i] for i in range(n)})
        return mods

    def trainable_parameters(self) -> list[dict[str, Any]]:
        groups = [{"params": self.lora_params, "lr": self.args.learning_rate}]
        if self.text_lora_params:
            groups.append({"params": self.text_lora_params, "lr": self.args.text_encoder_lr,
                           "weight_decay": self.args.adam_weight_decay_text_encoder})
        return groups

    # ------------------------------------------------------------------------------------------ prompts
    def _encoders(self) -> list[torch.nn.Module]:
        return [getattr(self, self._encoder_attr(i)) for i in range(len(self.text_encoders))]

    def _encode_sdxl(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.args.train_text_encoder and torch.is_grad_enabled()):
            return encode_tokens(self._encoders(), tokenize(self.pipe, prompts), "sdxl")

    def _encode_flux(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pipe = self.pipe
        length = min(self.args.max_sequence_length, pipe.tokenizer_2.model_max_length)
        with torch.no_grad():
            t5 = pipe._get_t5_prompt_embeds(prompts, 1, length, self.device)
        with torch.set_grad_enabled(self.args.train_text_encoder and torch.is_grad_enabled()):
            ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            pooled = self._encoders()[0](ids, output_hidden_states=False).pooler_output
        return t5, pooled, torch.zeros(t5.shape[1], 3, device=self.device, dtype=t5.dtype)

    # --------------------------------------------------------------------------------------------- loss
    def save_dir(self, step: int) -> Path | None:
        """Where the LoRA is dumped after optimizer step N, as the original trainers: SDXL `save-N` for N a multiple
        of --save_steps and N >= --segmix_start_step; FLUX `step_N` at every multiple (no start condition)."""
        args = self.args
        if step <= 0 or step % args.save_steps:
            return None
        if self.family == "sdxl":
            return Path(args.output_dir) / f"save-{step}" if step >= args.segmix_start_step else None
        return Path(args.output_dir) / f"step_{step}"

    def on_step_start(self, step: int) -> None:
        """Dump the LoRA of step N (see `save_dir`) when step N + 1 starts."""
        target = self.save_dir(step)
        if target is not None and self.accelerator.is_main_process:
            self.save_final(target)

    def _predict(self, latents: torch.Tensor, prompts: list[str], noise_draw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) [B, C, h, w] for the current LoRA state; `noise_draw` fixes noise and t."""
        if self.family == "sdxl":
            embeds, pooled = self._encode_sdxl(prompts)
            r = self.args.resolution
            time_ids = sdxl_add_time_ids((r, r), (0, 0), (r, r), batch=len(prompts), device=self.device,
                                         dtype=embeds.dtype)
            dtype = self.pipe.unet.dtype
            pred = self.unet(noise_draw["x_t"].to(dtype), noise_draw["t"], embeds.to(dtype),
                             added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}).sample
            return pred.float(), noise_draw["target"]
        t5, pooled, text_ids = self._encode_flux(prompts)
        dtype = self.pipe.transformer.dtype
        h, w = latents.shape[-2:]
        guidance = flux_guidance(self.pipe.transformer, self.args.guidance_scale, len(prompts), device=self.device)
        packed = self.transformer(hidden_states=flux_pack_latents(noise_draw["x_t"]).to(dtype),
                                  timestep=(noise_draw["t"] / 1000).to(dtype), guidance=guidance,
                                  pooled_projections=pooled.to(dtype), encoder_hidden_states=t5.to(dtype),
                                  txt_ids=text_ids, img_ids=flux_latent_image_ids((h, w), device=self.device),
                                  return_dict=False)[0]
        return flux_unpack_latents(packed, (h, w)).float(), noise_draw["target"]

    def _noise(self, latents: torch.Tensor) -> dict[str, Any]:
        """SDXL: noise, then t ~ U{0..999} (DDPM). FLUX, as the original: noise first, then u on the CPU
        generator (diffusers' compute_density_for_timestep_sampling), sigmas and weights in the latents' dtype."""
        if self.family == "sdxl":
            n = noise_latents(self.noise_scheduler, latents)
            return {"x_t": n.x_t, "t": n.t, "target": n.target, "weight": None}
        args = self.args
        noise = torch.randn_like(latents)
        u = sample_timestep_density(args.weighting_scheme, len(latents), logit_mean=args.logit_mean,
                                    logit_std=args.logit_std, mode_scale=args.mode_scale, device="cpu")
        sigmas, timesteps = scheduler_sigmas(u, self.noise_scheduler)
        sigmas = sigmas.to(latents.device, latents.dtype)
        x_t, target = flow_interpolate(latents, noise, sigmas)
        return {"x_t": x_t, "t": timesteps.to(latents.device), "target": target,
                "weight": loss_weighting(args.weighting_scheme, sigmas).float()}

    def loss(self, batch: dict[str, Any], accelerator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        args = self.args
        pixels = batch["pixel_values"].to(self.device, dtype=self.pipe.vae.dtype)
        with torch.no_grad():
            latents = encode_images(self.pipe.vae, pixels)
        latents = latents.to(training_latent_dtype(self.family, self.args.pretrained_vae_model_name_or_path,
                                                   compute_dtype(accelerator)))
        mask = batch["mask_map"].to(self.device)
        if mask.shape[-2:] != latents.shape[-2:]:  # a VAE whose factor is not SDXL's / FLUX's 8 (e.g. toy-sdxl's 2)
            mask = torch.nn.functional.interpolate(mask.float(), size=latents.shape[-2:], mode="nearest").to(mask.dtype)
        draw = self._noise(latents)
        if draw["weight"] is not None:  # FLUX's SD3 loss weighting, folded into the per-sample mask
            mask = mask * draw["weight"].reshape(-1, 1, 1, 1).to(mask)
        pred, target = self._predict(latents, batch["prompts"], draw)
        n = batch["num_instance"]
        model_loss = masked_mean_mse(pred[:n], target[:n], mask[:n])
        logs: dict[str, torch.Tensor] = {"model_loss": model_loss.detach()}
        loss = model_loss
        if args.dco_beta > 0:
            with torch.no_grad(), self._all_lora_off():
                ref_pred, _ = self._predict(latents[:n], batch["prompts"][:n], {k: v[:n] if torch.is_tensor(v) else v
                                                                               for k, v in draw.items()})
                ref_loss = masked_mean_mse(ref_pred, target[:n], mask[:n])
            loss = dco_loss(model_loss, ref_loss, args.dco_beta)
            logs["ref_loss"] = ref_loss.detach()
        if batch["has_class"]:
            prior = masked_mean_mse(pred[n:], target[n:], mask[n:])
            loss = loss + args.prior_loss_weight * prior
            logs["prior_loss"] = prior.detach()
        return loss, logs

    def _all_lora_off(self):
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(lora_disabled(getattr(self, self.denoiser_name)))
        if self.args.train_text_encoder:
            for name in list(self.modules())[1:]:
                stack.enter_context(lora_disabled(getattr(self, name)))
        return stack

    # --------------------------------------------------------------------------------------------- save
    def state_to_save(self) -> dict[str, torch.Tensor]:
        from common.train.lora import lora_state_dict

        return lora_state_dict(getattr(self, self.denoiser_name))

    def save_final(self, directory) -> None:
        unwrap = self.accelerator.unwrap_model
        kw: dict[str, Any] = {self.denoiser_name: unwrap(getattr(self, self.denoiser_name))}
        if self.args.train_text_encoder:
            kw["text_encoder"] = unwrap(self.text_encoder)
            if self.family == "sdxl":
                kw["text_encoder_2"] = unwrap(self.text_encoder_2)
        meta = read_metadata(self.args.instance_data_dir)
        tokens = [phrase.split()[0] for phrase in meta.id_map.values()]
        save_lora_weights(directory, family=self.family, tokens=tokens, **kw)
        atomic_write_json(Path(directory) / "mudi_config.json",  # what sampling and evaluation need to know
                          {"family": self.family, "id_map": meta.id_map, "rank": self.args.rank,
                           "resolution": self.args.resolution})
        final = self.final_step
        target = self.save_dir(final) if final else None
        if Path(directory) == Path(self.args.output_dir) and target is not None:
            self.save_final(target)

    def validate(self, step: int) -> list:
        args = self.args
        if not args.validation_prompt:
            return []
        generator = torch.Generator(self.device).manual_seed(args.seed)
        with self.accelerator.autocast():
            return generate(self.pipe, [args.validation_prompt] * args.num_validation_images, num_inference_steps=25,
                            generator=generator, height=args.resolution, width=args.resolution,
                            guidance_scale=None if self.family == "sdxl" else args.guidance_scale,
                            output_type="pil", progress=False)


def main(argv: Sequence[str] | None = None) -> Trainer:
    args = resolve_args(parse_args(build_parser(), argv))
    dataset = build_dataset(args)  # validates metadata, masks and flags before any model loads
    method = MuDIMethod(args)
    trainer = Trainer(args, method, dataset, collate_fn=collate)
    if args.validation_steps is None:
        args.validation_steps = args.validation_epochs * trainer.steps_per_epoch if args.validation_prompt else 0
    method.final_step = trainer.max_train_steps
    trainer.train()
    return trainer


__all__ = ["MuDIMethod", "build_parser", "main", "training_latent_dtype"]
