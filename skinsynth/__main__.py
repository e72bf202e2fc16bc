"""``python -m skinsynth ...``: the CLI without the console script (Ray job entrypoints use this form, because a
job's working directory is importable but not pip-installed)."""

import sys

from skinsynth.cli import main

sys.exit(main())
