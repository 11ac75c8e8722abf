"""``python -m demar.studies run|report NAME ...``."""

import sys

from demar.studies.cli import main

if __name__ == "__main__":
    sys.exit(main())
