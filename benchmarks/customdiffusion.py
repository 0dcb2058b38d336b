"""Custom Diffusion benchmarks (printed, never failing a test run); issue #4 item 6.

1. Training-step cost of our wiring vs diffusers' stock one. Ours: `customdiffusion.attention.install` puts our
   `CustomDiffusionProcessor` (a subclass of diffusers' CustomDiffusionAttnProcessor2_0 that also honours the
   residual / output-rescale options of `Attention`) on every attn2 and a parameter-free one on every attn1.
   Stock: the wiring of diffusers' examples/custom_diffusion/train_custom_diffusion.py -- a
   CustomDiffusionAttnProcessor2_0(train_kv=True, ...) per attn2 loaded from the base to_k/to_v, a parameter-free
   one per attn1, `unet.set_attn_processor`. Both UNets start from the same weights and run the same step on the
   same random latents / text embeddings: UNet forward + masked MSE (common.train.diffusion.masked_mse, for both,
   so the losses must agree) + backward + grad-norm clip + AdamW step + zero_grad. VAE and text encoder are left
   out: they are identical for both and would only dilute the ratio. Interleaved (rounds of --steps steps,
   alternating who goes first), median and best single step after warm-up; target ratio <= 1.05. Peak memory
   (CUDA only): max allocated during one step above what was resident.
   The SD-1.4-shaped UNet is timed only on CUDA.
2. Size of a saved concept for SD-1.4's real UNet shape (random weights, built in code): trainable parameters,
   our default output (diffusers folder, safetensors), the reference delta.bin (fp32) and the compressed delta at
   ratio 0.6 (paper: 75 MB and about 15 MB). A random "fine-tuned" K/V is W0 + delta; the compressed size depends
   entirely on the delta's spectrum, so the assumed one is printed (see `synthetic_delta`), with the isotropic
   (pure-noise) delta as the worst case.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# this file is named like the package: keep `import customdiffusion` pointing at the package, not at us
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0  # noqa: E402

from common.train.diffusion import masked_mse, noise_latents  # noqa: E402
from customdiffusion import attention  # noqa: E402
from customdiffusion.compress import DEFAULT_RATIO, compress  # noqa: E402
from customdiffusion.formats import CustomDiffusionWeights, save, save_diffusers  # noqa: E402

SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
TEXT_LEN = 77
PAPER_MB, PAPER_COMPRESSED_MB = 75.0, 15.0
# train_custom_diffusion.py defaults
LR, BETAS, WEIGHT_DECAY, EPS, MAX_GRAD_NORM = 1e-5, (0.9, 0.999), 1e-2, 1e-8, 1.0


def sd14_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD-1.4's UNet config with random weights (~860M parameters; ~15 s to build on a CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**SD14_UNET)


def tiny_unet() -> UNet2DConditionModel:
    from common.models.tiny import build_tiny

    return build_tiny("tiny-sd").unet


# ------------------------------------------------------------------------------------------------- wiring


def install_stock(unet: UNet2DConditionModel) -> list[torch.nn.Parameter]:
    """The processor set-up of diffusers' train_custom_diffusion.py (freeze_model=crossattn_kv)."""
    unet.requires_grad_(False)
    cfg, st = unet.config, unet.state_dict()
    procs: dict[str, CustomDiffusionAttnProcessor2_0] = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False, hidden_size=None,
                                                          cross_attention_dim=None)
            continue
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = cfg.block_out_channels[int(name[len("down_blocks.")])]
        layer = name.split(".processor")[0]
        proc = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=hidden,
                                               cross_attention_dim=cfg.cross_attention_dim).to(unet.device)
        proc.load_state_dict({"to_k_custom_diffusion.weight": st[layer + ".to_k.weight"],
                              "to_v_custom_diffusion.weight": st[layer + ".to_v.weight"]})
        procs[name] = proc
    unet.set_attn_processor(procs)
    return [p for proc in unet.attn_processors.values() if isinstance(proc, torch.nn.Module)
            for p in proc.parameters()]


def stock_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """Trainable weights of the stock wiring, keyed like `attention.get_state` (diffusers' layout)."""
    return {f"{name}.{k}": p.detach() for name, proc in unet.attn_processors.items()
            if isinstance(proc, torch.nn.Module) for k, p in proc.named_parameters()}


