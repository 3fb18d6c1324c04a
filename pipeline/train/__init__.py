"""vitpipe train."""
