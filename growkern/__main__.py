"""`python -m growkern ...` runs the command line (growkern/cli.py)."""
import sys

from .cli import main

sys.exit(main())
