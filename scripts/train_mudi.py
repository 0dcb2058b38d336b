"""MuDI Seg-Mix LoRA training (SDXL or FLUX): `python scripts/train_mudi.py --help` (or `accelerate launch ...`)."""
from common.cli import run
from mudi.train import main

if __name__ == "__main__":
    run(main)
