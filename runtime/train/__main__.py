"""`python -m lmforge.runtime.train` (what TrainJob pods run under torchrun or the DeepSpeed launcher)."""

import sys

from lmforge.runtime.train import main

sys.exit(main())
