"""Plain text-to-image: `python scripts/sample.py --model tiny-sd --prompt "a photo of a dog"`."""
from common.cli import run
from plainsample.sample import main

if __name__ == "__main__":
    run(main)
