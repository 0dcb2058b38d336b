"""MuDI prior images with OWLv2 + SAM masks and class_metadata.jsonl: `python scripts/prior_mudi.py --help`."""
from common.cli import run
from mudi.prior import main

if __name__ == "__main__":
    run(main)
