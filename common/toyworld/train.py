"""Train the toy world's models with the shared Trainer: `--stage clip`, `vae`, `sd`, `export`, then `sdxl`,
`export_sdxl`.

Order: toy-clip (contrastive) and the VAE (reconstruction) are independent; toy-sd's UNet trains on the
frozen VAE's latents of a fixed pool of scenes, conditioned on toy-clip's frozen text tower. toy-sdxl's UNet
is toy-sd's converted to SDXL's layout (`models.sdxl_unet_from_sd`) and fine-tuned on the same pool with
SDXL's conditioning. Every stage is resumable (`--resume_from_checkpoint latest`); `export` writes fp16
safetensors under assets/toyworld/ (toy-clip/ and toy-sd/ in diffusers format), the loss curves and sample
grids; `export_sdxl` writes toy-sdxl/ (what it does not share with toy-sd, see `export_sdxl`).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModelWithProjection

from common.cli import ArgumentParser, parse_args
from common.errors import UsageError
from common.io import load_weights, save_weights
from common.models.tokenizer import clip_tokenizer
from common.toyworld import models
from common.toyworld.data import LatentSceneDataset, SceneDataset, image_tensor, toy_tokenizer
from common.toyworld.scenes import make_scene, render
from common.train import Trainer, TrainingMethod, add_training_args
from common.train.conditioning import sdxl_add_time_ids
from common.train.diffusion import masked_mse, noise_latents

STAGES = ("clip", "vae", "sd", "export", "sdxl", "export_sdxl")
VALIDATION_PROMPTS = (
    "a red circle on a blue background", "a green square on a white background",
    "a yellow triangle on a black background", "a white cross on a purple background",
    "a blue diamond on an orange background", "a large purple circle on a yellow background",
    "a red square and a blue circle on a white background", "a small orange triangle on the left on a green background",
)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Train the toy world: toy-clip, the toy VAE, toy-sd's UNet; export the weights.")
    p.add_argument("--stage", choices=STAGES, required=True, help="what to train (or export)")
    p.add_argument("--num_scenes", type=int, default=200_000, help="scenes in the training set (indices of the seed)")
    p.add_argument("--data_seed", type=int, default=0, help="seed of the scene dataset (fixed: same data everywhere)")
    p.add_argument("--clip_path", default=None,
                   help="trained toy-clip folder (CLIPModel): needed by sd and export; clip: start from it")
    p.add_argument("--vae_path", default=None, help="trained toy VAE folder (AutoencoderKL); needed by sd and export")
    p.add_argument("--sd_clip_path", default=None,
                   help="export: the toy-clip whose text tower the UNet was trained with (default: --clip_path)")
    p.add_argument("--unet_path", default=None,
                   help="trained toy UNet folder; needed by export; sdxl: the toy-sd UNet to convert and fine-tune; "
                        "export_sdxl: the trained toy-sdxl UNet")
    p.add_argument("--shape_negatives", type=int, default=0,
                   help="clip: hard-negative captions per image with the shape word swapped (0: plain CLIP loss)")
    p.add_argument("--decoder_only", action="store_true",
                   help="vae: fine-tune only the decoder of --vae_path (the latent space, and a UNet on it, stay valid)")
    p.add_argument("--kl_weight", type=float, default=1e-6, help="KL weight of the VAE loss")
    p.add_argument("--empty_caption_prob", type=float, default=0.1,
                   help="sd, sdxl: captions replaced by '' (trains the unconditional branch for guidance)")
    p.add_argument("--export_dir", default="assets/toyworld",
                   help="export: where toy-clip/ and toy-sd/ go; export_sdxl: where toy-sdxl/ goes (next to toy-sd/)")
    p.add_argument("--clip_run", default=None,
                   help="export: the clip runs' output_dirs for the loss curve, comma-separated in order; "
                        "'dir:N' keeps steps <= N of a run that a later one continued from step N")
    p.add_argument("--sd_run", default=None, help="export: the sd stage's output_dir (for its loss curve)")
    p.add_argument("--sdxl_run", default=None,
                   help="export_sdxl: the sdxl runs' output_dirs for the loss curve "
                        "(comma-separated, 'dir:N' as in --clip_run)")
    p.add_argument("--torch_threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    add_training_args(p, learning_rate=5e-4, train_batch_size=32, lr_warmup_steps=200, dataloader_num_workers=0,
                      checkpointing_steps=250, checkpoints_total_limit=2, validation_steps=500,
                      adam_weight_decay=0.0, report_to="tensorboard", output_dir="runs/toyworld")
    return p


# ------------------------------------------------------------------------------------------------------- helpers


def clip_text_inputs(captions: Sequence[str], max_length: int = 77) -> dict[str, torch.Tensor]:
    """Token ids padded to the longest caption (the causal text tower makes this equal to padding to 77)."""
    enc = toy_tokenizer()(list(captions), padding="longest", max_length=max_length, truncation=True,
                           return_tensors="pt")
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}


def normalize_for_clip(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> CLIP mean/std normalised."""
    from common.eval.extractor import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels + 1) / 2 - mean) / std


