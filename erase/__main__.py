"""`python -m erase ...` runs the command line (also how launchers such as `accelerate launch -m erase` start it)."""

from erase.cli import entry

entry()
