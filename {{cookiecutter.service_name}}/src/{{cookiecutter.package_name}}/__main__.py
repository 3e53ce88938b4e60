"""Entry point for `python -m`: the same as the service's own command."""

import sys

from .runtime.cli import main

sys.exit(main())
