"""A tensor-parallel worker process (ranks 1..N-1): `python -P -m lmforge.runtime.engine.tp_worker SPEC`.

Rank 0 (the engine: scheduler, sampler, API) spawns one per rank (tp_executor.TPDriver). A worker builds
its shard of the model, then repeats whatever rank 0's ModelRunner calls (`WORKER_CALLS`, one channel
message each) until told to stop. It never samples: its LM head shard only feeds the vocab gather.

It ignores SIGINT/SIGTERM (rank 0 drains requests first, then stops the workers) and dies with rank 0
(PR_SET_PDEATHSIG, plus a parent check while idle), so no rank outlives the engine.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from dataclasses import asdict, dataclass
from datetime import timedelta

logger = logging.getLogger("lmforge.runtime.engine.tp_worker")

# the ModelRunner methods rank 0 forwards (ModelRunner._broadcast), and "stop"
WORKER_CALLS = frozenset({"profile_num_blocks", "allocate_kv_cache", "prepare_decode_graphs", "forward_step"})


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker needs, as JSON on its command line."""

    rank: int
    world_size: int
    init_method: str  # tcp://127.0.0.1:PORT, rank 0's store
    channel: str  # "shm" | "broadcast"
    shm_name: str  # the ring's name ("" for broadcast)
    timeout_s: float
    model: str
    device: str  # "cpu" | "cuda" (cuda:<rank> is taken)
    dtype: str  # a torch dtype name ("float32", ...)
    max_model_len: int
    block_size: int
    seed: int
    attention_backend: str
    kv_cache_dtype: str
    load_format: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def device_for(device: str, rank: int) -> str:
    """A device per rank: cuda -> cuda:<rank> (CUDA_VISIBLE_DEVICES picks the pod's GPUs)."""
    return f"cuda:{rank}" if device.startswith("cuda") else device


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the idle parent check still ends the worker


LOAD_TIMEOUT_S = 1800.0  # ranks load their shards at their own pace (a 70B shard: minutes)


def init_distributed(spec: WorkerSpec) -> None:
    """The process group. Its timeout is the loading one: a hung step is the watchdog's to catch
    (tp_executor: it kills the workers, which fails rank 0's collective at once)."""
    import torch.distributed as dist

    dist.init_process_group(
        backend_for(spec.device),
        init_method=spec.init_method,
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=timedelta(seconds=max(spec.timeout_s, LOAD_TIMEOUT_S)),
    )


def open_channel(spec: WorkerSpec, reader: int | None) -> object:
    """The message channel; call on every rank in the same order (the broadcast one makes a group)."""
    import torch.distributed as dist

    from lmforge.runtime.engine.tp_channel import BroadcastChannel, ShmRingChannel

    if spec.channel == "broadcast":
        group = dist.new_group(backend="gloo") if spec.device.startswith("cuda") else None
        return BroadcastChannel(group)
    if reader is None:
        raise ValueError("rank 0 creates the ring")
    return ShmRingChannel(spec.world_size - 1, name=spec.shm_name, reader=reader, timeout_s=spec.timeout_s)


def build_runner(spec: WorkerSpec) -> object:
    import torch

    from lmforge.runtime.engine.model_runner import ModelRunner
    from lmforge.runtime.models.config import load_model_config
    from lmforge.runtime.models.parallel import TPGroup, TPLayout

    cfg = load_model_config(spec.model)
    cfg.model, cfg.max_model_len = spec.model, spec.max_model_len
    layout = TPLayout.for_config(cfg, spec.rank, spec.world_size)
    device = torch.device(device_for(spec.device, spec.rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return ModelRunner(
        spec.model,
        cfg,
        device=device,
        dtype=getattr(torch, spec.dtype),
        max_model_len=spec.max_model_len,
        block_size=spec.block_size,
        seed=spec.seed,
        attention_backend=spec.attention_backend,
        kv_cache_dtype=spec.kv_cache_dtype,
        load_format=spec.load_format,
        tp=(layout, TPGroup(spec.rank, spec.world_size)),
    )


def serve(runner: object, channel: object) -> None:
    """Repeat rank 0's calls until "stop"."""
    while True:
        method, args = channel.recv()  # type: ignore[attr-defined]
        if method == "stop":
            return
        if method not in WORKER_CALLS:
            raise ValueError(f"unknown worker call {method!r}")
        getattr(runner, method)(*args)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    logging.basicConfig(
        level="INFO", stream=sys.stderr, format="%(asctime)s %(levelname)s tp-worker: %(message)s"
    )
    spec = WorkerSpec.from_json((argv or sys.argv[1:])[0])
    import torch

    if spec.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
    init_distributed(spec)
    channel = open_channel(spec, reader=spec.rank - 1)
    runner = build_runner(spec)
    import torch.distributed as dist

    dist.barrier()  # loaded: rank 0 goes on once every shard is in place (a load error ends this process)
    try:
        serve(runner, channel)
    finally:
        channel.close()  # type: ignore[attr-defined]
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
