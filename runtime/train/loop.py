"""The training loop: wiring of data, engine, checkpoints, progress and signals.

One optimizer step = `gradientAccumulationSteps` micro-batches per rank. After every step the
ranks all-reduce [loss, tokens, stop-requested] (so a SIGTERM seen by any rank stops all of them at
the same step), then rank 0 reports progress and, every `checkpoint.everySteps`, all ranks save.
On SIGTERM/SIGINT the current step is checkpointed and `train` returns 128 + signal (143 for
SIGTERM), which the operator classifies as retryable; the next attempt resumes from it.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from lmforge.runtime.train import checkpoint as ckpt
from lmforge.runtime.train.config import TrainConfig
from lmforge.runtime.train.data import DataPosition, DatasetError, ShardedOrder, build_packed_rows, collate
from lmforge.runtime.train.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    destroy_process_group,
    init_process_group,
    pick_device,
)
from lmforge.runtime.train.engines import make_engine
from lmforge.runtime.train.modeling import load_model, load_tokenizer, save_output
from lmforge.runtime.train.progress import PodAnnotator, ProgressReporter

TRAIN_LOG = "train_log.jsonl"  # rank 0 appends {"step", "loss", "lr", "tokens", "epoch"} per step
StepHook = Callable[[int, float], None]  # (step, loss) after every optimizer step, on every rank


class StopSignal:
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint first."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set the flag: printing here could re-enter a print the main thread is inside of.
        self.signum = signum

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(cfg: TrainConfig, *, on_step: StepHook | None = None) -> int:
    """Runs one worker (this process's rank) to the end. Returns the exit code: 0 when finished,
    143 after a SIGTERM (checkpoint saved)."""
    env = DistEnv.from_env()
    device = pick_device(env)
    deepspeed = cfg.backend == "deepspeed"
    with StopSignal() as stop:
        created = init_process_group(env, device, deepspeed=deepspeed)
        try:
            return Trainer(cfg, env, device, stop, on_step).run()
        finally:
            if created and not deepspeed:  # DeepSpeed caches its groups globally: keep its group to the end
                destroy_process_group()


class Trainer:
    def __init__(
        self, cfg: TrainConfig, env: DistEnv, device: torch.device, stop: StopSignal, on_step: StepHook | None
    ):
        self.cfg, self.env, self.device, self.stop, self.on_step = cfg, env, device, stop, on_step
        self.hp = cfg.hyperparameters

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(f"[lmforge.train] {message}", flush=True)

    def run(self) -> int:
        import transformers

        cfg, hp, env = self.cfg, self.hp, self.env
        transformers.utils.logging.disable_progress_bar()  # our own progress line is the one in the logs
        transformers.set_seed(hp.seed)
        tokenizer = load_tokenizer(cfg.model_path)
        rows = build_packed_rows(
            cfg.dataset_path, tokenizer, hp.seq_len, cfg.dataset.format, cfg.dataset.max_samples
        )
        order = ShardedOrder(len(rows), hp.batch_size, env.world_size, env.rank, hp.seed)
        steps_per_epoch = order.micro_steps_per_epoch // hp.gradient_accumulation_steps
        if steps_per_epoch < 1:
            raise DatasetError(
                f"{cfg.dataset_path}: {len(rows)} packed rows of seqLen {hp.seq_len} are fewer than one optimizer "
                f"step needs (batchSize {hp.batch_size} x world size {env.world_size} x gradientAccumulationSteps "
                f"{hp.gradient_accumulation_steps})"
            )
        self.order, self.rows = order, rows
        self.total_steps = hp.max_steps or (hp.epochs or 1) * steps_per_epoch
        self.log(
            f"{len(rows)} packed rows of {hp.seq_len} tokens, {steps_per_epoch} steps per epoch, "
            f"{self.total_steps} steps; method {cfg.method}, backend {cfg.backend}, world size {env.world_size}, "
            f"device {self.device.type}"
        )

        self.engine = make_engine(
            load_model(cfg, self.device), cfg, self.total_steps, self.device, env.world_size
        )
        step, position = self.resume()
        reporter = ProgressReporter(
            total_steps=self.total_steps,
            start_step=step,
            log_every_steps=hp.log_every_steps,
            annotator=PodAnnotator.from_env() if env.is_main else None,
        )
        self.reporter = reporter
        try:
            code = self.loop(step, position)
        finally:
            if env.is_main:
                reporter.close()
        if code == 0:
            self.finish()
        return code

    def loop(self, step: int, position: DataPosition) -> int:
        """Steps until the end or until any rank saw a signal. Ranks decide together, through the
        all-reduced flag, never on their own flag: one rank leaving early would hang the others."""
        hp, env = self.hp, self.env
        every = self.cfg.checkpoint.every_steps
        while step < self.total_steps:
            loss_sum, tokens = 0.0, 0
            for micro in range(hp.gradient_accumulation_steps):
                batch = collate(self.rows, self.order.indices(position))
                position = self.order.advance(position)
                loss_sum += self.engine.train_micro_batch(
                    batch, is_last=micro == hp.gradient_accumulation_steps - 1
                )
                tokens += batch["num_tokens"]
            step += 1
            total_loss, total_tokens, stops = all_reduce_sum(
                [loss_sum / hp.gradient_accumulation_steps, tokens, float(self.stop.signum is not None)]
            )
            loss = total_loss / env.world_size
            epoch = (
                position.epoch * self.order.micro_steps_per_epoch + position.micro_step
            ) / self.order.micro_steps_per_epoch
            if env.is_main:
                self.append_log(
                    {
                        "step": step,
                        "loss": loss,
                        "lr": self.engine.lr,
                        "tokens": int(total_tokens),
                        "epoch": round(epoch, 6),
                    }
                )
                self.reporter.step(step, loss, int(total_tokens), epoch, lr=self.engine.lr)
            if self.on_step:
                self.on_step(step, loss)
            if stops and step < self.total_steps:
                signum = self.stop.signum or signal.SIGTERM  # another rank got it
                self.log(f"received {signal.Signals(signum).name}: checkpointing step {step}")
                self.save(step, position, loss)
                self.log(f"stopped by {signal.Signals(signum).name} at step {step}/{self.total_steps}")
                return 128 + signum
            if step % every == 0 or step == self.total_steps:  # the last one: a restart only re-exports
                self.save(step, position, loss)
        return 0

    # --- checkpoints ---------------------------------------------------------------------------

    def save(self, step: int, position: DataPosition, loss: float | None) -> None:
        """Collective. Writes into a temp dir, then rank 0 commits (manifest + rename + prune)."""
        root = self.cfg.checkpoint_dir
        final = root / ckpt.checkpoint_name(step)
        if ckpt.check_complete(final)[0] is not None:
            return
        if self.env.is_main:
            ckpt.begin(root, step)
        barrier()
        tmp = ckpt.temp_dir(root, step)
        self.engine.save(tmp)
        ckpt.save_rng(tmp, self.env.rank)
        barrier()
        if self.env.is_main:
            state = {
                "step": step,
                "totalSteps": self.total_steps,
                "epoch": position.epoch,
                "microStep": position.micro_step,
                "loss": loss,
                "worldSize": self.env.world_size,
                "config": self.cfg.to_dict(),
            }
            ckpt.commit(root, step, state, self.cfg.checkpoint.keep_last)
            if self.cfg.checkpoint_uri is not None:  # s3://: upload it, manifest last, and prune there too
                from lmforge.runtime.storage import staging

                kept = [n for n, _ in ckpt.list_checkpoints(root)]
                staging.push_checkpoint(final, self.cfg.checkpoint_uri, kept)
                self.log(f"uploaded checkpoint {final.name} to {self.cfg.checkpoint_uri}")
            self.reporter.checkpoint(str(final))
        barrier()

    def resume(self) -> tuple[int, DataPosition]:
        """(step, data position) of the newest loadable complete checkpoint, or (0, start)."""
        if self.cfg.checkpoint.resume != "auto":
            return 0, DataPosition()
        if self.cfg.checkpoint_uri is not None:
            self.pull_remote_checkpoint()
        for found in ckpt.find_resumable(self.cfg.checkpoint_dir, log=self.log):
            try:
                self.engine.load(found.path)
            except Exception as exc:  # same files on every rank: every rank falls back alike
                self.log(
                    f"cannot load checkpoint {found.path} ({type(exc).__name__}: {exc}); trying an older one"
                )
                continue
            state = found.state
            if state.get("worldSize") != self.env.world_size:
                self.log(
                    f"checkpoint was written by {state.get('worldSize')} ranks, now {self.env.world_size}: "
                    "weights and optimizer reshard, the data order restarts its epoch"
                )
                position = DataPosition(int(state["epoch"]), 0)
            else:
                position = DataPosition(int(state["epoch"]), int(state["microStep"]))
            if not ckpt.load_rng(found.path, self.env.rank):
                self.log(f"no RNG state for rank {self.env.rank} in {found.path}; keeping the seeded one")
            self.log(f"resumed from {found.path} at step {found.step}")
            return found.step, position
        return 0, DataPosition()

    def pull_remote_checkpoint(self) -> None:
        """s3:// checkpoints: the newest complete one (it has a manifest) into the local staging
        root on every node, unless it is there already (a restart on the same node)."""
        from lmforge.runtime.storage import staging

        uri, root = self.cfg.checkpoint_uri, self.cfg.checkpoint_dir
        assert uri is not None
        steps = staging.remote_checkpoints(uri)
        if not steps:
            return
        name = ckpt.checkpoint_name(steps[-1])
        if ckpt.check_complete(root / name)[0] is None:
            staging.pull_newest_checkpoint(uri, root, name)
            self.log(f"downloaded checkpoint {name} from {uri}")

    # --- output --------------------------------------------------------------------------------

    def append_log(self, record: dict[str, Any]) -> None:
        out = self.cfg.output_dir
        out.mkdir(parents=True, exist_ok=True)
        with (out / TRAIN_LOG).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def finish(self) -> None:
        """Collective: gathers the weights; rank 0 writes the output directory."""
        started = time.monotonic()
        state_dict = self.engine.full_state_dict()
        if self.env.is_main:
            out: Path = save_output(self.engine.module, state_dict, self.cfg)
            self.log(f"wrote {out} in {time.monotonic() - started:.1f}s")
            if self.cfg.output_uri is not None:
                from lmforge.runtime.storage import staging

                staging.publish(out, self.cfg.output_uri)
                self.log(f"uploaded {out} to {self.cfg.output_uri}")
        barrier()
