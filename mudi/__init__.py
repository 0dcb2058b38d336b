"""mudi: method package (built on common/)."""
