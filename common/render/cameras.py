"""Pinhole and orthographic cameras: look-at, FOV <-> intrinsics, clip-space projection, orbits, readers.

Convention (one for the whole render package), that of OpenCV / COLMAP:
  * camera frame: x right, y down, z forward (points in front of the camera have z > 0);
  * `R` [B, 3, 3], `T` [B, 3] map world to camera: x_cam = R x_world + T;
  * pixel coordinates (u, v): u to the right, v down, the centre of pixel (row i, col j) at (j + 0.5, i + 0.5)
    (COLMAP's convention); a perspective camera maps x_cam to u = fx x/z + cx, v = fy y/z + cy;
  * clip space [x, y, z, w] with NDC = clip[:3] / w: x_ndc = 2u/W - 1, y_ndc = 2v/H - 1 (so y_ndc grows
    downwards, row 0 at -1), and z_ndc in [0, 1] between the near (0) and far (1) planes. For a perspective
    camera w = z_cam; for an orthographic one w = 1.
The world is y-up for orbits (as SyncMVD / pytorch3d's look_at_view_transform): azimuth 0 puts the camera on
+z, azimuth 90 on +x, elevation 90 on +y. `opengl_to_opencv` converts camera-to-world poses from the OpenGL /
Blender convention (x right, y up, camera looking down -z) used by NeRF-synthetic transforms.json.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from common.errors import UsageError

# Camera-frame flip between OpenGL (x right, y up, -z forward) and OpenCV (x right, y down, +z forward).
_GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))


def fov_to_focal(fov_deg: float | torch.Tensor, size: float) -> float | torch.Tensor:
    """Focal length in pixels for a full field of view `fov_deg` across `size` pixels."""
    if isinstance(fov_deg, torch.Tensor):
        return 0.5 * size / torch.tan(torch.deg2rad(fov_deg) / 2)
    if not 0 < fov_deg < 180:
        raise UsageError(f"field of view must be in (0, 180) degrees, got {fov_deg}")
    return 0.5 * size / math.tan(math.radians(fov_deg) / 2)


def focal_to_fov(focal: float | torch.Tensor, size: float) -> float | torch.Tensor:
    """Full field of view in degrees for a focal length of `focal` pixels across `size` pixels."""
    if isinstance(focal, torch.Tensor):
        return torch.rad2deg(2 * torch.atan(0.5 * size / focal))
    return math.degrees(2 * math.atan(0.5 * size / focal))


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up: Sequence[float] | torch.Tensor = (0, 1, 0)
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """World-to-camera (R [B, 3, 3], T [B, 3]) for cameras at `eye` [B, 3] looking at `target` [B, 3] or [3].

    `up` [3] or [B, 3] is the world direction that appears up in the image (OpenCV: rows grow along -up).
    A camera looking exactly along `up` gets a fallback up (world z, or x) so that it stays well defined.
    """
    eye = torch.as_tensor(eye)
    eye = eye[None] if eye.ndim == 1 else eye
    dtype = eye.dtype if eye.is_floating_point() else torch.float32
    eye = eye.to(dtype)
    target = torch.zeros(3, dtype=dtype, device=eye.device) if target is None else torch.as_tensor(target).to(eye)
    up = torch.as_tensor(up, dtype=dtype, device=eye.device).expand_as(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.linalg.cross(forward, up, dim=-1)
    bad = right.norm(dim=-1) < 1e-6 * up.norm(dim=-1).clamp_min(1e-12)
    if bad.any():  # looking along `up`: pick another up so the basis stays orthonormal
        alt = torch.tensor([0.0, 0.0, -1.0], dtype=dtype, device=eye.device).expand_as(eye)
        alt = torch.where((forward * alt).sum(-1, keepdim=True).abs() > 0.99, torch.tensor([1.0, 0, 0]).to(eye), alt)
        right = torch.where(bad[:, None], torch.linalg.cross(forward, alt, dim=-1), right)
    right = torch.nn.functional.normalize(right, dim=-1)
    down = torch.linalg.cross(forward, right, dim=-1)
    R = torch.stack([right, down, forward], dim=1)
    T = -(R @ eye[..., None])[..., 0]
    return R, T


def orbit_positions(elevations: Sequence[float] | torch.Tensor, azimuths: Sequence[float] | torch.Tensor,
                    distance: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Camera centres [B, 3] on a y-up sphere; elevations/azimuths in degrees, broadcast against each other."""
    el = torch.deg2rad(torch.as_tensor(elevations, dtype=torch.float64))
    az = torch.deg2rad(torch.as_tensor(azimuths, dtype=torch.float64))
    d = torch.as_tensor(distance, dtype=torch.float64)
    el, az, d = torch.broadcast_tensors(el, az, d)
    return torch.stack([d * el.cos() * az.sin(), d * el.sin(), d * el.cos() * az.cos()], -1).reshape(-1, 3)


