"""`python -m mm1.cli` (and `torchrun -m mm1.cli`): the `mm1` command."""

import sys

from mm1.cli import main

sys.exit(main())
