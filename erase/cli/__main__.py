"""`python -m erase.cli ...` runs the command line."""

from erase.cli import entry

entry()
