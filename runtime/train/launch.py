"""`python -m lmforge.runtime.train.launch [train flags]`: torchrun for the TrainJob pod, with
exit codes the operator can classify.

    python -m lmforge.runtime.train.launch --config /etc/lmforge/train.json
    == torchrun --no-python python -u -P -m lmforge.runtime.train --config /etc/lmforge/train.json

Workers start with `-P`: the pod's working directory never lands on sys.path, so no folder there
can shadow an installed module.

torchrun takes nnodes / nproc-per-node / node-rank / master address from the PET_* environment the
operator sets, and runs one worker per process (both backends: the DeepSpeed backend initialises
itself from the same environment, no ssh/pdsh launcher needed). Plain torchrun exits 1 with a
traceback when the pod gets SIGTERM; this wrapper exits 128 + signal instead (143), and with a
failed worker's own exit code (2 for a config error, 137 for a SIGKILL/OOM kill, ...).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# How long torchrun waits for workers to checkpoint and exit after it is signalled (torchrun's own
# default is 30 s). The pod's terminationGracePeriodSeconds is the real limit.
SHUTDOWN_TIMEOUT_S = "600"


def exit_code(worker_exitcode: int) -> int:
    """A worker's exit code as a shell reports it: signals (negative in torchrun) become 128 + signal."""
    return 128 - worker_exitcode if worker_exitcode < 0 else worker_exitcode


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    train_args = list(sys.argv[1:] if argv is None else argv)
    try:
        torchrun(["--no-python", sys.executable, "-u", "-P", "-m", "lmforge.runtime.train", *train_args])
    except SignalException as exc:
        print(f"[lmforge.train.launch] stopped by signal {int(exc.sigval)}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return exit_code(failure.exitcode) or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
