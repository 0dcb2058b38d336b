"""Score (and with --generate, first sample) CustomConcept101 with the Custom Diffusion protocol."""
from common.cli import run
from customdiffusion.eval import main

if __name__ == "__main__":
    run(main)
