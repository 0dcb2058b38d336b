"""Install the shared foundation and the five method packages (`pip install -e .`)."""
from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith(("#", "-"))
]

setup(
    name="customization-suite",
    version="0.1.0",
    description="SynCD, SyncTweedies, MIP-Adapter, MuDI and Custom Diffusion on one diffusers foundation",
    python_requires=">=3.10",
    packages=find_packages(
        include=["common*", "plainsample*", "customdiffusion*", "synctweedies*", "mipadapter*", "mudi*", "syncd*"]
    ),
    install_requires=requirements,
    entry_points={"customization_suite.adapters": [
        "customdiffusion = customdiffusion.adapter:register",
        "mipadapter = mipadapter.adapter:register",
    ]},
    # Optional backends: each absent one gives a one-line error naming its extra.
    extras_require={
        "gsplat": ["gsplat"],
        "pytorch3d": ["pytorch3d"],
        "bnb": ["bitsandbytes"],
    },
)
