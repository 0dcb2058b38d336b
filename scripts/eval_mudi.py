"""MuDI evaluation (Detect-and-Compare, multi-subject fidelity, CLIP-T): `python scripts/eval_mudi.py --help`."""
from common.cli import run
from mudi.eval import main

if __name__ == "__main__":
    run(main)
