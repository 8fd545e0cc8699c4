"""``python -m mri``: see :mod:`mri.cli`."""

import sys

from mri.cli import main

sys.exit(main())
