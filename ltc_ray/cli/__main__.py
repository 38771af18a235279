"""``python -m ltc_ray.cli VERB ...``: the same as the ``ltc-ray`` command."""

import sys

from ltc_ray.cli import main

sys.exit(main())
