"""Train a MIP-Adapter (train_sdxl.py / train_sdxl_plus.py flags; --variant sdxl|sdxl_plus)."""
from common.cli import run
from mipadapter.train import main

if __name__ == "__main__":
    run(main)
