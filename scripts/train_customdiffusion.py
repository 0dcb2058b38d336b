"""Custom Diffusion training: `python scripts/train_customdiffusion.py --help` (or `accelerate launch ...`)."""
from common.cli import run
from customdiffusion.train import main

if __name__ == "__main__":
    run(main)
