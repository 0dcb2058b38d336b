"""`python -m synctweedies --app ambiguous_image|wide_image|panorama|mesh|gs ...`."""
from common.cli import run
from synctweedies.main import main

run(main)
