"""`python -m lmforge.runtime.train`: one worker process under torchrun (what TrainJob pods run
through `lmforge.runtime.train.launch`).

The worker leaves with `os._exit` once `main` has returned: by then the output, the checkpoints
and the last progress patch are written and flushed (the trainer closes its reporter), and what
remains is interpreter teardown, where DeepSpeed's still-open process group destroys joinable C++
threads and can abort a finished run (exit 134, "terminate called without an active exception",
seen under ZeRO-3 with 2 ranks on CPU). A finished run must exit with its own code.
"""

import os
import sys

from lmforge.runtime.train import main

code = main()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
