"""Engine tests run on a busy 2-core machine: one torch thread is much faster than contention."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
