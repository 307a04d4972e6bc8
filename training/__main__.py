import sys

from training.commands.cli import main

sys.exit(main())