def text_encoder_from_clip(clip: CLIPModel):
    """toy-clip's text tower as a standalone `CLIPTextModel` (the SD text encoder), same weights."""
    from transformers import CLIPTextModel

    enc = CLIPTextModel(clip.config.text_config)
    target = enc.text_model if hasattr(enc, "text_model") else enc  # transformers 5 flattened the wrapper
    target.load_state_dict(clip.text_model.state_dict())
    return enc.eval()


def text_encoder_2_from_clip(clip: CLIPModel) -> CLIPTextModelWithProjection:
    """toy-clip's text tower with its text_projection (pooled output = toy-clip's 64-d text embedding): SDXL's
    second text encoder, same weights."""
    config = clip.config.text_config.to_dict()
    config["projection_dim"] = clip.config.projection_dim
    enc = CLIPTextModelWithProjection(type(clip.config.text_config)(**config))
    enc.text_model.load_state_dict(clip.text_model.state_dict())
    enc.text_projection.load_state_dict(clip.text_projection.state_dict())
    return enc.eval()


def _need(path: str | None, flag: str) -> Path:
    if not path or not Path(path).is_dir():
        raise UsageError(f"{flag} must name an existing folder (got {path!r})")
    return Path(path)


# ------------------------------------------------------------------------------------------------------ methods


class ClipMethod(TrainingMethod):
    """Contrastive (InfoNCE both ways, learned temperature) training of toy-clip on scene/caption pairs.

    With `shape_negatives` = K > 0 every image also meets K hard negatives: its own caption with the first
    object's shape swapped for another base shape (NegCLIP's recipe). Colours and backgrounds alone separate
    most pairs of a batch, so without them the shape words are learned last (zero-shot shape reading stayed
    at chance after 400 steps, see MODEL_CARD.md).
    """

    name = "toy-clip"

    def __init__(self, init_path: str | None = None, shape_negatives: int = 0, data_seed: int = 0) -> None:
        self.init_path, self.shape_negatives, self.data_seed = init_path, shape_negatives, data_seed

    def setup(self, accelerator) -> None:
        self.device = accelerator.device
        if self.init_path:
            self.clip = CLIPModel.from_pretrained(_need(self.init_path, "--clip_path"), dtype=torch.float32)
        else:
            self.clip = models.build_toy_clip()
        self.clip.to(self.device)

    def modules(self):
        return {"clip": self.clip}

    def trainable_parameters(self):
        return self.clip.parameters()

    def _negatives(self, captions: Sequence[str], indices: Sequence[int]) -> list[str]:
        """K captions per item, each with object 0's shape word replaced by another base shape."""
        from common.toyworld.scenes import BASE_SHAPES

        out = []
        for caption, index in zip(captions, indices):
            shape = make_scene(int(index), self.data_seed).objects[0].shape
            others = [s for s in BASE_SHAPES if s != shape]
            picks = torch.randperm(len(others))[: self.shape_negatives].tolist()
            out.extend(caption.replace(f" {shape}", f" {others[k]}", 1) for k in picks)
        return out

    def loss(self, batch, accelerator):
        pixels = normalize_for_clip(batch["pixels"].to(self.device))
        if not self.shape_negatives:
            text = {k: v.to(self.device) for k, v in clip_text_inputs(batch["caption"]).items()}
            return self.clip(**text, pixel_values=pixels, return_loss=True).loss
        captions = list(batch["caption"])
        b = len(captions)
        texts = captions + self._negatives(captions, batch["index"].tolist())
        text = {k: v.to(self.device) for k, v in clip_text_inputs(texts).items()}
        out = self.clip(**text, pixel_values=pixels)
        logits = out.logits_per_image  # [B, B * (1 + K)]: positives first, then every image's hard negatives
        target = torch.arange(b, device=self.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target)) / 2

    def state_to_save(self):
        return {}

    def save_final(self, directory) -> None:
        model = extract_model_from_parallel(self.clip)
        model.save_pretrained(Path(directory) / "toy-clip")


