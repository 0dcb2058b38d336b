"""MuDI benchmark (printed, never failing a test run): one SDXL-shaped LoRA training step with and without
gradient checkpointing (issue #12 item 8). The seed reports ~18 GB on a GPU and < 15 GB with checkpointing.

The step is MuDI's: UNet forward with LoRA (rank 32 on to_q/k/v/out) -> DCO reference forward with the LoRA off
(no grad) -> masked MSE -> DCO -> backward -> AdamW step. VAE and text encoders are left out (frozen, the same
in both cases). Memory:
* CPU (any device): bytes of the tensors autograd saves for backward (`saved_tensors_hooks`), the activation
  memory that checkpointing trades for recomputation;
* CUDA: also `max_memory_allocated` during the step, above what was resident before it.
`--unet sdxl` is SDXL base's real UNet shape (random weights, 2.6 B parameters: CUDA); `--unet small` (default on
CPU) keeps SDXL's block structure (text-time embedding, 2/10 transformer layers) at a fraction of the width.

    python benchmarks/mudi.py                                # CPU, small SDXL-shaped UNet
    python benchmarks/mudi.py --device cuda --unet sdxl --dtype fp16 --resolution 1024
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# this file is named like the package: keep `import mudi` pointing at the package, not at us
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from common.train.lora import add_lora, lora_disabled  # noqa: E402
from mudi.losses import dco_loss, masked_mean_mse  # noqa: E402
from mudi.train import MUDI_TARGET_MODULES  # noqa: E402

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SMALL_UNET = dict(SDXL_UNET, block_out_channels=(32, 64, 128), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
                  transformer_layers_per_block=(1, 2, 4), addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16)
POOLED = {"sdxl": 1280, "small": 32}


def build_unet(kind: str, device: str, dtype: torch.dtype, checkpointing: bool) -> tuple[UNet2DConditionModel, list]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**(SDXL_UNET if kind == "sdxl" else SMALL_UNET))
    unet.requires_grad_(False)
    unet.to(device)
    if dtype != torch.float32:
        unet.to(dtype=dtype)
    params = add_lora(unet, 32, target_modules=MUDI_TARGET_MODULES)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet, params


def make_inputs(kind: str, resolution: int, device: str, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    h = resolution // 8
    cfg = SDXL_UNET if kind == "sdxl" else SMALL_UNET
    x = dict(sample=torch.randn(1, 4, h, h, generator=gen), timestep=torch.tensor([500]),
             encoder_hidden_states=torch.randn(1, 77, cfg["cross_attention_dim"], generator=gen),
             added_cond_kwargs={"text_embeds": torch.randn(1, POOLED[kind], generator=gen),
                                "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]]).float()})
    target, mask = torch.randn(1, 4, h, h, generator=gen), torch.ones(1, 1, h, h)
    move = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None)  # noqa: E731
    x = {k: ({kk: move(vv) for kk, vv in v.items()} if isinstance(v, dict) else move(v)) for k, v in x.items()}
    return {"inputs": x, "target": move(target), "mask": move(mask)}


def train_step(unet, optimizer, batch) -> tuple[float, int]:
    """One MuDI step; returns (loss, bytes saved for backward)."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pred = unet(**batch["inputs"]).sample
        with torch.no_grad(), lora_disabled(unet):
            ref = unet(**batch["inputs"]).sample
        loss = dco_loss(masked_mean_mse(pred, batch["target"], batch["mask"]),
                        masked_mean_mse(ref, batch["target"], batch["mask"]), 1000.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), saved[0]


def measure(kind: str, checkpointing: bool, args, dtype: torch.dtype) -> dict:
    unet, params = build_unet(kind, args.device, dtype, checkpointing)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    batch = make_inputs(kind, args.resolution, args.device, dtype)
    cuda = args.device.startswith("cuda")
    train_step(unet, optimizer, batch)  # warm-up: optimizer state, kernels
    times, peak, saved = [], 0, 0
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        _, saved = train_step(unet, optimizer, batch)
        if cuda:
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
            resident = torch.cuda.memory_allocated()
        times.append(time.perf_counter() - start)
    out = {"time": statistics.median(times), "saved": saved, "peak": peak}
    if cuda:
        out["resident"] = resident
    del unet, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--unet", default=None, choices=["small", "sdxl"], help="UNet shape (default: sdxl on CUDA)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: 1024 sdxl, 128 small)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="frozen-weight dtype")
    p.add_argument("--steps", type=int, default=2, help="timed steps per case")
    args = p.parse_args(argv)
    kind = args.unet or ("sdxl" if args.device.startswith("cuda") else "small")
    args.resolution = args.resolution or (1024 if kind == "sdxl" else 128)
    name = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    plain = measure(kind, False, args, dtype)
    ckpt = measure(kind, True, args, dtype)
    gb = 1024 ** 3
    print(f"unet={kind} resolution={args.resolution} dtype={name} device={args.device}")
    for label, r in (("no checkpointing", plain), ("gradient checkpointing", ckpt)):
        line = f"{label:24s} step {r['time']:.3f} s  saved activations {r['saved'] / gb:.3f} GB"
        if "resident" in r:
            line += f"  peak above resident {r['peak'] / gb:.2f} GB  resident {r['resident'] / gb:.2f} GB"
        print(line)
    print(f"ratio (checkpointing / none): time {ckpt['time'] / plain['time']:.2f}x  "
          f"saved activations {ckpt['saved'] / max(plain['saved'], 1):.3f}x"
          + (f"  peak {ckpt['peak'] / max(plain['peak'], 1):.3f}x" if plain["peak"] else ""))


if __name__ == "__main__":
    main()
