"""Images/s of our batched CLIP-I/DINO path vs a one-image-at-a-time loop on the same backbone.

The backbone is a random-weight ViT-S/16 (DINO's architecture: 384 wide, 12 blocks, 6 heads) built in code,
since no pretrained weights are available offline here; throughput does not depend on the weight values.
Both paths decode, preprocess (resize 256 -> crop 224) and encode every image; the loop is what the reference
evaluation scripts do (one image per forward). Cases: batched (cold reference cache), and a re-run where the
reference features come from the on-disk cache.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.data import load_rgb
from common.eval.cache import FeatureCache
from common.eval.similarity import pairwise_mean
from common.eval.tiny import tiny_vit


def _write_images(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{seed}_{i}.png"
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--generated", type=int, default=32, help="generated images")
    ap.add_argument("--references", type=int, default=8, help="reference images")
    ap.add_argument("--batch_size", type=int, default=32, help="batch size of our path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = ap.parse_args()
    ext = tiny_vit(dim=384, depth=12, heads=6, name="random-vit-s16", device=args.device)
    ext.batch_size = args.batch_size
    model = ext.module
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen, ref = _write_images(tmp, args.generated, 0), _write_images(tmp, args.references, 1)
        n = len(gen) + len(ref)
        ext.encode_images(gen[:2])  # warm-up

        def sync() -> None:
            if torch.device(args.device).type == "cuda":
                torch.cuda.synchronize()

        @torch.inference_mode()
        def loop() -> float:
            g = [model(ext.preprocess(load_rgb(p))[None].to(args.device)).float().cpu() for p in gen]
            r = [model(ext.preprocess(load_rgb(p))[None].to(args.device)).float().cpu() for p in ref]
            return float(pairwise_mean(torch.cat(g), torch.cat(r)).mean())

        def ours(cache: FeatureCache) -> float:
            return float(pairwise_mean(ext.encode_images(gen), cache.encode(ext, ref)).mean())

        def timed(fn, *a):
            sync()
            t = time.perf_counter()
            v = fn(*a)
            sync()
            return time.perf_counter() - t, v

        t_loop, v_loop = timed(loop)
        cache = FeatureCache(tmp / "cache")
        t_cold, v_cold = timed(ours, cache)
        t_warm, v_warm = timed(ours, cache)
    assert abs(v_loop - v_cold) < 1e-4 and abs(v_cold - v_warm) < 1e-6, (v_loop, v_cold, v_warm)
    print(f"# backbone: random-weight ViT-S/16 built in code (no pretrained weights offline); device={args.device}, "
          f"threads={torch.get_num_threads()}, {len(gen)} generated + {len(ref)} reference 512px images")
    print(f"one-image loop        : {n / t_loop:8.2f} img/s  ({t_loop:.2f} s)")
    for case, t in (("batched, cold cache", t_cold), ("batched, warm cache", t_warm)):
        print(f"{case:22s}: {n / t:8.2f} img/s  ({t:.2f} s)  ratio vs loop {t_loop / t:.2f}x")


if __name__ == "__main__":
    main()
