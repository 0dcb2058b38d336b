"""Score generated images on DreamBench (CLIP-T without the subject token, CLIP-I, DINO, DINOv2)."""
from common.cli import run
from common.eval.runners import main_dreambench

if __name__ == "__main__":
    run(main_dreambench)
