"""customdiffusion: method package (built on common/)."""
