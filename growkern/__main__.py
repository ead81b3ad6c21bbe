"""`python -m growkern ...` runs the command line (growkern/cli/)."""
import sys

from .cli import main

sys.exit(main())
