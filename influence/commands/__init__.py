"""Sub-commands of the ``influence`` command line that work on trained runs."""
