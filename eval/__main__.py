"""``python -m vlmdrop.eval ...`` / ``accelerate launch -m vlmdrop.eval ...``."""

import sys

from .cli import cli

if __name__ == "__main__":
    sys.exit(cli())
