"""``python -m measureflow`` is the ``measureflow`` command."""

import sys

from .cli import main

sys.exit(main())