class VaeMethod(TrainingMethod):
    """Reconstruction (MSE) + a small KL term, like SD's VAE without the GAN and perceptual losses."""

    name = "toy-vae"

    def __init__(self, kl_weight: float, data_seed: int, init_path: str | None = None,
                 decoder_only: bool = False) -> None:
        self.kl_weight, self.data_seed = kl_weight, data_seed
        self.init_path, self.decoder_only = init_path, decoder_only

    def setup(self, accelerator) -> None:
        self.device = accelerator.device
        if self.init_path:
            self.vae = AutoencoderKL.from_pretrained(_need(self.init_path, "--vae_path")).to(self.device)
        else:
            self.vae = models.build_toy_vae().to(self.device)
        if self.decoder_only:  # the latent space stays fixed: a UNet trained on it keeps working
            for part in (self.vae.encoder, self.vae.quant_conv):
                if part is not None:
                    part.requires_grad_(False)

    def modules(self):
        return {"vae": self.vae}

    def trainable_parameters(self):
        return [p for p in self.vae.parameters() if p.requires_grad]

    def loss(self, batch, accelerator):
        x = batch["pixels"].to(self.device)
        if self.decoder_only:
            with torch.no_grad():
                z = self.vae.encode(x).latent_dist.mode()  # the latents the UNet is trained on
            return F.mse_loss(self.vae.decode(z).sample, x)
        dist = self.vae.encode(x).latent_dist
        recon = self.vae.decode(dist.sample()).sample
        return F.mse_loss(recon, x) + self.kl_weight * dist.kl().mean() / x[0].numel()

    def state_to_save(self):
        return {}

    @torch.no_grad()
    def save_final(self, directory) -> None:
        """Saves the VAE with `scaling_factor` = 1 / std of its latents over 512 fixed scenes (SD's recipe)."""
        vae = extract_model_from_parallel(self.vae)
        x = torch.stack([image_tensor(render(make_scene(i, self.data_seed + 1))) for i in range(512)]).to(self.device)
        std = vae.encode(x).latent_dist.mode().std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        vae.save_pretrained(Path(directory) / "vae")