def mesh_camera_poses(camera_azims: Sequence[float] | None = None, top_cameras: bool = True
                      ) -> list[tuple[float, float]]:
    """(elevation, azimuth) pairs of the SyncTweedies mesh app (SyncMVD's layout), in degrees.

    Default azimuths -180..135 step 45 at elevation 0, stored +360 when negative, then (30, 0) and (30, 180)
    when `top_cameras` (that flag is on by default) -> 10 views.
    """
    azims = list(range(-180, 180, 45)) if camera_azims is None else list(camera_azims)
    poses = [(0.0, float(a + 360 if a < 0 else a)) for a in azims]
    if top_cameras:
        poses += [(30.0, 0.0), (30.0, 180.0)]
    return poses


@dataclass
class Cameras:
    """A batch of B cameras sharing one image size.

    R [B, 3, 3], T [B, 3] world-to-camera (OpenCV frame); fx, fy, cx, cy [B] in pixels (orthographic: fx, fy are
    pixels per world unit); width, height in pixels; near/far bound z_ndc to [0, 1].
    """

    R: torch.Tensor
    T: torch.Tensor
    fx: torch.Tensor
    fy: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    width: int
    height: int
    near: float = 0.1
    far: float = 100.0
    orthographic: bool = False

    def __post_init__(self) -> None:
        if self.R.ndim == 2:
            self.R = self.R[None]
        if self.T.ndim == 1:
            self.T = self.T[None]
        b = self.R.shape[0]
        for name in ("fx", "fy", "cx", "cy"):
            v = torch.as_tensor(getattr(self, name), dtype=self.R.dtype, device=self.R.device)
            setattr(self, name, v.expand(b).clone() if v.ndim == 0 or v.numel() == 1 else v)
        if not 0 < self.near < self.far:
            raise UsageError(f"camera near/far must satisfy 0 < near < far, got {self.near}, {self.far}")

    def __len__(self) -> int:
        return self.R.shape[0]

    def __getitem__(self, idx: int | slice | torch.Tensor) -> "Cameras":
        idx = [idx] if isinstance(idx, int) else idx
        return replace(self, R=self.R[idx], T=self.T[idx], fx=self.fx[idx], fy=self.fy[idx], cx=self.cx[idx],
                       cy=self.cy[idx])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Cameras":
        f = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return replace(self, R=f(self.R), T=f(self.T), fx=f(self.fx), fy=f(self.fy), cx=f(self.cx), cy=f(self.cy))

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_look_at(cls, eye: torch.Tensor, target: torch.Tensor | None = None, *, fov: float = 60.0,
                     width: int = 512, height: int | None = None, up: Sequence[float] = (0, 1, 0),
                     near: float = 0.1, far: float = 100.0, orthographic: bool = False,
                     ortho_scale: float = 1.0) -> "Cameras":
        """Cameras at `eye` [B, 3] looking at `target`; `fov` is the horizontal FOV in degrees (perspective) or
        `ortho_scale` the half-width in world units seen across the image (orthographic)."""
        height = width if height is None else height
        R, T = look_at(torch.as_tensor(eye, dtype=torch.float32), target, up)
        if orthographic:
            f = 0.5 * width / ortho_scale
        else:
            f = fov_to_focal(fov, width)
        return cls(R=R, T=T, fx=torch.tensor(f), fy=torch.tensor(f), cx=torch.tensor(width / 2),
                   cy=torch.tensor(height / 2), width=width, height=height, near=near, far=far,
                   orthographic=orthographic)

    @classmethod
    def orbit(cls, elevations: Sequence[float], azimuths: Sequence[float], distance: float = 2.0, *,
              fov: float = 60.0, size: int = 512, orthographic: bool = False, ortho_scale: float = 1.0,
              near: float = 0.1, far: float = 100.0) -> "Cameras":
        """Cameras on a y-up sphere around the origin; elevation/azimuth lists (degrees) are paired (broadcast).

        Use `mesh_camera_poses()` for the SyncTweedies/SyncMVD mesh set.
        """
        eye = orbit_positions(elevations, azimuths, distance).float()
        return cls.from_look_at(eye, fov=fov, width=size, near=near, far=far, orthographic=orthographic,
                                ortho_scale=ortho_scale)

    @classmethod
    def from_c2w(cls, c2w: torch.Tensor, fx: torch.Tensor | float, fy: torch.Tensor | float,
                 cx: torch.Tensor | float, cy: torch.Tensor | float, width: int, height: int, *,
                 opengl: bool = False, near: float = 0.1, far: float = 100.0) -> "Cameras":
        """From camera-to-world poses c2w [B, 4, 4] (or [B, 3, 4]); `opengl` for Blender/NeRF poses."""
        c2w = torch.as_tensor(c2w, dtype=torch.float64)
        c2w = c2w[None] if c2w.ndim == 2 else c2w
        rot, t = c2w[:, :3, :3], c2w[:, :3, 3]
        if opengl:
            rot = rot @ _GL_TO_CV
        R = rot.transpose(1, 2)
        T = -(R @ t[..., None])[..., 0]
        return cls(R=R.float(), T=T.float(), fx=torch.as_tensor(fx), fy=torch.as_tensor(fy), cx=torch.as_tensor(cx),
                   cy=torch.as_tensor(cy), width=width, height=height, near=near, far=far)

    # ------------------------------------------------------------------------------------------ geometry
    @property
    def centers(self) -> torch.Tensor:
        """Camera centres in world space [B, 3]."""
        return -(self.R.transpose(1, 2) @ self.T[..., None])[..., 0]

    def c2w(self, opengl: bool = False) -> torch.Tensor:
        """Camera-to-world poses [B, 4, 4] (OpenCV frame, or OpenGL frame with `opengl`)."""
        rot = self.R.transpose(1, 2)
        if opengl:
            rot = rot @ _GL_TO_CV.to(rot)
        out = torch.eye(4, dtype=self.R.dtype, device=self.R.device).repeat(len(self), 1, 1)
        out[:, :3, :3], out[:, :3, 3] = rot, self.centers
        return out

    def world_to_view(self, points: torch.Tensor) -> torch.Tensor:
        """points [V, 3] or [B, V, 3] -> camera-frame points [B, V, 3]."""
        pts = points.to(self.R.dtype)
        pts = pts.expand(len(self), -1, -1) if pts.ndim == 2 else pts
        return pts @ self.R.transpose(1, 2) + self.T[:, None]

    def projection_matrix(self) -> torch.Tensor:
        """[B, 4, 4] camera frame -> clip space (see the module docstring)."""
        b, W, H, n, f = len(self), self.width, self.height, self.near, self.far
        P = torch.zeros(b, 4, 4, dtype=self.R.dtype, device=self.R.device)
        if self.orthographic:
            P[:, 0, 0], P[:, 0, 3] = 2 * self.fx / W, 2 * self.cx / W - 1
            P[:, 1, 1], P[:, 1, 3] = 2 * self.fy / H, 2 * self.cy / H - 1
            P[:, 2, 2], P[:, 2, 3] = 1 / (f - n), -n / (f - n)
            P[:, 3, 3] = 1
        else:
            P[:, 0, 0], P[:, 0, 2] = 2 * self.fx / W, 2 * self.cx / W - 1
            P[:, 1, 1], P[:, 1, 2] = 2 * self.fy / H, 2 * self.cy / H - 1
            P[:, 2, 2], P[:, 2, 3] = f / (f - n), -f * n / (f - n)
            P[:, 3, 2] = 1
        return P

    def to_clip(self, points: torch.Tensor) -> torch.Tensor:
        """World points [V, 3] or [B, V, 3] -> clip coordinates [B, V, 4] for `rasterize`."""
        v = self.world_to_view(points)
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)
        return v @ self.projection_matrix().transpose(1, 2)

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """World points [V, 3] or [B, V, 3] -> pixel coordinates (u, v) [B, V, 2] and nothing else."""
        v = self.world_to_view(points)
        z = v[..., 2:].clamp_min(1e-12) if not self.orthographic else torch.ones_like(v[..., 2:])
        f = torch.stack([self.fx, self.fy], -1)[:, None]
        c = torch.stack([self.cx, self.cy], -1)[:, None]
        return v[..., :2] / z * f + c

    def ndc_depth_to_view(self, z_ndc: torch.Tensor) -> torch.Tensor:
        """Invert the depth mapping: z_ndc (the rasteriser's `depth`) -> camera-frame z, same shape."""
        n, f = self.near, self.far
        if self.orthographic:
            return n + z_ndc * (f - n)
        return f * n / (f - z_ndc * (f - n))


