"""Plain text-to-image with no method on top: the quickstart entry point (`scripts/sample.py`)."""
