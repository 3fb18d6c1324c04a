"""vitpipe eval: evaluations of a weights pair beyond its val accuracy."""
