"""`python -m proxy` is the `servegate` command."""

import sys

from proxy.cli import main

sys.exit(main())
