"""Sample with a MIP-Adapter: K references, each with its entity word (the original inference.py flags)."""
from common.cli import run
from mipadapter.sample import main

if __name__ == "__main__":
    run(main)
