"""``python -m training``: the ``u2net`` command line."""

import sys

from training.commands.cli import main

sys.exit(main())
