"""Score generated images on CustomConcept101 with the customdiffusion protocol (see common/eval/README_SECTION.md)."""
if __name__ == "__main__":
    from common.cli import run
    from common.eval.runners import main_customdiffusion

    run(main_customdiffusion)
