"""`python -m mediret.cli`."""

import sys

from . import main

sys.exit(main())
