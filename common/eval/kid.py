"""Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3.

Subsets follow clean-fid's `kernel_distance`: m = min(|A|, |B|, max_subset_size) rows drawn without
replacement from each set, `num_subsets` times; we report the mean (clean-fid's number) and the standard
deviation over subsets (torch-fidelity's `kid_std`).

Features: clean-fid uses the TF-Inception pool3 (2048-d) TorchScript `inception-2015-12-05.pt` on images
resized to 299x299 (PIL bicubic) in [0, 255]; pass that file to `load_inception` to match it. Without it we use
torchvision's `inception_v3` ImageNet weights (pool3, 2048-d, ImageNet normalisation), whose KID values are
close to but NOT identical to clean-fid's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.eval.extractor import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor, Preprocess, existing_path, offline_error

CLEANFID_PREPROCESS = Preprocess((299, 299), None, None, None, scale=255.0, float_resize=True)
TORCHVISION_PREPROCESS = Preprocess((299, 299), None, IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class KIDResult:
    mean: float
    std: float
    subsets: tuple[float, ...]
    subset_size: int


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x: [N, D], y: [M, D] -> [N, M] with (x.y / D + 1)^3."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """x, y: [m, D] (equal m >= 2) -> unbiased MMD^2 (diagonals of k(x,x), k(y,y) excluded), in float64."""
    x, y = x.double(), y.double()
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"unbiased MMD needs two sets of equal size >= 2, got {x.shape[0]} and {y.shape[0]}")
    a = polynomial_kernel(x, x) + polynomial_kernel(y, y)
    b = polynomial_kernel(x, y)
    return float(((a.sum() - a.diagonal().sum()) / (m - 1) - b.sum() * 2 / m) / m)


def kid(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    *,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> KIDResult:
    """feats_a: [N, D], feats_b: [M, D] -> KID mean and std over random subsets (numpy RNG seeded by `seed`)."""
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature widths differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    m = min(feats_a.shape[0], feats_b.shape[0], max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images in each set, got {feats_a.shape[0]} and {feats_b.shape[0]}")
    rng = np.random.default_rng(seed)
    a, b = feats_a.double(), feats_b.double()
    values = []
    for _ in range(num_subsets):
        x = b[torch.from_numpy(rng.choice(b.shape[0], m, replace=False))]
        y = a[torch.from_numpy(rng.choice(a.shape[0], m, replace=False))]
        values.append(mmd2_unbiased(x, y))
    arr = np.asarray(values)
    return KIDResult(float(arr.mean()), float(arr.std()), tuple(values), m)


def load_inception(
    spec: str | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> FeatureExtractor:
    """Inception pool3 features [B, 2048]. `spec`: clean-fid's `inception-2015-12-05.pt` TorchScript file (exact
    clean-fid features) or None for torchvision's `inception_v3` IMAGENET1K_V1 weights from the torch cache."""
    local = existing_path(spec) if spec else None
    if spec and local is None:
        raise offline_error(f"Inception {spec}", "the clean-fid TorchScript file "
                            "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                            "inception-2015-12-05.pt, then pass its path", FileNotFoundError(spec))
    if local is not None:
        try:
            model = torch.jit.load(str(local), map_location=device).eval()
        except Exception as e:  # noqa: BLE001
            raise offline_error(f"Inception {local}", "a valid clean-fid inception-2015-12-05.pt", e) from None

        def image_fn(x: torch.Tensor) -> torch.Tensor:
            return model(x, return_features=True)

        return FeatureExtractor("inception:cleanfid-tf", CLEANFID_PREPROCESS, image_fn, device=device,
                                batch_size=batch_size, module=model)
    import torchvision

    try:
        model = torchvision.models.inception_v3(weights="IMAGENET1K_V1")
    except Exception as e:  # noqa: BLE001
        how = ("python -c \"import torchvision; torchvision.models.inception_v3(weights='IMAGENET1K_V1')\" "
               "(it lands in ~/.cache/torch/hub/checkpoints), or pass clean-fid's inception-2015-12-05.pt")
        raise offline_error("torchvision inception_v3", how, e) from None
    model.fc = torch.nn.Identity()
    model = model.to(device).eval()
    return FeatureExtractor("inception:torchvision-v1", TORCHVISION_PREPROCESS, model, device=device,
                            batch_size=batch_size, module=model)
