"""`python -m gptlab ...` is the same as the `gptlab` command."""

import sys

from gptlab.cli import main

sys.exit(main())
