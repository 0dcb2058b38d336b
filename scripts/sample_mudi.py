"""MuDI sampling (SDXL mean-shifted init / FLUX): `python scripts/sample_mudi.py --help`."""
from common.cli import run
from mudi.sample import main

if __name__ == "__main__":
    run(main)
