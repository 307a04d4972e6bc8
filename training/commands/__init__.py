"""Sub-commands of the ``u2net`` CLI, one module each (see :mod:`training.commands.cli`)."""
