"""`python -m lmsan_serve.cli ...`: the `lmsan` command without its script on PATH."""

import sys

from . import main

sys.exit(main())
