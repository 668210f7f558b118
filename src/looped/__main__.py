"""`python -m looped ...`, the form torchrun launches: torchrun --nproc_per_node=2 -m looped train ..."""

import sys

from looped.cli import main

sys.exit(main())
