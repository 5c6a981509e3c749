"""``python -m retinagen.cli``: the same as the ``retinagen`` command."""

import sys

from retinagen.cli import main

sys.exit(main())
