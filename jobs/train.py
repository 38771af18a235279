"""Entry script: `python jobs/train.py --help` (same as `ltc-ray train`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ltc_ray.cli import run_verb  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_verb("train", sys.argv[1:]))
