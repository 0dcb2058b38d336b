"""Rasteriser speed: torch reference vs the Triton kernel (GPU) and pytorch3d (when importable).

One line per case: faces, resolution, backend, ms, ratio to the torch reference measured in the same run,
peak GPU memory. On CPU only the torch reference runs on small cases (Triton needs a GPU); `--interpret` adds
a tiny TRITON_INTERPRET=1 correctness check (not a timing).

python benchmarks/raster.py [--device cuda] [--repeats 5] [--interpret]
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.render.cameras import Cameras  # noqa: E402
from common.render.mesh import torus_mesh  # noqa: E402
from common.render.raster import available_backends, rasterize  # noqa: E402


def mesh_with_faces(n_faces: int):
    """A torus with about n_faces triangles (2 per grid cell, 2:1 major/minor resolution)."""
    minor = max(3, int(math.sqrt(n_faces / 4)))
    m = torus_mesh(n_major=2 * minor, n_minor=minor)
    return m.verts, m.faces


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (compiles the Triton kernel)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--interpret", action="store_true", help="also check the Triton kernel in the interpreter")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        cases = [(10_000, 512), (10_000, 1024), (100_000, 512), (100_000, 1024)]
    else:
        cases = [(2_000, 128), (10_000, 256)]
        print("# CPU: torch reference only on small cases; the Triton kernel needs a GPU (--device cuda)")
    backends = [b for b in available_backends(device) if b != "torch"]
    cams = Cameras.orbit([20.0] * args.views, [360.0 * i / args.views for i in range(args.views)], 2.5, fov=45,
                         size=64).to(device)
    print(f"{'faces':>8} {'res':>5} {'backend':>10} {'ms':>10} {'ratio':>8} {'peak_MB':>9}")
    for n_faces, res in cases:
        verts, faces = mesh_with_faces(n_faces)
        verts, faces = verts.to(device), faces.to(device)
        c = Cameras(**{**cams.__dict__, "width": res, "height": res, "cx": cams.cx * res / 64,
                       "cy": cams.cy * res / 64, "fx": cams.fx * res / 64, "fy": cams.fy * res / 64})
        clip = c.to_clip(verts)
        base = None
        ref = None
        for backend in ["torch"] + backends:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms = timed(lambda: rasterize(clip, faces, res, res, backend=backend), args.repeats, device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            out = rasterize(clip, faces, res, res, backend=backend)
            base = ms if base is None else base
            agree = ""
            if ref is None:
                ref = out
            else:
                agree = f"  same_face={(out.face_id == ref.face_id).float().mean().item():.5f}"
            print(f"{len(faces):>8} {res:>5} {backend:>10} {ms:>10.2f} {base / ms:>8.2f} {peak:>9.1f}{agree}")
    if args.interpret and device.type != "cuda":
        code = ("import torch; from common.render.raster import rasterize; from common.render.mesh import torus_mesh;"
                "from common.render.cameras import Cameras; m = torus_mesh(n_major=8, n_minor=4);"
                "c = Cameras.orbit([20.0], [30.0], 2.5, size=32).to_clip(m.verts);"
                "a = rasterize(c, m.faces, 32, 32, backend='torch');"
                "b = rasterize(c, m.faces, 32, 32, backend='triton');"
                "print('interpreter check: same face ids', bool((a.face_id == b.face_id).all()),"
                "'max bary diff', float((a.bary - b.bary).abs().max()))")
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=False)


if __name__ == "__main__":
    main()
