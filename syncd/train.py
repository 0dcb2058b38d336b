"""SynCD fine-tuning (§2): FLUX (references as clean tokens beside the target on one canvas, full joint
attention, Beta(4, 2) sigmas with the canvas resolution shift, loss on target tokens only) or SDXL
(references noised to t run with the LoRA off; their self-attention inputs, projected by the target pass's
LoRA'd to_k/to_v, are read by the target, masked
to the references' foreground; with `--ip_adapter_path` the IP-Adapter-Plus global image condition of
`pipelines/sdxl_pipeline/model.py`: a reference's image embeds for the target, each reference's own for its
pass, the null-image embeds when the image is dropped, and `--trainkeys lora+to_k_ip+to_v_ip` trains the
adapter's key/value projections beside the LoRA). LoRA through common.train.lora; the Trainer owns the loop."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from common.attention.plan import AttentionPlan, KVBank, install_plan
from common.cli import ArgumentParser, add_model_args, parse_args, positive_int
from common.errors import UsageError
from common.models.adapters import write_manifest
from common.models.loading import load_pipeline, preset_family
from common.pipelines.conditioning import build_conditioning
from common.pipelines.latents import encode_images
from common.train import Trainer, TrainingMethod, add_training_args, compute_dtype
from common.train.conditioning import flux_guidance, sdxl_add_time_ids
from common.train.flow import flow_matching_loss, sample_timestep_density, shift_sigmas
from common.train.lora import add_lora, lora_disabled, save_lora_weights
from syncd.canvas import make_canvas, noise_canvas, pack_canvas, slot_mask
from syncd.checkpoint import PREFIX, RANK, SDXL_TARGETS, TRAIN_TARGETS, sdxl_state_dict, syncd_state_dict
from syncd.data import SynCDDataset, collate

DEFAULT_MODELS = {"flux": "flux-dev", "sdxl": "bghira/terminus-xl-gamma-v1"}
SDXL_RANK = 128  # pipelines/sdxl_pipeline/model.py default (sample.py loads the released checkpoint with r = 128)
TRAINKEYS = ("lora", "to_k_ip", "to_v_ip")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="SynCD: fine-tune FLUX or SDXL on multi-image SynCD tuples")
    p.add_argument("--model", default="flux", help="flux | sdxl, or a model spec whose family is used (default: flux)")
    add_model_args(p)
    p.add_argument("--train_data_dir", "--rootdir", dest="train_data_dir", nargs="+", default=None,
                   help="SynCD folder(s) with *metadata.json, images and masks/ (required)")
    p.add_argument("--resolution", "--img_size", dest="resolution", type=int, default=None,
                   help="per-image resolution (default: 512 FLUX, 1024 SDXL)")
    p.add_argument("--numref", type=int, default=-1,
                   help="references per tuple (k + 1 images drawn at random, the target too); -1 = all images of a "
                        "tuple, in order")
    p.add_argument("--rank", type=int, default=None, help=f"LoRA rank (default: 32 FLUX, {SDXL_RANK} SDXL)")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
    p.add_argument("--optimizer", default="prodigy", choices=("prodigy", "adamw"),
                   help="Prodigy (prodigyopt; lr 1.0) as the original, or AdamW (default: %(default)s)")
    p.add_argument("--uniform_schedule", action="store_true", help="sigmas ~ U(0,1) instead of Beta(4, 2)")
    p.add_argument("--guidance", type=float, default=1.0, help="FLUX guidance embedding in training (default: 1.0)")
    p.add_argument("--filter_aesthetics", type=float, default=-1, help="aesthetic filter threshold; -1 = off")
    p.add_argument("--filter_dino", type=float, default=-1, help="DINOv2 pair filter threshold; -1 = off")
    p.add_argument("--drop_both", type=float, default=0.05, help="P(drop text and image)")
    p.add_argument("--drop_image", "--drop_im", dest="drop_image", type=float, default=0.05,
                   help="P(drop image only); SDXL: the IP-Adapter gets the null-image embeds")
    p.add_argument("--drop_text", "--drop_txt", dest="drop_text", type=float, default=0.05, help="P(drop text only)")
    p.add_argument("--drop_mask", type=float, default=0.1, help="P(reference masks replaced by all-ones)")
    p.add_argument("--dilate_mask", action=argparse.BooleanOptionalAction, default=True,
                   help="dilate the latent-size reference masks by a --kernel_size box, as the original's configs")
    p.add_argument("--kernel_size", type=positive_int, default=5, help="mask dilation box size (default: %(default)s)")
    p.add_argument("--rescale_betas_zero_snr", action=argparse.BooleanOptionalAction, default=True,
                   help="SDXL: DDPM noising with zero-terminal-SNR rescaled betas, as the original's model.py "
                        "(--no-rescale_betas_zero_snr: the model's betas as they are)")
    p.add_argument("--masked", action="store_true", help="SDXL: references visible through their foreground only")
    p.add_argument("--trainkeys", default=None,
                   help="'+'-separated trained parts among lora, to_k_ip, to_v_ip (the last two together; SDXL with "
                        "--ip_adapter_path). Default: lora+to_k_ip+to_v_ip with an IP-Adapter, else lora")
    p.add_argument("--ip_adapter_path", "--ip_adapter_name", dest="ip_adapter_path", default=None,
                   help="SDXL: IP-Adapter-Plus weights (ip-adapter-plus_sdxl_vit-h.bin) for the global image condition")
    p.add_argument("--image_encoder", default=None,
                   help="SDXL: image encoder of the IP-Adapter (preset, hub id or folder; default: clip-vit-h-14)")
    p.add_argument("--ip_adapter_scale", type=float, default=1.0, help="SDXL: IP-Adapter scale in training (default: 1.0)")
    p.add_argument("--random_permute", action=argparse.BooleanOptionalAction, default=True,
                   help="SDXL: shuffle the references (with their masks) per sample; the IP-Adapter global image "
                        "is then the first reference, a random one, never the target (--no-random_permute: the "
                        "target's own image, as the original) (default: on)")
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
    args.rank = args.rank or (RANK if args.family == "flux" else SDXL_RANK)
    if args.rank < 1:
        raise UsageError(f"--rank must be >= 1, got {args.rank}")
    if args.learning_rate is None:
        args.learning_rate = 1.0 if args.optimizer == "prodigy" else (1e-4 if args.family == "flux" else 5e-6)
    if args.numref == 0 or args.numref < -1:
        raise UsageError(f"--numref must be -1 (all) or >= 1, got {args.numref}")
    for name in ("drop_both", "drop_image", "drop_text", "drop_mask"):
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name} must be a probability in [0, 1], got {getattr(args, name)}")
    resolve_trainkeys(args)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        args.mixed_precision = "no"
    return args


def resolve_trainkeys(args: argparse.Namespace) -> None:
    """args.trainkeys -> a set of TRAINKEYS; IP-Adapter flags only where they apply."""
    ip = args.ip_adapter_path
    if args.family == "flux" and (ip or args.image_encoder):
        raise UsageError("--ip_adapter_path / --image_encoder are for SDXL; the FLUX model has no IP-Adapter")
    if ip and not Path(ip).is_file():
        raise UsageError(f"--ip_adapter_path {ip}: no such file")
    given = args.trainkeys or ("lora+to_k_ip+to_v_ip" if ip else "lora")
    keys = {k for k in given.split("+") if k}
    bad = sorted(keys - set(TRAINKEYS))
    if bad or not keys:
        raise UsageError(f"--trainkeys {given!r}: expected '+'-separated parts of {', '.join(TRAINKEYS)}"
                         + (f" (unknown: {', '.join(bad)})" if bad else ""))
    if ("to_k_ip" in keys) != ("to_v_ip" in keys):
        raise UsageError("--trainkeys: to_k_ip and to_v_ip train together (the original trains neither alone)")
    if "to_k_ip" in keys and not ip:
        raise UsageError("--trainkeys to_k_ip+to_v_ip needs --ip_adapter_path (SDXL IP-Adapter-Plus weights)")
    args.trainkeys = "+".join(k for k in TRAINKEYS if k in keys)


def permute_references(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images [B, n, ...], masks [B, n, ...] -> the same with the references (slots 1..n-1) shuffled per sample,
    images and masks alike; the target stays in slot 0. Returns (images, masks, order [B, n])."""
    b, n = images.shape[:2]
    order = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(n - 1, generator=generator) + 1])
                         for _ in range(b)])
    rows = torch.arange(b)[:, None]
    return images[rows, order], masks[rows, order.to(masks.device)], order


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
            self.unet.requires_grad_(False)
            from diffusers import DDPMScheduler

            # model.py: DDPM noising from the model's betas, zero-terminal-SNR rescaled (not the pipeline's sampler,
            # e.g. SDXL's Euler, whose add_noise is x0 + sigma * eps for a sigma-scaled input)
            self.noise_scheduler = DDPMScheduler.from_config(
                pipe.scheduler.config, rescale_betas_zero_snr=self.args.rescale_betas_zero_snr)
            self.ip = None
            if self.args.ip_adapter_path:  # before the LoRA and the plan: its processors replace the attn2 ones
                from common.models.ip_adapter import load_ip_adapter

                self.ip = load_ip_adapter(self.unet, self.args.ip_adapter_path, image_encoder=self.args.image_encoder,
                                          scale=self.args.ip_adapter_scale)
                self.ip.image_encoder.model.requires_grad_(False)  # loads it now, before the training stream is seeded
            self.params = add_lora(self.unet, self.args.rank, alpha, target_modules=list(SDXL_TARGETS))
            keys = self.args.trainkeys.split("+")
            if "lora" not in keys:
                for prm in self.params:
                    prm.requires_grad_(False)
                self.params = []
            if "to_k_ip" in keys:
                self.params += ip_projection_parameters(self.unet)
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
    def _encode(self, images: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
        """images [B, n, 3, H, W] -> latents [B, n, C, h, w] (FLUX: x scaling, no shift; SDXL: diffusers'), float32
        unless keep_dtype (FLUX: the VAE's dtype, as the original's noise and target)."""
        b, n = images.shape[:2]
        flat = images.flatten(0, 1).to(self.accelerator.device, self.pipe.vae.dtype)
        with torch.no_grad():
            if self.family == "flux":
                lat = self.pipe.vae.encode(flat).latent_dist.sample() * self.pipe.vae.config.scaling_factor
            else:
                lat = encode_images(self.pipe.vae, flat)
        return (lat if keep_dtype else lat.float()).unflatten(0, (b, n))

    def loss(self, batch: dict[str, Any], accelerator) -> tuple[torch.Tensor, dict[str, float]]:
        return self._flux_loss(batch) if self.family == "flux" else self._sdxl_loss(batch)

    def _flux_loss(self, batch):
        device = self.accelerator.device
        lat = self._encode(batch["images"], keep_dtype=True)
        scheme = "uniform" if self.args.uniform_schedule else "beta"
        u = sample_timestep_density(scheme, lat.shape[0], beta_a=4.0, beta_b=2.0, device=device)
        noise = torch.randn_like(make_canvas(lat))
        with torch.no_grad():
            cond = build_conditioning(self.pipe, batch["prompts"], do_cfg=False, device=device,
                                      max_sequence_length=self.args.max_sequence_length)
        loss, sigmas = flux_canvas_loss(self.transformer, self.pipe.scheduler, lat, cond, u, noise,
                                        guidance=flux_guidance(self.pipe.transformer, self.args.guidance, lat.shape[0],
                                                               device=device))
        return loss, {"sigma": sigmas.mean()}

    def _ip_embeds(self, images: torch.Tensor, drop: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, n, 3, H, W] in [-1, 1] -> IP-Adapter image embeds (target [B, 1, ...], references
        [B*(n-1), 1, ...]): the target reads the global image (the first reference under --random_permute, else
        its own), each reference its own; a dropped sample gets the null-image embeds everywhere (what the
        sampler's unconditional pass uses). `...` = [L, W] (plus) or [E] (plain)."""
        from syncd.sdxl_pipeline import reference_pil

        b, n = images.shape[:2]
        enc, feature = self.ip.image_encoder, self.ip.feature
        pils = [reference_pil(img) for img in images.flatten(0, 1)]
        with torch.no_grad():
            pos = enc.encode(pils, feature).unflatten(0, (b, n))
            null = enc.encode_negative(pils[:1], feature)[0]
        keep = ~torch.tensor(list(drop), dtype=torch.bool, device=pos.device)
        emb = torch.where(keep.view(b, *[1] * (pos.ndim - 1)), pos, null.expand_as(pos))
        glob = 1 if self.args.random_permute and n > 1 else 0
        return emb[:, glob, None], emb[:, 1:].flatten(0, 1)[:, None]

    def _sdxl_loss(self, batch):
        device = self.accelerator.device
        if self.args.random_permute and batch["images"].shape[1] > 2:
            images, masks, _ = permute_references(batch["images"], batch["masks"])
            batch = {**batch, "images": images, "masks": masks}
        lat = self._encode(batch["images"])
        b, n, c, h, w = lat.shape
        sched = self.noise_scheduler
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
        bank = KVBank(mode="write", masks=masks, project_on_read=True)  # the original: refs' K/V from the LoRA'd to_k/to_v
        refs = noisy[:, 1:].flatten(0, 1)
        rep = lambda x: x.repeat_interleave(n - 1, 0)
        ref_added = {"text_embeds": rep(cond.pooled), "time_ids": rep(time_ids)}
        added = {"text_embeds": cond.pooled, "time_ids": time_ids}
        if self.ip is not None:
            target_ip, ref_ip = self._ip_embeds(batch["images"], batch["drop_image"])
            added["image_embeds"], ref_added["image_embeds"] = [target_ip.to(dtype)], [ref_ip.to(dtype)]
        with torch.no_grad(), lora_disabled(self.unet):
            self.unet(refs.to(dtype), t.repeat_interleave(n - 1), encoder_hidden_states=rep(cond.embeds),
                      added_cond_kwargs=ref_added,
                      cross_attention_kwargs={"plan": AttentionPlan(kv_bank=bank)}, return_dict=False)
        bank.mode = "read"
        bank.read_index = torch.arange(b * (n - 1), device=device).view(b, n - 1)
        pred = self.unet(noisy[:, 0].to(dtype), t, encoder_hidden_states=cond.embeds,
                         added_cond_kwargs=added,
                         cross_attention_kwargs={"plan": AttentionPlan(kv_bank=bank)}, return_dict=False)[0]
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(lat[:, 0], noise[:, 0], t)
        else:
            target = noise[:, 0]
        return F.mse_loss(pred.float(), target.float()), {}

    # ------------------------------------------------------------------------------------------ outputs
    def state_to_save(self) -> dict[str, torch.Tensor]:
        """FLUX: the released pytorch_model.bin keys; SDXL: the Lightning checkpoint's `state_dict` keys (UNet
        LoRA + the trained to_k_ip/to_v_ip), as the original's CUDACallback keeps them."""
        model = self.accelerator.unwrap_model(self.transformer if self.family == "flux" else self.unet)
        if self.family == "flux":
            return syncd_state_dict(model, PREFIX)
        return sdxl_state_dict(model, ip="to_k_ip" in self.args.trainkeys)

    def save_final(self, directory) -> None:
        from common.io import save_weights

        directory = Path(directory)
        model = self.accelerator.unwrap_model(self.transformer if self.family == "flux" else self.unet)
        save_weights(self.state_to_save(), directory / f"{self.weights_name}.safetensors")
        # the same LoRA in diffusers' format + a kind "lora" manifest, so `apply_adapter(pipe, <dir>/lora)` and
        # every plain sampler can load it (without references it is only the fine-tuned base)
        save_lora_weights(directory / "lora", family=self.family,
                          **({"transformer": model} if self.family == "flux" else {"unet": model}))
        write_manifest(directory, kind="syncd", base_family=self.family, weights=f"{self.weights_name}.safetensors",
                       info={"rank": self.args.rank, "lora_alpha": self.args.lora_alpha or self.args.rank,
                             "resolution": self.args.resolution,
                             "base_model": self.args.pretrained_model_name_or_path,
                             **({"trainkeys": self.args.trainkeys, "ip_adapter_path": self.args.ip_adapter_path,
                                 "image_encoder": self.args.image_encoder, "ip_adapter_scale": self.args.ip_adapter_scale}
                                if self.family == "sdxl" else {})})

    def validate(self, step: int) -> list:
        if self.family != "flux" or not self.args.validation_prompt:
            return []
        from syncd.pipeline import generate

        item = self.dataset[0]
        refs = item["images"][1:]
        g = torch.Generator(self.accelerator.device).manual_seed(self.args.seed)
        return generate(self.pipe, self.args.validation_prompt, refs, num_inference_steps=self.args.validation_inference_steps,
                        generator=g, num_images=self.args.num_validation_images, progress=False)


def flux_shift(scheduler, image_seq_len: int) -> float:
    """exp(mu) of model.py's apply_flux_schedule_shift (calculate_shift's operation order, the scheduler's config)."""
    from syncd.pipeline import calculate_shift

    return math.exp(calculate_shift(scheduler.config, image_seq_len))


def flux_canvas_loss(transformer, scheduler, lat: torch.Tensor, cond, u: torch.Tensor, noise: torch.Tensor, *,
                     guidance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """model.py's compute_loss on one canvas. lat [B, n, C, h, w] (target first), u [B] draws of the sigma
    density, noise [B, C, h, n*w]; sigmas shifted by the canvas' token count (the scheduler's config), the
    transformer gets (1000 s) cast to its dtype / 1000, the loss is the MSE to noise - z on the target's tokens.
    Returns (loss, sigmas [B])."""
    b, n, c, h, w = lat.shape
    canvas = make_canvas(lat)
    sigmas = shift_sigmas(u, flux_shift(scheduler, canvas.shape[-2] * canvas.shape[-1] // 4))
    tokens, img_ids = pack_canvas(noise_canvas(canvas, noise, sigmas, n))
    target = pack_canvas(noise - canvas)[0]
    dtype = next(transformer.parameters()).dtype
    pred = transformer(hidden_states=tokens.to(dtype), timestep=(sigmas * 1000.0).to(dtype) / 1000.0,
                       guidance=guidance, pooled_projections=cond.pooled.to(dtype),
                       encoder_hidden_states=cond.embeds.to(dtype), txt_ids=cond.text_ids, img_ids=img_ids,
                       return_dict=False)[0]
    return flow_matching_loss(pred.float(), target.float(), token_mask=slot_mask((h, w), n, 0, tokens.device)), sigmas


def ip_projection_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The loaded IP-Adapter's to_k_ip/to_v_ip weights, made trainable in float32 (as the LoRA's)."""
    from common.models.ip_adapter import ip_adapter_processors

    params = []
    for proc in ip_adapter_processors(unet).values():
        for mod in (proc.to_k_ip, proc.to_v_ip):
            mod.to(torch.float32).requires_grad_(True)
            params += list(mod.parameters())
    return params


def main(argv: Sequence[str] | None = None) -> Trainer:
    args = resolve_args(parse_args(build_parser(), argv))
    dataset = SynCDDataset(args.train_data_dir, args.resolution, args.numref, args.filter_aesthetics,
                           args.filter_dino, args.drop_both, args.drop_image, args.drop_text, mask_ones_prob=args.drop_mask,
                           mask_kernel_size=args.kernel_size if args.dilate_mask else 1)
    method = SynCDMethod(args, dataset)
    trainer = Trainer(args, method, dataset, collate_fn=collate)
    trainer.train()
    return trainer


__all__ = ["SynCDMethod", "build_parser", "flux_canvas_loss", "flux_shift", "ip_projection_parameters", "main", "permute_references", "resolve_trainkeys"]
