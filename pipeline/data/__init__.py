"""vitpipe data."""