class Trainee:
    """A UNet with trainable Custom Diffusion processors and its AdamW; `step(batch)` is what gets timed."""

    def __init__(self, unet: UNet2DConditionModel, params: list[torch.nn.Parameter]):
        self.unet, self.params = unet.train(), params
        self.optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = self.unet(batch["x_t"], batch["t"], batch["embeds"]).sample
        loss = masked_mse(pred, batch["target"], batch["mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def make_batch(unet: UNet2DConditionModel, batch_size: int, device: torch.device, seed: int = 0
               ) -> dict[str, torch.Tensor]:
    """Random latents [B, 4, s, s] noised by SD's DDPM schedule, text features [B, 77, D], and a resize-
    augmentation-like mask [B, 1, s, s] (the first sample whole, the others a centred 3/4 box)."""
    cfg = unet.config
    s = cfg.sample_size
    g = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
    noised = noise_latents(scheduler, torch.randn(batch_size, cfg.in_channels, s, s, generator=g), generator=g)
    mask = torch.ones(batch_size, 1, s, s)
    lo, hi = s // 8, s - s // 8
    mask[1:] = 0
    mask[1:, :, lo:hi, lo:hi] = 1
    batch = dict(x_t=noised.x_t, t=noised.t, target=noised.target, mask=mask,
                 embeds=torch.randn(batch_size, TEXT_LEN, cfg.cross_attention_dim, generator=g))
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(fn: Callable[[], object], steps: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` calls of `fn` (per call, so a descheduled call does not spoil the others)."""
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory allocated during `fn` above what was resident before it (MB); None off CUDA."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 1e6


def time_case(model: str, args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if model == "sd14-shape" and device.type != "cuda":
        print(f"{model:<12} step timing skipped: needs CUDA (device={device.type})")
        return
    base = (sd14_unet() if model == "sd14-shape" else tiny_unet()).to(device)
    ours_unet, stock_unet = copy.deepcopy(base), copy.deepcopy(base)
    del base
    attention.install(ours_unet, "crossattn_kv")
    ours = Trainee(ours_unet, list(attention.trainable_parameters(ours_unet).values()))
    stock = Trainee(stock_unet, install_stock(stock_unet))
    batch = make_batch(ours_unet, args.batch_size, device)

    # Same start, same batch: first-step losses and updated weights must agree.
    loss_diff = float((ours.step(batch) - stock.step(batch)).abs())
    a, b = attention.get_state(ours_unet), stock_state(stock_unet)
    if a.keys() != b.keys():
        raise RuntimeError("ours and stock train different parameter sets")
    param_diff = max(float((a[k] - b[k]).abs().max()) for k in a)

    for _ in range(args.warmup):
        ours.step(batch), stock.step(batch)
    peak_ours, peak_stock = _peak_mb(lambda: ours.step(batch), device), _peak_mb(lambda: stock.step(batch), device)
    t_ours, t_stock = [], []
    for r in range(args.repeats):  # interleaved, alternating who goes first, so background load hits both alike
        pair = [(ours, t_ours), (stock, t_stock)]
        for trainee, times in (pair if r % 2 == 0 else pair[::-1]):
            times.extend(_time_steps(lambda: trainee.step(batch), args.steps, device))
    med_o, med_s = statistics.median(t_ours) * 1e3, statistics.median(t_stock) * 1e3
    best_ratio = min(t_ours) / min(t_stock)
    mem = "n/a on CPU" if peak_ours is None else f"{peak_ours:.0f}/{peak_stock:.0f} ({peak_ours / peak_stock:.3f})"
    print(f"{model:<12}{med_o:>10.2f}{med_s:>10.2f}{med_o / med_s:>8.3f}{best_ratio:>11.3f}"
          f"{loss_diff:>11.2e}{param_diff:>11.2e}  {mem}")


# ------------------------------------------------------------------------------------------------- sizes


def synthetic_delta(w0: torch.Tensor, g: torch.Generator, decay: float, noise: float, rel: float = 1e-2
                    ) -> torch.Tensor:
    """A stand-in for a trained delta of w0 [out, in]: U diag(s) V^T with random orthonormal U, V and a
    power-law spectrum s_i = i^-decay over all min(out, in) directions, scaled to ||.||_F = rel * ||w0||_F,
    plus iid Gaussian noise with Frobenius norm `noise` times that. decay=0 and noise=0 is isotropic."""
    m, n = w0.shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    delta = (u * s) @ v.T
    delta *= rel * w0.norm() / delta.norm()
    if noise > 0:
        eps = torch.randn(m, n, generator=g)
        delta += eps * (noise * delta.norm() / eps.norm())
    return delta


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _mb(n: int) -> str:
    return f"{n / 1e6:8.2f} MB ({n / 2**20:7.2f} MiB)"


def _compressed_line(label: str, weights: CustomDiffusionWeights, base: dict[str, torch.Tensor], folder: Path
                     ) -> None:
    small = compress(weights, base, DEFAULT_RATIO)
    size = _bytes(save(small, folder / "compressed_delta.bin", fmt="delta"))
    ranks = [v["u"].shape[1] for v in small.unet.values() if isinstance(v, dict)]
    head = f"  compressed delta.bin @{DEFAULT_RATIO}, {label}:"
    print(f"{head:<40}{_mb(size)}  vs paper ~{PAPER_COMPRESSED_MB:.0f} MB: "
          f"x{size / 1e6 / PAPER_COMPRESSED_MB:.2f}; kept rank min/median/max "
          f"{min(ranks)}/{int(statistics.median(ranks))}/{max(ranks)}")


def size_report(args: argparse.Namespace) -> None:
    """Saved-concept sizes for SD-1.4's UNet shape (CPU; random weights; one modifier token of 768 floats).

    Runs single-threaded: the float64 SVDs of `compress` are no faster on a few threads and many times slower
    when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _size_report(args)
    finally:
        torch.set_num_threads(threads)


def _size_report(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    unet = sd14_unet()
    attention.install(unet, "crossattn_kv")
    state = attention.get_state(unet)
    n_params = sum(v.numel() for v in state.values())
    base = {k: p.detach() for k, p in unet.named_parameters() if attention.is_kv(k)}
    g = torch.Generator().manual_seed(0)
    token = {"<new1>": [torch.randn(SD14_UNET["cross_attention_dim"], generator=g) * 0.01]}

    def finetuned(decay: float, noise: float) -> CustomDiffusionWeights:
        unet_sd = {}
        for k, v in state.items():
            name = attention.proc_key_to_param(k)
            unet_sd[name] = (v + synthetic_delta(v, g, decay, noise)).float()
        return CustomDiffusionWeights(unet_sd, token)

    weights = finetuned(args.delta_decay, args.delta_noise)
    print("size (SD-1.4 UNet shape, random weights, freeze_model=crossattn_kv, 1 modifier token):")
    print(f"  trainable params: {n_params:,} in {len(state)} K/V matrices ({len(state) // 2} attn2 layers)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ours = save_diffusers(weights, folder / "diffusers").parent
        size = _bytes(ours)
        print(f"  ours (diffusers folder, safetensors): {_mb(size)}  vs paper {PAPER_MB:.0f} MB: "
              f"x{size / 1e6 / PAPER_MB:.2f}")
        size = _bytes(save(weights, folder / "delta.bin", fmt="delta"))
        print(f"  delta.bin (fp32, reference layout):   {_mb(size)}  vs paper {PAPER_MB:.0f} MB: "
              f"x{size / 1e6 / PAPER_MB:.2f}")
        print(f"  assumed delta W - W0: U diag(i^-{args.delta_decay:g}) V^T (random orthonormal U, V), "
              f"|.|_F = 1% of |W0|_F, + iid noise of {args.delta_noise:g}x its norm")
        _compressed_line("assumed", weights, base, folder)
        _compressed_line("isotropic", finetuned(0.0, 0.0), base, folder)
    print(f"  (size report took {time.perf_counter() - t0:.0f} s)")


# --------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "sd14-shape"], default="tiny",
                   help="UNet to time: tiny-sd (64 px) or SD-1.4's shape with random weights (512 px; CUDA only)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per wiring and round")
    p.add_argument("--repeats", type=int, default=7,
                   help="interleaved rounds of --steps timed steps per wiring (median and best step reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per wiring before timing")
    p.add_argument("--batch_size", type=int, default=2, help="training batch size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--skip_size", action="store_true", help="skip the SD-1.4-shape concept size report")
    p.add_argument("--delta_decay", type=float, default=1.0,
                   help="size report: power-law exponent of the assumed fine-tuning delta's singular values")
    p.add_argument("--delta_noise", type=float, default=0.1,
                   help="size report: iid noise added to the assumed delta, relative to its Frobenius norm")
    return p


def main() -> None:
    args = build_parser().parse_args()
    import diffusers

    print(f"device={args.device} batch={args.batch_size} steps={args.steps} repeats={args.repeats} "
          f"warmup={args.warmup} torch={torch.__version__} diffusers={diffusers.__version__}")
    print(f"{'case':<12}{'ours_ms':>10}{'stock_ms':>10}{'ratio':>8}{'best_ratio':>11}{'loss_diff':>11}"
          f"{'param_diff':>11}  peak_MB ours/stock (ratio)")
    time_case(args.model, args)
    if not args.skip_size:
        size_report(args)


if __name__ == "__main__":
    main()