# ------------------------------------------------------------------------------------------------ readers


def load_blender(path: str | Path, split: str = "train", width: int | None = None, height: int | None = None,
                 near: float = 0.1, far: float = 100.0) -> tuple[Cameras, list[str]]:
    """NeRF-synthetic `transforms_<split>.json` (or a file path) -> (Cameras, image file paths).

    Poses there are OpenGL camera-to-world; `camera_angle_x` is the horizontal FOV in radians. The image size
    comes from `w`/`h` in the JSON, else the arguments, else 800x800 (the NeRF-synthetic size).
    """
    import json

    p = Path(path)
    file = p / f"transforms_{split}.json" if p.is_dir() else p
    if not file.is_file():
        raise UsageError(f"Blender camera file not found: {file}")
    try:
        meta = json.loads(file.read_text())
        frames = meta["frames"]
        W = int(meta.get("w", width or 800))
        H = int(meta.get("h", height or W))
        fx = meta.get("fl_x", 0.5 * W / math.tan(0.5 * float(meta["camera_angle_x"])))
        fy = meta.get("fl_y", fx)
        cx, cy = meta.get("cx", W / 2), meta.get("cy", H / 2)
        c2w = torch.tensor([f["transform_matrix"] for f in frames], dtype=torch.float64)
    except (KeyError, ValueError, TypeError) as exc:
        raise UsageError(f"{file}: not a NeRF-synthetic transforms file ({exc!r})") from None
    names = []
    for fr in frames:
        fp = fr.get("file_path", "")
        names.append(str(file.parent / (fp if Path(fp).suffix else fp + ".png")))
    cams = Cameras.from_c2w(c2w, fx, fy, cx, cy, W, H, opengl=True, near=near, far=far)
    return cams, names


