"""syncd: method package (built on common/)."""
