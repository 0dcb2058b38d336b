"""Custom Diffusion training (single concept, or joint multi-concept from --concepts_list), SD-1.x and SDXL.

What is special to the method lives here: which parameters train (cross-attention K/V through
customdiffusion.attention, plus the new modifier-token rows), the masked loss of the resize augmentation
(customdiffusion.data), prior preservation, and the output layout. The loop, checkpoints, resume, mixed
precision and multi-GPU come from common.train; flags follow diffusers' train_custom_diffusion.py.

Choices that differ from the upstream script (and why):
* the token-embedding matrix trains in its own param group whose AdamW weight decay is applied to the
  modifier rows only (by `after_backward`, with AdamW's factor 1 - lr * wd, before its update, as AdamW
  orders them), so those rows follow the upstream update exactly and the other rows stay bit-identical
  (upstream zeroes their gradients but AdamW's decay still shrinks them);
* the instance loss is the mean over unmasked latent cells *and channels* (spec §1.5), the scale of the prior
  term, so `--prior_loss_weight 1` is the paper's 1:1 balance; diffusers' example divides by the one-channel
  mask count (4x ours, its prior weighs 4x less): `--loss_normalization diffusers` reproduces it;
* the loss mask's latent factor is measured from the VAE (any downsampling), as diffusers' example does;
* `--initializer_token` words resolve as the original code's slow-tokenizer `encode([word])` did: a word that
  is a vocabulary entry is that bare entry ("pll" -> 47629, the LDM code's hard-coded row, not "pll</w>").
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from common.cli import ArgumentParser, parse_args
from common.data import check_images, list_images
from common.errors import UsageError
from common.models.loading import load_pipeline, pipeline_family
from common.models.tokens import add_tokens_to_pipeline, mask_embedding_grad, split_plus, text_pairs
from common.pipelines.class_images import count_images, ensure_class_images
from common.pipelines.latents import encode_images
from common.pipelines.prompts import encode_tokens, tokenize
from common.pipelines.text2image import generate
from common.train import Trainer, TrainingMethod, add_training_args, compute_dtype, place_frozen
from common.train.conditioning import sdxl_add_time_ids
from common.train.diffusion import noise_latents
from customdiffusion import attention
from customdiffusion.adapter import write_concept_manifest
from customdiffusion.data import Concept, CustomDiffusionDataset, collate, load_concepts_list
from customdiffusion.formats import CustomDiffusionWeights, save, save_diffusers
from customdiffusion.loss import LOSS_NORMALIZATIONS, custom_diffusion_loss

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Custom Diffusion: fine-tune cross-attention K/V and modifier tokens.")
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", "--model", dest="pretrained_model_name_or_path",
                       default=DEFAULT_MODEL, help="base model: preset (sd14, sdxl, tiny-sd, ...), hub id or folder")
    model.add_argument("--revision", default=None, help="hub revision of the base model")
    model.add_argument("--variant", default=None, help="weights variant of the base model, e.g. fp16")
    model.add_argument("--tokenizer_name", default=None, help="unused (the base model's tokenizer is used); "
                                                              "kept for flag compatibility")
    data = parser.add_argument_group("data")
    data.add_argument("--instance_data_dir", default=None, help="folder of the concept's images")
    data.add_argument("--instance_prompt", default=None, help='prompt of the concept, e.g. "photo of a <new1> cat"')
    data.add_argument("--class_data_dir", default=None, help="folder of prior-preservation (class) images")
    data.add_argument("--class_prompt", default=None, help='prompt of the class images, e.g. "cat"')
    data.add_argument("--concepts_list", default=None,
                      help="JSON list of {instance_prompt, class_prompt, instance_data_dir, class_data_dir} for "
                           "joint multi-concept training (CustomConcept101 dataset.json entries work)")
    data.add_argument("--with_prior_preservation", action="store_true", help="add the class-image prior loss")
    data.add_argument("--real_prior", action="store_true",
                      help="class images are real ones listed in class_data_dir/images.txt with caption.txt")
    data.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the prior loss")
    data.add_argument("--num_class_images", type=int, default=100,
                      help="class images per concept; missing ones are generated with the base model")
    data.add_argument("--sample_batch_size", type=int, default=4, help="batch size for generating class images")
    data.add_argument("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"],
                      help="dtype for generating class images (default: fp16 on a GPU, else fp32, as the original)")
    data.add_argument("--resolution", type=int, default=None,
                      help="training image size (default: the model's native size, 512 for SD-1.x, 1024 for SDXL, "
                           "the defaults of the original SD and SDXL scripts)")
    data.add_argument("--center_crop", action="store_true", help="center-crop class images (else random crop)")
    data.add_argument("--hflip", action="store_true", help="random horizontal flips")
    data.add_argument("--noaug", action="store_true", help="turn off the resize augmentation")
    data.add_argument("--crops_coords_top_left_h", type=int, default=0,
                      help="SDXL: crop top coordinate put in the UNet's time ids (the original SDXL script's flag)")
    data.add_argument("--crops_coords_top_left_w", type=int, default=0,
                      help="SDXL: crop left coordinate put in the UNet's time ids")
    method = parser.add_argument_group("custom diffusion")
    method.add_argument("--freeze_model", default="crossattn_kv", choices=["crossattn_kv", "crossattn"],
                        help="crossattn_kv: train K/V of cross-attention; crossattn: also Q and out")
    method.add_argument("--modifier_token", default=None, help='new token(s), e.g. "<new1>" or "<new1>+<new2>"')
    method.add_argument("--initializer_token", default="ktn+pll+ucd",
                        help="words whose embeddings initialise the modifier tokens, '+'-joined; a word that is a "
                             "vocabulary entry is used as that bare entry, as the original code did "
                             "('pll' -> 47629, not 'pll</w>')")
    method.add_argument("--loss_normalization", default="paper", choices=LOSS_NORMALIZATIONS,
                        help="instance loss: paper = mean over kept latent cells and channels (1:1 with the prior "
                             "loss); diffusers = diffusers' example, 4x larger (its prior weighs 4x less)")
    method.add_argument("--validation_prompt", default=None, help="prompt sampled every --validation_steps")
    method.add_argument("--num_validation_images", type=int, default=4, help="images per validation")
    method.add_argument("--no_safe_serialization", action="store_true", help="write .bin instead of .safetensors")
    method.add_argument("--save_format", default="diffusers", choices=["diffusers", "delta", "ldm"],
                        help="diffusers: pytorch_custom_diffusion_weights + <newN> files (upstream); delta: the "
                             "original repo's delta file; ldm: CompVis delta_*.ckpt naming")
    compat = parser.add_argument_group("compatibility (accepted, not needed here)")
    compat.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                        help="no-op: attention already runs through torch's fused SDPA")
    compat.add_argument("--local_rank", type=int, default=-1, help="set by launchers; accelerate reads the env")
    compat.add_argument("--push_to_hub", action="store_true", help="not supported here: upload output_dir yourself")
    compat.add_argument("--hub_token", default=None, help="unused (see --push_to_hub)")
    compat.add_argument("--hub_model_id", default=None, help="unused (see --push_to_hub)")
    add_training_args(parser, output_dir="custom-diffusion-model")
    return parser


def concepts_from_args(args: argparse.Namespace) -> list[Concept]:
    if args.concepts_list:
        return load_concepts_list(args.concepts_list, args.with_prior_preservation)
    if not args.instance_data_dir or not args.instance_prompt:
        raise UsageError("give --instance_data_dir and --instance_prompt (or --concepts_list)")
    if args.with_prior_preservation and (not args.class_data_dir or not args.class_prompt):
        raise UsageError("--with_prior_preservation needs --class_data_dir and --class_prompt")
    return [Concept(args.instance_prompt, args.instance_data_dir, args.class_prompt, args.class_data_dir)]


def check_args(args: argparse.Namespace, concepts: list[Concept]) -> None:
    if args.push_to_hub:
        raise UsageError("--push_to_hub is not supported here; upload --output_dir with `hf upload` afterwards")
    tokens = split_plus(args.modifier_token)
    for c in concepts:
        if tokens and not any(t in c.instance_prompt for t in tokens):
            raise UsageError(f"instance prompt {c.instance_prompt!r} uses none of the modifier tokens {tokens}")
    if args.resolution is not None and args.resolution < 1:
        raise UsageError(f"--resolution must be positive, got {args.resolution}")
    for c in concepts:  # a bad instance image is reported before any model loads, not minutes into training
        check_images(list_images(c.instance_data_dir))


VALIDATION_GUIDANCE = {"sd": 7.5, "sdxl": 5.0}  # StableDiffusion(XL)Pipeline defaults the original ran with


def validation_scheduler(scheduler):
    """DPMSolverMultistepScheduler from `scheduler`'s config; a learned variance becomes fixed_small (the
    original SDXL script's rule: the model was trained on the simplified objective)."""
    from diffusers import DPMSolverMultistepScheduler

    extra = {}
    if "variance_type" in scheduler.config:
        kind = scheduler.config.variance_type
        extra["variance_type"] = "fixed_small" if kind in ("learned", "learned_range") else kind
    return DPMSolverMultistepScheduler.from_config(scheduler.config, **extra)


