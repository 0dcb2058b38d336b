"""SynCD DreamBench evaluation (DINO, CLIP-I, CLIP-T, masked DINO): `python scripts/eval_syncd.py --help`."""
from common.cli import run
from syncd.eval import main

if __name__ == "__main__":
    run(main)
