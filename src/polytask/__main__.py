"""``python -m polytask`` runs the ``polytask`` command (and ``torchrun -m polytask``)."""

import sys

from polytask.cli import main

sys.exit(main())
