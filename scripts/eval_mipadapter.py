"""Score (and with --generate, first sample) Concept101 with the MIP-Adapter protocol (Table 1 beside ours)."""
from common.cli import run
from mipadapter.eval import main

if __name__ == "__main__":
    run(main)