def _qvec_to_R(q: torch.Tensor) -> torch.Tensor:
    """COLMAP quaternions [B, 4] (w, x, y, z) -> rotation matrices [B, 3, 3]."""
    q = torch.nn.functional.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)


# model id -> (name, number of params); first params are f (or fx, fy), cx, cy for every model we accept
_COLMAP_MODELS = {0: ("SIMPLE_PINHOLE", 3), 1: ("PINHOLE", 4), 2: ("SIMPLE_RADIAL", 4), 3: ("RADIAL", 5),
                  4: ("OPENCV", 8)}
_COLMAP_BY_NAME = {v[0]: (k, v[1]) for k, v in _COLMAP_MODELS.items()}


def _intrinsics(model: str, params: Sequence[float]) -> tuple[float, float, float, float]:
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        return params[0], params[0], params[1], params[2]
    if model in ("PINHOLE", "OPENCV"):
        return params[0], params[1], params[2], params[3]
    raise UsageError(f"COLMAP camera model {model} is not supported (use an undistorted PINHOLE model)")


def _read_colmap_text(folder: Path) -> tuple[dict, list]:
    cams = {}
    for line in (folder / "cameras.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        el = line.split()
        cams[int(el[0])] = (el[1], int(el[2]), int(el[3]), [float(x) for x in el[4:]])
    images = []
    lines = [ln for ln in (folder / "images.txt").read_text().splitlines() if not ln.startswith("#")]
    for ln in lines[::2]:  # every image takes two lines; the second lists 2D points
        el = ln.split()
        if len(el) < 10:
            continue
        images.append((int(el[0]), [float(x) for x in el[1:5]], [float(x) for x in el[5:8]], int(el[8]), el[9]))
    return cams, images


def _read_colmap_bin(folder: Path) -> tuple[dict, list]:
    cams = {}
    with open(folder / "cameras.bin", "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        for _ in range(n):
            cam_id, model_id, w, h = struct.unpack("<iiQQ", fh.read(24))
            if model_id not in _COLMAP_MODELS:
                raise UsageError(f"COLMAP camera model id {model_id} is not supported (use PINHOLE)")
            name, k = _COLMAP_MODELS[model_id]
            cams[cam_id] = (name, w, h, list(struct.unpack(f"<{k}d", fh.read(8 * k))))
    images = []
    with open(folder / "images.bin", "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        for _ in range(n):
            img_id, *rest = struct.unpack("<idddddddi", fh.read(64))
            q, t, cam_id = rest[:4], rest[4:7], rest[7]
            name = b""
            while (ch := fh.read(1)) != b"\x00":
                if not ch:
                    raise UsageError(f"{folder / 'images.bin'}: truncated file")
                name += ch
            (npts,) = struct.unpack("<Q", fh.read(8))
            fh.seek(24 * npts, 1)  # x, y (double) and point3D id (int64) per 2D point
            images.append((img_id, q, t, cam_id, name.decode()))
    return cams, images


def load_colmap(path: str | Path, near: float = 0.1, far: float = 100.0) -> tuple[Cameras, list[str]]:
    """COLMAP sparse model folder (cameras/images as .bin or .txt; also `<path>/sparse/0`) -> (Cameras, names).

    Images are sorted by name (the 3DGS loader's order). All images must share one image size.
    """
    root = Path(path)
    for folder in (root, root / "sparse" / "0", root / "sparse"):
        if (folder / "cameras.bin").is_file() and (folder / "images.bin").is_file():
            cams, images = _read_colmap_bin(folder)
            break
        if (folder / "cameras.txt").is_file() and (folder / "images.txt").is_file():
            cams, images = _read_colmap_text(folder)
            break
    else:
        raise UsageError(f"no COLMAP model (cameras/images .bin or .txt) found under {root}")
    if not images:
        raise UsageError(f"COLMAP model under {root} has no images")
    images.sort(key=lambda im: im[4])
    sizes = {(cams[im[3]][1], cams[im[3]][2]) for im in images}
    if len(sizes) != 1:
        raise UsageError(f"COLMAP images under {root} have several sizes {sorted(sizes)}; resize them to one")
    (W, H), = sizes
    intr = torch.tensor([_intrinsics(cams[im[3]][0], cams[im[3]][3]) for im in images], dtype=torch.float64)
    R = _qvec_to_R(torch.tensor([im[1] for im in images], dtype=torch.float64))
    T = torch.tensor([im[2] for im in images], dtype=torch.float64)
    cameras = Cameras(R=R.float(), T=T.float(), fx=intr[:, 0].float(), fy=intr[:, 1].float(), cx=intr[:, 2].float(),
                      cy=intr[:, 3].float(), width=int(W), height=int(H), near=near, far=far)
    return cameras, [im[4] for im in images]
