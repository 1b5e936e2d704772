"""`python -m loopdlm` runs the command line."""

import sys

from loopdlm.cli import main

sys.exit(main())
