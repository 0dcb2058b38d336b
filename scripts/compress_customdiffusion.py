from customdiffusion.compress import main
from common.cli import run

if __name__ == "__main__":
    run(main)
