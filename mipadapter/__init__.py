"""mipadapter: method package (built on common/)."""
