"""``python -m skyproto``: the console tool."""

import sys

from .cli import main

sys.exit(main())
