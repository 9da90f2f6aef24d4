"""`python -m mm1.cli` (and `torchrun -m mm1.cli`): the `mm1` command."""

import sys

from . import main

sys.exit(main())
