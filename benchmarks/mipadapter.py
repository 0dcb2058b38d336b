"""MIP-Adapter benchmark (printed, never failing a test run); issue #15 item 8.

Time and peak memory of one UNet call (CFG batch of 2) with K = 2 and K = 4 references, three ways, on the same
UNet with the same weights:
* ours: mipadapter's processor (entity rows 1..L_k only, weights folded into the per-reference attention
  probabilities, one matmul with the K*T image values);
* original: the original formulation (attention_processor_multi.py) -- the full 77-row entity map per object
  through `get_attention_scores`, a per-object Python loop of separate attentions, a per-sample loop over the
  entity lengths, the weighted sum of K materialised outputs;
* plain: diffusers' IPAdapterAttnProcessor2_0 with the K images of one adapter ([B, K, E] image embeds: one
  softmax over all K*T tokens; no routing) -- the baseline the issue's <= 1.10x target refers to.
The UNet has SDXL's attention shapes (channels 320/640/1280, heads of 64, cross-attention width 2048, T = 4) but
`--layers` transformer layers per block instead of SDXL's 2/10 so that it runs on a CPU. Peak memory: on CUDA the
max allocated above what was resident; on CPU the peak RSS above the resident set during a second call in a fresh
process whose large blocks are mmapped, so freed memory leaves the RSS (Linux /proc, peak reset before the call).
Interleaved rounds, median per-call time after warm-up. On CPU it first times one attn2 layer at SDXL's 1024 px
down_blocks.1 shape (N = 4096), where the attention's own memory is visible.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

# this file is named like the package: keep `import mipadapter` pointing at the package, not at us
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from common.models.ip_adapter import load_ip_adapter  # noqa: E402
from mipadapter.model import MIPAdapter, random_mip_state  # noqa: E402
from mipadapter.processor import MIPAdapterAttnProcessor, MIPState, cross_object_weights  # noqa: E402

EMBED = 1280  # ViT-bigG/14 projection_dim (sdxl variant)


class OriginalMIPProcessor(MIPAdapterAttnProcessor):
    """The original's computation order and memory use (same maths; used as the benchmark's reference)."""

    def merged_image_branch(self, attn, query, text, mip, scale, grid):
        b, heads, n, d = query.shape
        tokens, embeds, lengths, masks, _ = mip.rows(b)
        k = tokens.shape[1]
        q = query.transpose(1, 2).reshape(b, n, heads * d)
        q_b = attn.head_to_batch_dim(q)  # [B*heads, N, d]
        outs, maps = [], []
        for j in range(k):  # per object: its own attention and its full 77-row word map
            key = attn.head_to_batch_dim(self.to_k_ip[0](tokens[:, j]))
            value = attn.head_to_batch_dim(self.to_v_ip[0](tokens[:, j]))
            probs = attn.get_attention_scores(q_b, key, None)
            outs.append(attn.batch_to_head_dim(torch.bmm(probs, value)))
            with torch.no_grad():
                ent_key = attn.head_to_batch_dim(attn.to_k(embeds[:, j]))  # [B*heads, 77, d]
                full = attn.get_attention_scores(ent_key, q_b.detach(), None)  # [B*heads, 77, N]: softmax over N
                full = full.view(b, heads, -1, n).mean(1)
                maps.append(torch.stack([full[i, 1:1 + int(lengths[i, j])].mean(0) for i in range(b)]))
        w = cross_object_weights(torch.stack(maps, 1).float())
        g = self.gate(text)
        return sum(scale * g[..., None] * w[:, j, :, None].to(text.dtype) * outs[j] for j in range(k))


def scaled_sdxl_unet(layers: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(layers, layers, layers), attention_head_dim=(5, 10, 20),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + 1280, cross_attention_dim=2048,
    ).eval()


def _peak_call(fn, device: torch.device) -> float:
    """MB above the resident set during one call."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def status(key: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])
        raise RuntimeError(key)

    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    base = status("VmRSS")
    fn()
    return (status("VmHWM") - base) / 1024


