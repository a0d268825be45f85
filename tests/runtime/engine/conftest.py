"""Engine tests run on a busy 2-core machine: one torch thread is much faster than contention.

Without CUDA the Triton kernels (the sampler's kernel path) run in the Triton interpreter, which
must be switched on before triton compiles anything.
"""

from __future__ import annotations

import os

import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
