"""``python -m gmd`` runs the ``gmd`` command line."""

import sys

from tools.cli import main

sys.exit(main())
