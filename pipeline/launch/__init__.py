"""vitpipe launch."""
