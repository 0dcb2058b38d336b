"""SyncTweedies with the original main.py flags: `python scripts/sample_synctweedies.py --app wide_image ...`."""
from common.cli import run
from synctweedies.main import main

if __name__ == "__main__":
    run(main)
