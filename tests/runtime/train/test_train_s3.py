"""TrainJob worker with every location on S3 (a real S3 API server on loopback, moto server mode):
model and dataset downloaded, output and checkpoints uploaded with their manifest last, keep-last
pruning on the bucket, a crash resumed on a fresh node from the bucket's newest checkpoint, and a
missing key failing with the URI in the message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.devcluster.s3server import S3Server
from lmforge.runtime.storage.transfer import upload
from lmforge.runtime.train import main
from lmforge.runtime.train.config import config_from_dict
from lmforge.runtime.train.loop import train


class Crash(Exception):
    pass


def keys(s3_server: S3Server, bucket: str, prefix: str) -> list[str]:
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix) :] for o in listing.get("Contents") or ())


@pytest.fixture
def bucket(s3_env: dict[str, str], s3_server: S3Server, tiny_model: Path, text_dataset: Path, request) -> str:
    name = f"train-{abs(hash(request.node.name)) % 10**8}"
    s3_server.create_bucket(name)
    upload(tiny_model, f"s3://{name}/base", report=lambda p, line: None)
    upload(text_dataset, f"s3://{name}/data/train.jsonl", report=lambda p, line: None)
    return name


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def s3_config(helpers, bucket: str, tmp_path: Path) -> dict:
    config = helpers.base_config(
        Path("/unused"), Path("/unused"), Path("/unused"), hyperparameters={"maxSteps": 8}
    )
    config.update(
        model=f"s3://{bucket}/base",
        dataset={"source": f"s3://{bucket}/data/train.jsonl"},
        output={"dir": f"s3://{bucket}/out"},
        checkpoint={"everySteps": 2, "keepLast": 2},
    )
    return config


def test_train_from_and_to_s3_with_a_crash_resumed_on_a_fresh_node(
    helpers, bucket: str, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMFORGE_STAGING_DIR", str(tmp_path / "node-a"))

    def crash(step: int, loss: float) -> None:
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(config_from_dict(s3_config(helpers, bucket, tmp_path)), on_step=crash)
    remote = keys(s3_server, bucket, "out/checkpoints/")
    assert {k.split("/")[0] for k in remote} == {"step-00000002", "step-00000004"}
    assert "step-00000004/.lmforge-manifest.json" in remote and "step-00000004/trainer_state.json" in remote
    assert keys(s3_server, bucket, "out/model") == []  # no output before the end

    monkeypatch.setenv("LMFORGE_STAGING_DIR", str(tmp_path / "node-b"))  # the pod restarts elsewhere
    logs: list[str] = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: logs.append(" ".join(map(str, a))))
    assert train(config_from_dict(s3_config(helpers, bucket, tmp_path))) == 0
    monkeypatch.undo()
    assert any("downloaded checkpoint step-00000004 from s3://" in line for line in logs), logs
    assert any("resumed from" in line and "step-00000004" in line for line in logs), logs
    out = keys(s3_server, bucket, "out/")
    assert {".lmforge-manifest.json", "config.json", "model.safetensors", "train_log.jsonl"} <= set(out)
    steps = {k.split("/")[1] for k in out if k.startswith("checkpoints/")}
    assert steps == {"step-00000006", "step-00000008"}  # keepLast 2, pruned on the bucket too
    manifest = json.loads(
        s3_server.client().get_object(Bucket=bucket, Key="out/.lmforge-manifest.json")["Body"].read()
    )["files"]
    assert "checkpoints/step-00000008/trainer_state.json" not in manifest  # checkpoints have their own
    assert manifest["model.safetensors"]["size"] > 0


def test_missing_model_key_fails_naming_the_uri(
    helpers, bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMFORGE_STAGING_DIR", str(tmp_path / "node"))
    config = s3_config(helpers, bucket, tmp_path)
    config["model"] = f"s3://{bucket}/no-such-model"
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    assert main(["--config", str(path)]) == 1
    assert (
        f"lmforge train: download error: model: cannot download s3://{bucket}/no-such-model: no such object or prefix"
        in capsys.readouterr().err
    )
