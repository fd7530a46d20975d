"""`python -m crossrec_cli ARGS` is `crossrec ARGS` (what a submitted Ray job runs)."""

import sys

from crossrec_cli.main import main

sys.exit(main())