class UnetMethod(TrainingMethod):
    """toy-sd's UNet on frozen latents and frozen toy-clip text states: SD's epsilon objective."""

    name = "toy-sd"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def setup(self, accelerator) -> None:
        self.device = accelerator.device
        self.vae = AutoencoderKL.from_pretrained(_need(self.args.vae_path, "--vae_path")).to(self.device).eval()
        clip = CLIPModel.from_pretrained(_need(self.args.clip_path, "--clip_path"))
        self.text_encoder = text_encoder_from_clip(clip).to(self.device).requires_grad_(False)
        self.vae.requires_grad_(False)
        self.tokenizer = toy_tokenizer()
        self.noise_scheduler = DDPMScheduler.from_config(models.toy_scheduler().config)
        self.unet = models.build_toy_unet().to(self.device)

    def modules(self):
        return {"unet": self.unet}

    def trainable_parameters(self):
        return self.unet.parameters()

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """[B, 77, 32] last hidden states, exactly as StableDiffusionPipeline encodes prompts."""
        ids = self.tokenizer(list(captions), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def loss(self, batch, accelerator):
        latents = batch["latents"].to(self.device) * self.vae.config.scaling_factor
        noised = noise_latents(self.noise_scheduler, latents)
        pred = self.unet(noised.x_t, noised.t, self.encode_text(batch["caption"])).sample
        return masked_mse(pred, noised.target)

    def state_to_save(self):
        return {}

    def save_final(self, directory) -> None:
        unet = extract_model_from_parallel(self.unet)
        unet.save_pretrained(Path(directory) / "unet")

    def pipeline(self):
        from diffusers import StableDiffusionPipeline

        unet = extract_model_from_parallel(self.unet)
        return assemble_pipeline(self.vae, self.text_encoder, unet)

    def validate(self, step: int):
        return [sample_grid(self.pipeline(), VALIDATION_PROMPTS, seed=0)]


class SdxlUnetMethod(UnetMethod):
    """toy-sdxl's UNet: toy-sd's converted to SDXL layout (exactly toy-sd at step 0, `models.sdxl_unet_from_sd`),
    fine-tuned with SDXL's conditioning on the sd stage's data.

    SDXL conditions on the penultimate hidden states of both text encoders (no final LayerNorm), concatenated
    [B, 77, 32 + 32], plus the pooled, projected text of encoder 2 [B, 64] and the time ids (32, 32, 0, 0, 32, 32)
    of an uncropped 32x32 image; toy-sd saw the final LayerNorm's states, so the converted UNet must adapt.
    Both encoders are toy-clip's text tower at toy-sd's step (frozen); the prompts go through diffusers'
    `StableDiffusionXLPipeline.encode_prompt`, so training sees exactly what sampling feeds the UNet.
    """

    name = "toy-sdxl"

    def setup(self, accelerator) -> None:
        self.device = accelerator.device
        fp32 = {"dtype": torch.float32}  # trains in fp32 also from the fp16 exported folders
        self.vae = AutoencoderKL.from_pretrained(_need(self.args.vae_path, "--vae_path"), **fp32).to(self.device)
        self.vae.eval().requires_grad_(False)
        clip = CLIPModel.from_pretrained(_need(self.args.clip_path, "--clip_path"), **fp32)
        self.text_encoder = text_encoder_from_clip(clip).to(self.device).requires_grad_(False)
        self.text_encoder_2 = text_encoder_2_from_clip(clip).to(self.device).requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_config(models.toy_scheduler().config)
        if self._resuming() and not (self.args.unet_path and Path(self.args.unet_path).is_dir()):
            self.unet = models.build_toy_sdxl_unet().to(self.device)  # the checkpoint restores the weights
        else:
            sd_unet = UNet2DConditionModel.from_pretrained(_need(self.args.unet_path, "--unet_path"), **fp32)
            if sd_unet.config.addition_embed_type is not None:
                raise UsageError(f"--unet_path {self.args.unet_path} is not a toy-sd UNet "
                                 "(it has SDXL's add_embedding)")
            self.unet = models.sdxl_unet_from_sd(sd_unet).to(self.device)
        # encode_prompt needs only the text encoders and tokenizers; the UNet slot is filled for the validation
        self._text_pipe = assemble_sdxl_pipeline(self.vae, self.text_encoder, self.text_encoder_2, self.unet)

    def _resuming(self) -> bool:
        """True when the Trainer will load a checkpoint (then the toy-sd UNet to convert may be gone)."""
        from common.train.checkpoints import resolve_resume

        spec = getattr(self.args, "resume_from_checkpoint", None)
        return spec is not None and resolve_resume(self.args.output_dir, spec) is not None

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [B, 77, 64], pooled [B, 64]) exactly as StableDiffusionXLPipeline encodes prompts."""
        embeds, _, pooled, _ = self._text_pipe.encode_prompt(list(captions), device=self.device,
                                                              num_images_per_prompt=1,
                                                              do_classifier_free_guidance=False)
        return embeds, pooled

    def loss(self, batch, accelerator):
        latents = batch["latents"].to(self.device) * self.vae.config.scaling_factor
        noised = noise_latents(self.noise_scheduler, latents)
        embeds, pooled = self.encode_text(batch["caption"])
        size = (models.IMAGE_SIZE, models.IMAGE_SIZE)  # every scene is an uncropped 32x32 picture
        time_ids = sdxl_add_time_ids(size, (0, 0), size, batch=len(latents), device=self.device)
        pred = self.unet(noised.x_t, noised.t, embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        return masked_mse(pred, noised.target)

    def pipeline(self):
        unet = extract_model_from_parallel(self.unet)
        return assemble_sdxl_pipeline(self.vae, self.text_encoder, self.text_encoder_2, unet)


def assemble_sdxl_pipeline(vae, text_encoder, text_encoder_2, unet):
    """toy-sdxl as a StableDiffusionXLPipeline: toy-sd's VAE, scheduler and tokenizer (for both encoders: toy-clip
    pads with the end token, SDXL's second tokenizer with "!"; the causal towers make the difference reach only
    padded positions, but the trained tower saw end-token padding). `force_zeros_for_empty_prompt` is off: the
    unconditional branch was trained on the encoded empty caption, as toy-sd's (SDXL base zeroes it instead)."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer = clip_tokenizer()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=models.toy_scheduler(), force_zeros_for_empty_prompt=False,
                                     add_watermarker=False)


