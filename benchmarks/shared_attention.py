"""Masked shared attention (SynCD MSA): 1 target + 3 references, FLUX head shapes (24 heads x 128), text 512,
4096 image tokens per image; the references visible through their foreground only (--fg of their tokens).

Cases, all over the same keys [text; target; 3 x reference]: dense-mask SDPA (the reference backend: a
[Lq, Lk] boolean mask), FlexAttention (block mask), the Triton kernel (skips fully masked key blocks), and
unmasked SDPA at the same token count (the speed floor). One line per case: ms, ratio to dense-mask SDPA,
ratio to unmasked SDPA, peak GPU memory. Targets on a GPU: masked >= 3x faster than dense-mask SDPA and
<= 1.1x unmasked SDPA. On CPU a reduced size runs (Triton only under TRITON_INTERPRET=1, as a check).

python benchmarks/shared_attention.py [--device cuda] [--dtype bf16] [--tokens 4096] [--repeats 10]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.attention.backends import KeyLayout, attend  # noqa: E402


def make_case(tokens: int, text: int, heads: int, dim: int, refs: int, fg: float, device, dtype, seed: int = 0):
    """q [1, H, T+P, d], k/v [1, H, T+P+refs*P, d], the MSA layout; foreground = a centred square per reference
    (so whole key blocks of background exist, as with real object masks)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    own = text + tokens
    lk = own + refs * tokens
    q = torch.randn(1, heads, own, dim, generator=g).to(device, dtype)
    k = torch.randn(1, heads, lk, dim, generator=g).to(device, dtype)
    v = torch.randn(1, heads, lk, dim, generator=g).to(device, dtype)
    side = int(round(tokens ** 0.5))
    m = torch.zeros(side, side, dtype=torch.bool)
    s = int(round(side * fg ** 0.5))
    o = (side - s) // 2
    m[o:o + s, o:o + s] = True
    vis = torch.cat([torch.ones(own, dtype=torch.bool), m.flatten().repeat(refs)])[None].to(device)
    return q, k, v, KeyLayout(own, text, vis)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, float | None]:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / repeats * 1000
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return ms, peak


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="default: bf16 cuda, fp32 cpu")
    p.add_argument("--tokens", type=int, default=None, help="image tokens per image (default: 4096 cuda, 256 cpu)")
    p.add_argument("--text", type=int, default=None, help="text tokens (default: 512 cuda, 32 cpu)")
    p.add_argument("--heads", type=int, default=None, help="heads (default: 24 cuda, 4 cpu)")
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--refs", type=int, default=3)
    p.add_argument("--fg", type=float, default=0.25, help="foreground fraction of each reference")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype or ("bf16" if cuda else "fp32")]
    tokens, text = args.tokens or (4096 if cuda else 256), args.text or (512 if cuda else 32)
    heads, repeats = args.heads or (24 if cuda else 4), args.repeats or (10 if cuda else 3)
    q, k, v, layout = make_case(tokens, text, heads, args.head_dim, args.refs, args.fg, device, dtype)
    print(f"# 1 target + {args.refs} refs x {tokens} tokens, text {text}, {heads} heads x {args.head_dim}, "
          f"fg {args.fg:.2f}, {dtype}, {device}")
    with torch.no_grad():
        ref = attend(q, k, v, layout, "sdpa").float()
        cases = {"dense-mask sdpa": lambda: attend(q, k, v, layout, "sdpa"),
                 "flex": lambda: attend(q, k, v, layout, "flex"),
                 "unmasked sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
        if cuda or os.environ.get("TRITON_INTERPRET") == "1":
            cases["triton"] = lambda: attend(q, k, v, layout, "triton")
        else:
            print("# triton: skipped on CPU (set TRITON_INTERPRET=1 for a slow correctness run, or --device cuda)")
        results = {}
        for name, fn in cases.items():
            try:
                results[name] = timed(fn, repeats if name != "triton" or cuda else 1, device)
                if name != "unmasked sdpa":
                    err = (fn().float() - ref).abs().max().item()
                    results[name] += (err,)
            except Exception as e:  # noqa: BLE001 - a backend missing on this machine is reported, not fatal
                print(f"{name:18s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        dense = results.get("dense-mask sdpa", (None,))[0]
        free = results.get("unmasked sdpa", (None,))[0]
        for name, r in results.items():
            ms, peak = r[0], r[1]
            err = f"max|diff| {r[2]:.1e}" if len(r) > 2 else ""
            mem = f"{peak:8.0f} MiB" if peak is not None else "       - MiB"
            print(f"{name:18s} {ms:9.2f} ms  x{dense / ms:5.2f} vs dense  x{ms / free:5.2f} of unmasked  {mem}  {err}")


if __name__ == "__main__":
    main()
