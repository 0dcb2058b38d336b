"""SynCD synthetic data generation (deformable with MSA, rigid from meshes): `python scripts/gen_syncd_data.py --help`."""
from common.cli import run
from syncd.generate import main

if __name__ == "__main__":
    run(main)
