"""synctweedies: method package (built on common/)."""
