"""``python -m mri``: the command line of `mri.cli`."""

import sys

from mri.cli import main

sys.exit(main())
