"""Entry script: `python jobs/export_folders.py --help` (same as `ltc-ray export-folders`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ltc_ray.cli import run_verb  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_verb("export-folders", sys.argv[1:]))
