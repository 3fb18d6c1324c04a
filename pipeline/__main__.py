"""``python -m pipeline`` is the `vitpipe` command."""

import sys

from pipeline.cli import main

sys.exit(main())
