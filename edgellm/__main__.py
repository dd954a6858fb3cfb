"""`python -m edgellm ...`: the same as the `edgellm` command."""

import sys

from .cli import main

sys.exit(main())
