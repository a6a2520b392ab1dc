"""``python -m data_prep.phantoms --kind KIND --out DIR --n-images N``: see ``data_prep.phantoms``."""

import sys

from data_prep.phantoms.make import main

sys.exit(main())