class Bench:
    """The UNet, the inputs and the three installs, built from the flags (in this process or a child)."""

    def __init__(self, args: argparse.Namespace):
        self.device = torch.device(args.device)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            args.dtype or ("fp16" if self.device.type == "cuda" else "fp32")]
        torch.manual_seed(0)
        self.unet = scaled_sdxl_unet(args.layers).to(self.device, self.dtype)
        self.state = random_mip_state(self.unet, "sdxl", feature_dim=EMBED)
        self.base_procs = dict(self.unet.attn_processors)
        self.lat = args.resolution // 8
        g = torch.Generator().manual_seed(0)
        dev, dt = self.device, self.dtype
        self.x = torch.randn(2, 4, self.lat, self.lat, generator=g).to(dev, dt)
        self.text = torch.randn(2, 77, 2048, generator=g).to(dev, dt)
        self.added = {"text_embeds": torch.randn(2, 1280, generator=g).to(dev, dt),
                      "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2).to(dev, dt)}
        self.refs = {k: (torch.randn(2, k, EMBED, generator=g).to(dev, dt),
                         torch.randn(2, k, 77, 2048, generator=g).to(dev, dt),
                         torch.randint(1, 3, (2, k), generator=g)) for k in args.ks}

    def setup(self, kind: str, k: int):
        """Install `kind` for K = k; returns (handle with .remove(), one-call function)."""
        unet, (feats, words, lengths) = self.unet, self.refs[k]
        unet.set_attn_processor(dict(self.base_procs))
        unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = None, None
        if kind == "plain":
            handle = load_ip_adapter(unet, {"image_proj": self.state["image_proj"], "ip_adapter": {
                kk: v for kk, v in self.state["ip_adapter"].items() if "text_to_weight" not in kk}})
            return handle, lambda: unet(self.x, 500, encoder_hidden_states=self.text,
                                        added_cond_kwargs={**self.added, "image_embeds": [feats]}).sample
        adapter = MIPAdapter(unet, self.state)
        if kind == "orig":
            for name, proc in list(unet.attn_processors.items()):
                if isinstance(proc, MIPAdapterAttnProcessor):
                    orig = OriginalMIPProcessor(proc.hidden_size, proc.cross_attention_dim, 4, name=name)
                    orig.load_state_dict(proc.state_dict())
                    unet.set_attn_processor({**unet.attn_processors, name: orig.to(self.device, self.dtype)})
        tokens = adapter.image_proj(feats.flatten(0, 1)).view(2, k, 4, 2048)
        mip = MIPState(tokens, words, lengths, scale=0.75)
        return adapter, lambda: unet(self.x, 500, encoder_hidden_states=self.text, added_cond_kwargs=self.added,
                                     cross_attention_kwargs={"mip": mip}).sample


def _spawn_pool():
    """A fresh process per measurement whose large blocks are mmapped, so freed memory leaves the RSS."""
    import multiprocessing as mp
    import os

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    return mp.get_context("spawn").Pool(1, maxtasksperchild=1)


def _child_peak(args: argparse.Namespace, kind: str, k: int) -> float:
    """Peak memory of one call in a fresh process (after a warm-up call), in MB."""
    bench = Bench(args)
    _, fn = bench.setup(kind, k)
    with torch.no_grad():
        fn()  # warm-up: library workspaces; freed blocks go back to the OS (MALLOC_MMAP_THRESHOLD_)
        return _peak_call(fn, bench.device)


def _layer(kind: str, k: int, n: int, seed: int = 0):
    """One SDXL down_blocks.1 cross-attention layer (C 640, 10 heads of 64, text width 2048) with `kind` and its
    one-call function on a CFG batch of 2 with N = n latent tokens."""
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    torch.manual_seed(seed)
    attn = Attention(640, cross_attention_dim=2048, heads=10, dim_head=64).eval()
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(2, n, 640, generator=g), torch.randn(2, 77, 2048, generator=g)
    tokens, words = torch.randn(2, k, 4, 2048, generator=g), torch.randn(2, k, 77, 2048, generator=g)
    lengths = torch.randint(1, 3, (2, k), generator=g)
    if kind == "plain":
        attn.set_processor(IPAdapterAttnProcessor2_0(640, 2048, num_tokens=(4,), scale=0.75))
        return lambda: attn(x, encoder_hidden_states=(text, [tokens]))
    attn.set_processor((OriginalMIPProcessor if kind == "orig" else MIPAdapterAttnProcessor)(640, 2048, 4))
    mip = MIPState(tokens, words, lengths, scale=0.75)
    return lambda: attn(x, encoder_hidden_states=text, mip=mip)


def _child_layer_peak(kind: str, k: int, n: int) -> float:
    fn = _layer(kind, k, n)
    with torch.no_grad():
        fn()  # warm-up, as above
        return _peak_call(fn, torch.device("cpu"))


def layer_report(args: argparse.Namespace) -> None:
    """Time and peak memory of one attn2 layer at SDXL's 1024 px down_blocks.1 shape (N = 4096)."""
    n = (args.layer_resolution // 16) ** 2
    print(f"one attn2 layer, SDXL down_blocks.1 at {args.layer_resolution} px (N={n}, C=640, 10 heads), CFG batch 2, CPU")
    print(f"{'case':<6}{'ours ms':>9}{'orig ms':>9}{'plain ms':>9}{'ours/plain':>12}{'ours/orig':>11}"
          f"{'ours MB':>10}{'orig MB':>10}{'plain MB':>10}")
    kinds = ("ours", "orig", "plain")
    for k in args.ks:
        fns = {kd: _layer(kd, k, n) for kd in kinds}
        times = {kd: [] for kd in kinds}
        with torch.no_grad():
            for kd in kinds:
                fns[kd]()
            for r in range(args.layer_rounds):
                for kd in (kinds if r % 2 == 0 else kinds[::-1]):
                    t0 = time.perf_counter()
                    fns[kd]()
                    times[kd].append(time.perf_counter() - t0)
        with _spawn_pool() as pool:
            peaks = {kd: pool.apply(_child_layer_peak, (kd, k, n)) for kd in kinds}
        med = {kd: 1000 * statistics.median(v) for kd, v in times.items()}
        print(f"K={k:<4}{med['ours']:>9.1f}{med['orig']:>9.1f}{med['plain']:>9.1f}{med['ours'] / med['plain']:>12.3f}"
              f"{med['ours'] / med['orig']:>11.3f}{peaks['ours']:>10.1f}{peaks['orig']:>10.1f}{peaks['plain']:>10.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="default: fp16 on CUDA, else fp32")
    p.add_argument("--resolution", type=int, default=256, help="image size (latent = /8; SDXL: 1024)")
    p.add_argument("--layers", type=int, default=1, help="transformer layers per block (SDXL: 2 and 10)")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="numbers of references")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per method first")
    p.add_argument("--layer_resolution", type=int, default=1024, help="image size of the single-layer case")
    p.add_argument("--layer_rounds", type=int, default=7, help="timing rounds of the single-layer case")
    p.add_argument("--skip_unet", action="store_true", help="only the single-layer case")
    args = p.parse_args()
    if args.device == "cpu":
        layer_report(args)
    if args.skip_unet:
        return
    bench = Bench(args)
    device = bench.device
    n_cross = sum(1 for k in bench.base_procs if k.endswith("attn2.processor"))
    print(f"device={device.type} dtype={bench.dtype} latent={bench.lat}x{bench.lat} cross-attn layers={n_cross} "
          f"(SDXL: 70) rounds={args.rounds}")
    print(f"{'case':<6}{'ours s':>9}{'orig s':>9}{'plain s':>9}{'ours/plain':>12}{'ours/orig':>11}"
          f"{'ours MB':>10}{'orig MB':>10}{'plain MB':>10}")
    kinds = ("ours", "orig", "plain")
    for k in args.ks:
        times = {kd: [] for kd in kinds}
        outs, peaks = {}, {}
        with torch.no_grad():
            for kd in kinds:
                handle, fn = bench.setup(kd, k)
                for _ in range(args.warmup):
                    outs[kd] = fn()
                if device.type == "cuda":
                    peaks[kd] = _peak_call(fn, device)
                handle.remove()
            err = (outs["ours"].float() - outs["orig"].float()).abs().max().item()
            for r in range(args.rounds):
                for kd in (kinds if r % 2 == 0 else kinds[::-1]):
                    handle, fn = bench.setup(kd, k)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[kd].append(time.perf_counter() - t0)
                    handle.remove()
        if device.type != "cuda":
            with _spawn_pool() as pool:
                for kd in kinds:
                    peaks[kd] = pool.apply(_child_peak, (args, kd, k))
        med = {kd: statistics.median(v) for kd, v in times.items()}
        print(f"K={k:<4}{med['ours']:>9.3f}{med['orig']:>9.3f}{med['plain']:>9.3f}{med['ours'] / med['plain']:>12.3f}"
              f"{med['ours'] / med['orig']:>11.3f}{peaks['ours']:>10.1f}{peaks['orig']:>10.1f}{peaks['plain']:>10.1f}"
              f"   max|ours-orig|={err:.1e}")
    print("targets: ours/plain <= 1.10; ours MB < orig MB")


if __name__ == "__main__":
    main()
