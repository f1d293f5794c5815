"""Ends the process when imported, as a stray script-style module does."""

import sys

sys.exit(0)
