"""SyncTweedies benchmarks (printed, never failing a test run).

1. Per-step overhead of synchronisation: the synchronized sampler (case 2 / case 3) vs the same number of
   unsynchronised instances through the plain shared loop, same tiny model, steps and noise; target <= 1.10x.
2. Peak memory of one sync (f after g) on the 2048 x 4096 latent canonical panorama (8 views of 64^2):
   the dense path (materialises the pano) vs the compact sparse path (--compact_sync); each measured in a
   fresh subprocess (peak RSS on CPU, max allocated on CUDA), after the maps are built.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from pathlib import Path

# this file is named like the package: keep `import synctweedies` pointing at the package, not at us
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def overhead(model: str, device: str, steps: int, repeats: int) -> None:
    from common.models.loading import load_pipeline
    from common.pipelines.loop import sample
    from common.pipelines.text2image import prepare
    from synctweedies.anagram import ViewProjection
    from synctweedies.sampler import SyncOptions, sync_sample
    from synctweedies.views import get_views
    from synctweedies.wide import WindowProjection

    pipe = load_pipeline(model, device=device)
    if model == "tiny-if":
        proj = ViewProjection(get_views(["identity", "rotate_cw", "flip", "negate"]), pipe.unet.config.sample_size)
        size = pipe.unet.config.sample_size
    else:
        proj = WindowProjection(8, 40, 8, 4)  # 9 latent windows of 8x8 (tiny-sd: 64 px)
        size = 64
    n = proj.num_instances
    setup = prepare(pipe, ["a photo"] * n, [""] * n, num_inference_steps=steps, guidance_scale=5.0, height=size,
                    width=size, generator=torch.Generator(device).manual_seed(0))
    plain = lambda: sample(setup.denoiser, pipe.scheduler, setup.x_T, setup.timesteps,
                           extra_step_kwargs=setup.extra_step_kwargs, progress=False)
    runs = {f"case{c}": (lambda c=c: sync_sample(setup.denoiser, pipe.scheduler, proj, options=SyncOptions(case_num=c),
                                                 timesteps=setup.timesteps, x_T=setup.x_T, progress=False))
            for c in (2, 3, 5)}
    with torch.no_grad():
        plain(), [f() for f in runs.values()]  # warm-up
        best = {name: float("inf") for name in ["plain", *runs]}
        for _ in range(repeats):  # interleaved, so background load hits every variant alike
            best["plain"] = min(best["plain"], _best(plain, 1))
            for name, fn in runs.items():
                best[name] = min(best[name], _best(fn, 1))
    for name in runs:
        print(f"overhead {model:<8} {name:<6} n={n:<3} ours_s={best[name] / steps:.4f}/step "
              f"plain_s={best['plain'] / steps:.4f}/step ratio={best[name] / best['plain']:.3f} (target <= 1.10)")


def memory_child(pano_h: int, pano_w: int, compact: bool, device: str) -> None:
    import resource

    from synctweedies.panorama import PanoramaProjection, view_angles

    proj = PanoramaProjection(pano_h, pano_w, 64, view_angles(), 72.0, compact_sync=compact)
    if compact:
        proj.sync_matrix()
    xs = torch.randn(8, 4, 64, 64, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = proj.sync(xs)
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    held = 0
    if compact:
        m = proj.sync_matrix()
        held = m._nnz() * (2 * 8 + 4)
    print(json.dumps({"peak_bytes": peak, "seconds": elapsed, "shape": list(out.shape), "held_bytes": held}))


def memory(pano_h: int, pano_w: int, device: str) -> None:
    res = {}
    for compact in (False, True):
        cmd = [sys.executable, __file__, "--memory_child", "--pano_h", str(pano_h), "--pano_w", str(pano_w),
               "--device", device] + (["--compact"] if compact else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        res[compact] = json.loads(out)
    dense, compact = res[False], res[True]
    print(f"memory pano latent {pano_h}x{pano_w} sync: dense peak={dense['peak_bytes'] / 2**20:.1f} MiB "
          f"({dense['seconds']:.3f} s), compact peak={compact['peak_bytes'] / 2**20:.1f} MiB "
          f"({compact['seconds']:.3f} s), ratio={compact['peak_bytes'] / max(dense['peak_bytes'], 1):.4f}; compact "
          f"keeps a {compact['held_bytes'] / 2**20:.1f} MiB sparse operator "
          f"(device {device}; CPU peaks are peak-RSS growth during the sync, 0 = below the map-building peak)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["tiny-sd", "tiny-if"], help="tiny presets to time")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pano_h", type=int, default=2048, help="latent pano height for the memory case")
    parser.add_argument("--pano_w", type=int, default=4096, help="latent pano width for the memory case")
    parser.add_argument("--skip_memory", action="store_true", help="only time the per-step overhead")
    parser.add_argument("--memory_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compact", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return memory_child(args.pano_h, args.pano_w, args.compact, args.device)
    print(f"device={args.device} steps={args.steps} repeats={args.repeats}")
    for model in args.models:
        overhead(model, args.device, args.steps, args.repeats)
    if not args.skip_memory:
        memory(args.pano_h, args.pano_w, args.device)


if __name__ == "__main__":
    main()
