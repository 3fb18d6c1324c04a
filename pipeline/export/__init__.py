"""vitpipe export."""
