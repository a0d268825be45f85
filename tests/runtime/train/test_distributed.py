"""Two worker processes on the CPU (gloo) under `python -m lmforge.runtime.train.launch` (torchrun):
FSDP2 and DeepSpeed ZeRO-3 reproduce the single-process loss curve (2 ranks x batch 2 == 1 rank x
batch 2 x 2 accumulation steps), SIGTERM checkpoints and exits 143, and a 2-rank checkpoint
resumes on 1 rank (resharded)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lmforge.runtime.train.config import config_from_dict
from lmforge.runtime.train.launch import exit_code
from lmforge.runtime.train.loop import train

pytestmark = pytest.mark.slow


class Crash(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(helpers, config: dict, tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    env = helpers.subprocess_env()
    env.update(PET_NPROC_PER_NODE="2", PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(free_port()))
    return subprocess.Popen(
        [helpers.PYTHON, "-P", "-m", "lmforge.runtime.train.launch", "--config", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.fixture
def launched():
    """Processes started by a test; their process groups (launcher + workers) are killed afterwards."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def single_process_losses(helpers, config: dict, out: Path, steps: int) -> dict[int, float]:
    """The same run on one rank: batch 2 x 2 accumulation steps sees the same rows per step."""
    hp = {**config["hyperparameters"], "gradientAccumulationSteps": 2}
    cfg = config_from_dict(
        {
            **config,
            "backend": "torchrun",
            "zeroStage": None,
            "hyperparameters": hp,
            "output": {"dir": str(out)},
            "checkpoint": {"everySteps": 10**6},
        }
    )

    def stop(step: int, loss: float) -> None:
        if step == steps:
            raise Crash

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if steps == cfg.hyperparameters.max_steps:
            assert train(cfg) == 0
        else:
            with pytest.raises(Crash):
                train(cfg, on_step=stop)
    finally:
        torch.set_num_threads(threads)
    return helpers.read_losses(out)


def test_fsdp_two_ranks_sigterm_resume(
    helpers, tiny_model, text_dataset, tmp_path: Path, launched: list
) -> None:
    """SIGTERM at step ~3 -> checkpoint + 143; the checkpoint loads on 1 rank (resharded); the
    relaunched 2-rank run finishes; its loss curve equals the single-process one throughout."""
    out, steps = tmp_path / "out", 60
    config = helpers.base_config(
        tiny_model,
        text_dataset,
        out,
        hyperparameters={"maxSteps": steps, "logEverySteps": 1},
        checkpoint={"everySteps": 25},
    )
    proc = launch(helpers, config, tmp_path)
    launched.append(proc)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    assert proc.stdout is not None
    for line in proc.stdout:  # SIGTERM once step 3 is reported
        lines.append(line)
        if line.startswith("train:") and f" 3/{steps} " in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines[-30:])
    rest, _ = proc.communicate(timeout=180)
    log = "".join(lines) + rest
    assert proc.returncode == 143, log[-3000:]
    assert "world size 2" in log and "received SIGTERM: checkpointing step" in log

    (saved,) = (out / "checkpoints").iterdir()
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["worldSize"] == 2 and {"rng-rank00000.pt", "rng-rank00001.pt"} <= set(state["files"])
    stopped = state["step"]
    assert 3 <= stopped < steps

    # The 2-rank checkpoint loads on 1 rank: torch.distributed.checkpoint reshards.
    def stop_next(step: int, loss: float) -> None:
        assert step == stopped + 1
        raise Crash

    with pytest.raises(Crash):
        train(config_from_dict(config), on_step=stop_next)

    proc = launch(helpers, config, tmp_path)
    launched.append(proc)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert f"at step {stopped}" in log

    ranks2 = helpers.read_losses(out)
    ranks1 = single_process_losses(helpers, config, tmp_path / "single", steps)
    for step in range(1, steps + 1):
        assert ranks2[step] == pytest.approx(ranks1[step], abs=1e-5), f"step {step}"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # gathered from the FSDP2 shards
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "single")
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.allclose(p, q, atol=1e-4), name


def test_deepspeed_zero3_two_ranks(helpers, tiny_model, text_dataset, tmp_path: Path, launched: list) -> None:
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    config = helpers.base_config(
        tiny_model,
        text_dataset,
        out,
        backend="deepspeed",
        zeroStage=3,
        hyperparameters={"maxSteps": 6},
        checkpoint={"everySteps": 3},
    )
    proc = launch(helpers, config, tmp_path)
    launched.append(proc)
    log, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, log[-4000:]
    assert "backend deepspeed, world size 2" in log

    ranks2 = helpers.read_losses(out)
    ranks1 = single_process_losses(helpers, config, tmp_path / "single", 6)
    for step in range(1, 7):
        assert ranks2[step] == pytest.approx(ranks1[step], abs=1e-5), f"step {step}"
    state = json.loads((out / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert any(name.startswith("model/deepspeed/") for name in state["files"])

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # gathered from the ZeRO-3 shards
    assert model.config.num_hidden_layers == 2 and (out / "tokenizer.json").exists()


def test_exit_codes() -> None:
    assert (exit_code(-15), exit_code(-9), exit_code(2), exit_code(143)) == (143, 137, 2, 143)
