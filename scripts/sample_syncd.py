"""SynCD sampling with reference images (sample_flux.py / sample.py flags): `python scripts/sample_syncd.py --help`."""
from common.cli import run
from syncd.sample import main

if __name__ == "__main__":
    run(main)
