"""SynCD LoRA fine-tuning (FLUX or SDXL): `python scripts/train_syncd.py --help` (or `accelerate launch ...`)."""
from common.cli import run
from syncd.train import main

if __name__ == "__main__":
    run(main)