def native_resolution(pipe) -> int:
    """The UNet's native image size (sample_size x VAE factor): 512 for SD-1.x, 1024 for SDXL."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def prior_generation_dtype(precision: str | None, device) -> torch.dtype:
    """dtype of the class-image generation: the flag's, else fp16 on a GPU and fp32 elsewhere (the original's
    default, whatever the training precision); "no" means fp32."""
    if precision is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def prior_lr_factor(args: argparse.Namespace) -> float:
    """diffusers' `--scale_lr` rule on top of the common one: x2 with prior preservation (class images double
    the images per step)."""
    return 2.0 if args.scale_lr and args.with_prior_preservation else 1.0


def ldm_learning_rate(base_lr: float, batch_size: int, n_gpu: int, accumulate_grad_batches: int = 1) -> float:
    """The LDM code's rule (`--scale_lr` on by default there): accumulate x GPUs x batch size x base lr, where
    its batch mixes instance and class images (paper: 1 x 2 x 4 x 1e-5 = 8e-5)."""
    return accumulate_grad_batches * n_gpu * batch_size * base_lr


@torch.no_grad()
def measure_latent_factor(vae: torch.nn.Module, resolution: int, device, dtype: torch.dtype) -> int:
    """Pixels per latent cell of this VAE at the training size, measured by encoding a blank image (as
    diffusers' example does; the posterior's mode, so no random number is drawn)."""
    probe = torch.zeros(1, 3, resolution, resolution, device=device, dtype=dtype)
    side = vae.encode(probe).latent_dist.mode().shape[-1]
    if side < 1 or resolution % side:
        raise UsageError(f"--resolution {resolution} does not map to a whole latent grid with this VAE "
                         f"({side} cells); use a multiple of {max(resolution // max(side, 1), 1)}")
    return resolution // side


class CustomDiffusionMethod(TrainingMethod):
    """Trainable: Custom Diffusion processors of the UNet's cross-attention, and the modifier-token rows."""

    name = "custom-diffusion"

    def __init__(self, args: argparse.Namespace, concepts: list[Concept]):
        self.args, self.concepts = args, concepts
        self.tokens = split_plus(args.modifier_token)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, accelerator) -> None:
        args = self.args
        self.device, self.accelerator = accelerator.device, accelerator
        pipe = load_pipeline(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant)
        self.family = pipeline_family(pipe)
        if self.family not in ("sd", "sdxl"):
            raise UsageError(f"Custom Diffusion trains SD-1.x/2.x and SDXL UNets, not a {self.family} pipeline")
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        if args.resolution is None:
            args.resolution = native_resolution(pipe)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for _, enc in text_pairs(pipe):
            enc.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        self.token_ids: list[list[int]] = []
        if self.tokens:
            self.token_ids = add_tokens_to_pipeline(pipe, self.tokens, split_plus(args.initializer_token))
        self.generate_class_images(accelerator)
        attention.install(pipe.unet, args.freeze_model)
        dtype = compute_dtype(accelerator)
        place_frozen(pipe.vae, self.device, dtype)
        self.latent_factor = measure_latent_factor(pipe.vae, args.resolution, self.device, pipe.vae.dtype)
        trained = {k: p.detach().clone() for k, p in attention.trainable_parameters(pipe.unet).items()}
        place_frozen(pipe.unet, self.device, dtype)
        for proc in attention.custom_processors(pipe.unet).values():
            proc.to(dtype=torch.float32)  # trainable weights stay fp32 under mixed precision ...
        attention.set_state(pipe.unet, trained)  # ... and exact: undo the round trip through `dtype`
        self.text_encoders = []
        for i, (_, enc) in enumerate(text_pairs(pipe)):
            train_tokens = bool(self.tokens)
            place_frozen(enc, self.device, torch.float32 if train_tokens else dtype)
            if train_tokens:
                emb = enc.get_input_embeddings().weight
                emb.requires_grad_(True)
                mask_embedding_grad(enc, self.token_ids[i])
            self.text_encoders.append(enc)
        self.unet = pipe.unet
        for i, enc in enumerate(self.text_encoders):
            setattr(self, self._encoder_attr(i), enc)

    @staticmethod
    def _encoder_attr(i: int) -> str:
        return "text_encoder" if i == 0 else f"text_encoder_{i + 1}"

    def generate_class_images(self, accelerator) -> None:
        """Fill each concept's class folder with the base model, before any weight is touched.

        Generation in fp16/bf16 uses a separate copy of the base model: casting the training pipeline down and
        back would round its weights (and so the K/V copies the processors start from).
        """
        args = self.args
        if not args.with_prior_preservation or args.real_prior:
            return
        missing = [c for c in self.concepts if count_images(c.class_data_dir) < args.num_class_images]
        if accelerator.is_main_process and missing:
            dtype = prior_generation_dtype(args.prior_generation_precision, self.device)
            gen_pipe = self.pipe
            if dtype != torch.float32:
                gen_pipe = load_pipeline(args.pretrained_model_name_or_path, revision=args.revision,
                                         variant=args.variant, torch_dtype=dtype)
                gen_pipe.set_progress_bar_config(disable=True)
            gen_pipe.to(self.device)
            for c in missing:
                ensure_class_images(gen_pipe, c.class_prompt, c.class_data_dir, args.num_class_images,
                                    batch_size=args.sample_batch_size, seed=args.seed + self.concepts.index(c),
                                    height=args.resolution, width=args.resolution)
            del gen_pipe
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------- trainer hooks
    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"unet": self.unet}
        if self.tokens:
            mods.update({self._encoder_attr(i): enc for i, enc in enumerate(self.text_encoders)})
        return mods

    def trainable_parameters(self) -> list[dict[str, Any]]:
        lr = self.args.learning_rate * prior_lr_factor(self.args)
        groups = [{"params": list(attention.trainable_parameters(self.pipe.unet).values()), "lr": lr}]
        if self.tokens:
            embeds = [enc.get_input_embeddings().weight for _, enc in text_pairs(self.pipe)]
            groups.append({"params": embeds, "lr": lr, "weight_decay": 0.0})
        return groups

    def make_optimizer(self, params, args: argparse.Namespace, lr_factor: float = 1.0) -> torch.optim.Optimizer:
        """common.train's AdamW, kept so that `after_backward` can read the embedding group's current lr."""
        from common.train.optim import make_optimizer

        self.optimizer = make_optimizer(params, args, lr_factor)
        return self.optimizer

    def after_backward(self) -> None:
        """AdamW's decoupled weight decay on the modifier rows (their group has weight_decay 0 so that the
        other rows stay untouched): p <- p * (1 - lr * wd), just before the optimizer step, as AdamW does.
        (Under fp16 loss scaling a skipped step still decays these rows once.)"""
        optimizer = getattr(self, "optimizer", None)
        if not self.tokens or optimizer is None or not self.accelerator.sync_gradients:
            return
        group = optimizer.param_groups[1]
        factor = 1 - group["lr"] * self.args.adam_weight_decay
        with torch.no_grad():
            for weight, ids in zip(group["params"], self.token_ids):
                weight[ids] = weight[ids].mul(factor)

    def loss(self, batch: dict[str, Any], accelerator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pixels = batch["pixel_values"].to(self.device, dtype=self.pipe.vae.dtype)
        with torch.no_grad():
            latents = encode_images(self.pipe.vae, pixels).float()
        noised = noise_latents(self.noise_scheduler, latents)
        encoders = [getattr(self, self._encoder_attr(i)) for i in range(len(self.text_encoders))]
        embeds, pooled = encode_tokens(encoders, tokenize(self.pipe, batch["prompts"]), self.family)
        added = None
        if self.family == "sdxl":
            s = self.args.resolution  # original size = target size = the training resolution, as upstream
            crop = (self.args.crops_coords_top_left_h, self.args.crops_coords_top_left_w)
            time_ids = sdxl_add_time_ids((s, s), crop, (s, s), batch=len(pixels), dtype=embeds.dtype,
                                         device=self.device)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        dtype = self.pipe.unet.dtype
        pred = self.unet(noised.x_t.to(dtype), noised.t, embeds.to(dtype), added_cond_kwargs=added).sample
        mask = batch["mask"].to(self.device)
        if mask.shape[-2:] != pred.shape[-2:]:
            raise RuntimeError(f"loss mask {tuple(mask.shape[-2:])} does not match the latents {tuple(pred.shape[-2:])}")
        return custom_diffusion_loss(pred, noised.target, mask, batch["num_instance"],
                                     prior_loss_weight=self.args.prior_loss_weight,
                                     with_prior=self.args.with_prior_preservation,
                                     normalization=self.args.loss_normalization)

    def trained_weights(self) -> CustomDiffusionWeights:
        unet_sd = {attention.proc_key_to_param(k): v.float() for k, v in attention.get_state(self.pipe.unet).items()}
        tokens = {}
        for j, token in enumerate(self.tokens):
            tokens[token] = [enc.get_input_embeddings().weight[ids[j]].detach().float().clone()
                             for (_, enc), ids in zip(text_pairs(self.pipe), self.token_ids)]
        return CustomDiffusionWeights(unet_sd, tokens)

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return attention.get_state(self.pipe.unet)

    def save_final(self, directory) -> None:
        weights = self.trained_weights()
        safe = not self.args.no_safe_serialization
        if self.args.save_format == "diffusers":
            save_diffusers(weights, directory, safe_serialization=safe)
        else:
            ext = ".safetensors" if safe else ".bin"
            name = "delta" if self.args.save_format == "delta" else "delta_model"
            save(weights, Path(directory) / f"{name}{ext}", fmt=self.args.save_format,
                 unet_config=dict(self.pipe.unet.config))
        write_concept_manifest(self.pipe, directory, weights, self.args.save_format, safe)

    def validate(self, step: int) -> list:
        """The original's validation: DPM-Solver++ (multistep) on the model's scheduler config, 25 steps, the
        pipeline's default guidance (7.5 SD / 5.0 SDXL), one image per call from one generator seeded --seed."""
        if not self.args.validation_prompt:
            return []
        generator = torch.Generator(self.device).manual_seed(self.args.seed)
        scheduler = self.pipe.scheduler
        self.pipe.scheduler = validation_scheduler(scheduler)
        try:
            with self.accelerator.autocast():  # fp16/bf16 UNet with fp32 trained weights and text features
                return [generate(self.pipe, [self.args.validation_prompt], num_inference_steps=25,
                                 guidance_scale=VALIDATION_GUIDANCE[self.family], generator=generator,
                                 height=self.args.resolution, width=self.args.resolution, output_type="pil",
                                 progress=False)[0]
                        for _ in range(self.args.num_validation_images)]
        finally:
            self.pipe.scheduler = scheduler


def main(argv: Sequence[str] | None = None) -> Trainer:
    args = parse_args(build_parser(), argv)
    concepts = concepts_from_args(args)
    check_args(args, concepts)
    method = CustomDiffusionMethod(args, concepts)
    # Class images are generated in setup (inside the Trainer); the dataset is built lazily after it.
    dataset = _LazyDataset(lambda: CustomDiffusionDataset(
        concepts, args.resolution, with_prior_preservation=args.with_prior_preservation,
        real_prior=args.real_prior, num_class_images=args.num_class_images, center_crop=args.center_crop,
        hflip=args.hflip, aug=not args.noaug, latent_factor=method.latent_factor))
    trainer = Trainer(args, method, dataset, collate_fn=collate)
    trainer.train()
    return trainer


class _LazyDataset(torch.utils.data.Dataset):
    """Builds the real dataset on first use, i.e. after setup() generated the class images."""

    def __init__(self, build):
        self._build, self._dataset = build, None

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = self._build()
        return self._dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]
