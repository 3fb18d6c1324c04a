"""vitpipe's operator tools and benchmarks: thin commands over the library in `pipeline/`.

They live beside the library, not inside it, so that nothing in `pipeline/` or `stages/` imports
them; `pipeline/cli.py` wires them into `vitpipe`.
"""
