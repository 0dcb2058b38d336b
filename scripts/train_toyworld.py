"""Toy-world training: `python scripts/train_toyworld.py --stage clip|vae|sd|export --config configs/toyworld/<stage>.yaml`."""
from common.cli import run
from common.toyworld.train import main

if __name__ == "__main__":
    run(main)