def assemble_pipeline(vae, text_encoder, unet):
    """toy-sd as a StableDiffusionPipeline (DDIM scheduler, offline CLIP tokenizer, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=models.toy_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def sample_grid(pipe, prompts: Sequence[str], seed: int = 0, per_prompt: int = 4, steps: int = 25,
                guidance_scale: float = 4.0):
    """A grid image: one row per prompt, `per_prompt` samples each (DDIM, fixed seed)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    images = pipe(list(prompts) * 1, num_images_per_prompt=per_prompt, num_inference_steps=steps,
                  guidance_scale=guidance_scale, generator=g, output_type="pil").images
    size = images[0].width
    grid = Image.new("RGB", (per_prompt * size, len(prompts) * size))
    for k, img in enumerate(images):
        grid.paste(img, ((k % per_prompt) * size, (k // per_prompt) * size))
    return grid


# ------------------------------------------------------------------------------------------------------- export


def _half_copy(module):
    import copy

    return copy.deepcopy(module).to(torch.float16)


def export(args: argparse.Namespace) -> None:
    """fp16 toy-clip/ and toy-sd/ (diffusers format) into --export_dir, with loss curves and a sample grid."""
    from common.io import atomic_save_image
    from common.toyworld.report import loss_curve_image, read_losses_chain

    out = Path(args.export_dir)
    clip = CLIPModel.from_pretrained(_need(args.clip_path, "--clip_path")).eval()
    vae = AutoencoderKL.from_pretrained(_need(args.vae_path, "--vae_path")).eval()
    unet = UNet2DConditionModel.from_pretrained(_need(args.unet_path, "--unet_path")).eval()
    _half_copy(clip).save_pretrained(out / "toy-clip")
    text_clip = CLIPModel.from_pretrained(_need(args.sd_clip_path, "--sd_clip_path")) if args.sd_clip_path else clip
    pipe = assemble_pipeline(vae, text_encoder_from_clip(text_clip), unet)
    pipe_half = assemble_pipeline(_half_copy(vae), _half_copy(pipe.text_encoder), _half_copy(unet))
    pipe_half.save_pretrained(out / "toy-sd")
    atomic_save_image(sample_grid(pipe, VALIDATION_PROMPTS), out / "samples_toy-sd.png")
    for stage, runs in (("toy-clip", args.clip_run), ("toy-sd", args.sd_run)):
        if runs:
            losses = read_losses_chain(runs.split(","))
            if losses:
                atomic_save_image(loss_curve_image(losses, f"{stage} training loss"), out / f"loss_{stage}.png")


#: what toy-sdxl/ holds besides its UNet: the components it shares with its sibling toy-sd/ (read by
#: common.models.loading, which loads them from there with their own from_pretrained)
SDXL_SHARED = {"vae": "vae", "text_encoder": "text_encoder", "tokenizer": "tokenizer", "tokenizer_2": "tokenizer",
               "scheduler": "scheduler"}


def export_sdxl(args: argparse.Namespace) -> None:
    """toy-sdxl/ into --export_dir, next to toy-sd/ whose components it shares (no second copy on disk).

    Written: model_index.json (a complete StableDiffusionXLPipeline index), unet/ (fp16), text_encoder_2/ =
    its config + text_projection.safetensors only (the tower is toy-sd's text encoder), shared_components.json
    (which of toy-sd's folders fill the other slots), the sample grid and loss curve. Refuses when toy-sd's
    text encoder is not the tower the UNet was trained with (--sd_clip_path, compared in fp16).
    """
    import json
    import shutil
    import tempfile

    from common.io import atomic_save_image
    from common.models.loading import load_pipeline
    from common.toyworld.report import loss_curve_image, read_losses_chain

    out = Path(args.export_dir)
    base = out / "toy-sd"
    if not (base / "model_index.json").is_file():
        raise UsageError(f"toy-sdxl shares toy-sd's components: export toy-sd into {base} first")
    clip = CLIPModel.from_pretrained(_need(args.sd_clip_path or args.clip_path, "--sd_clip_path")).eval()
    unet = UNet2DConditionModel.from_pretrained(_need(args.unet_path, "--unet_path")).eval()
    if unet.config.addition_embed_type != "text_time":
        raise UsageError(f"--unet_path {args.unet_path} is not an SDXL-layout UNet: train it with --stage sdxl")
    tower = load_weights(base / "text_encoder" / "model.safetensors")
    for name, value in clip.text_model.state_dict().items():
        if not torch.equal(tower[name].float(), value.half().float()):
            raise UsageError(f"{base}/text_encoder is not the text tower of {args.sd_clip_path} ({name} differs)")
    enc2 = text_encoder_2_from_clip(clip)
    pipe = assemble_sdxl_pipeline(AutoencoderKL.from_pretrained(base / "vae"), text_encoder_from_clip(clip), enc2,
                                  unet)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".toy-sdxl-") as tmp:
        staging = Path(tmp) / "toy-sdxl"
        pipe.save_config(staging)  # model_index.json
        _half_copy(unet).save_pretrained(staging / "unet")
        enc2.config.save_pretrained(staging / "text_encoder_2")
        save_weights({"text_projection.weight": enc2.text_projection.weight.detach().half().contiguous()},
                     staging / "text_encoder_2" / "text_projection.safetensors")
        (staging / "shared_components.json").write_text(json.dumps(
            {"_note": "toy-sdxl's other components are toy-sd's (no second copy): loaded from ../toy-sd/<folder>; "
                      "text_encoder_2 = ../toy-sd/text_encoder's tower + text_encoder_2/text_projection.safetensors",
             "base": "../toy-sd", "components": SDXL_SHARED, "text_encoder_2": "text_encoder"}, indent=2) + "\n")
        target = out / "toy-sdxl"
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    exported = load_pipeline(str(out / "toy-sdxl"))
    atomic_save_image(sample_grid(exported, VALIDATION_PROMPTS), out / "samples_toy-sdxl.png")
    if args.sdxl_run:
        losses = read_losses_chain(args.sdxl_run.split(","))
        if losses:
            atomic_save_image(loss_curve_image(losses, "toy-sdxl training loss"), out / "loss_toy-sdxl.png")


# --------------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> Trainer | None:
    args = parse_args(build_parser(), argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.stage == "export":
        export(args)
        return None
    if args.stage == "export_sdxl":
        export_sdxl(args)
        return None
    if args.stage == "clip":
        method = ClipMethod(args.clip_path, args.shape_negatives, args.data_seed)
        dataset = SceneDataset(args.num_scenes, args.data_seed)
    elif args.stage == "vae":
        method = VaeMethod(args.kl_weight, args.data_seed, args.vae_path, args.decoder_only)
        dataset = SceneDataset(args.num_scenes, args.data_seed)
    else:
        method = SdxlUnetMethod(args) if args.stage == "sdxl" else UnetMethod(args)
        dataset = _LatentPool(args, method)
    trainer = Trainer(args, method, dataset)
    trainer.train()
    return trainer


class _LatentPool(torch.utils.data.Dataset):
    """The sd stage's data: VAE latents of `--num_scenes` scenes, encoded once after setup and cached in
    output_dir/latent_pool.safetensors (a resumed run reads them back instead of re-encoding)."""

    def __init__(self, args: argparse.Namespace, method: UnetMethod) -> None:
        self.args, self.method, self._data = args, method, None

    def __len__(self) -> int:
        return self.args.num_scenes

    @property
    def data(self) -> LatentSceneDataset:
        if self._data is None:
            path = Path(self.args.output_dir) / "latent_pool.safetensors"
            if path.exists():
                latents = load_weights(path)["latents"]
            else:
                latents = encode_pool(self.method.vae, self.args.num_scenes, self.args.data_seed)
                save_weights({"latents": latents}, path)
            self._data = LatentSceneDataset(latents, self.args.data_seed,
                                            empty_caption_prob=self.args.empty_caption_prob)
        return self._data

    def __getitem__(self, index: int):
        return self.data[index]


@torch.no_grad()
def encode_pool(vae, num_scenes: int, seed: int, batch: int = 256) -> torch.Tensor:
    """[N, 4, 16, 16] unscaled latent means of scenes 0..N-1 of dataset `seed`."""
    from tqdm.auto import tqdm

    device = next(vae.parameters()).device
    rows = []
    for start in tqdm(range(0, num_scenes, batch), desc="encoding scenes"):
        x = torch.stack([image_tensor(render(make_scene(i, seed))) for i in range(start, min(start + batch, num_scenes))])
        rows.append(vae.encode(x.to(device)).latent_dist.mode().cpu())
    return torch.cat(rows)


if __name__ == "__main__":  # pragma: no cover
    main()
