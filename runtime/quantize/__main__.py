"""`python -m lmforge.runtime.quantize` (= `lmforge quantize`)."""

import sys

from lmforge.runtime.quantize import main

sys.exit(main())
