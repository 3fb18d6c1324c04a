"""One module per pipeline stage; each exposes run(...) and returns what it wrote."""
