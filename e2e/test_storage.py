"""Models and data from remote storage on the local process node (issue #23): the storage
initializer (`lmforge fetch` in an init container) downloads an hf:// model from the local fake
Hub, and s3:// locations live on a real S3 API server on loopback (moto in server mode); the pods
are real processes, the answers come through the official openai client."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmforge.devcluster import pipeline
from lmforge.devcluster.fakehub import FakeHub
from lmforge.devcluster.node.node import NODE_NAME
from lmforge.devcluster.s3server import S3Server

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = f"e2e-storage-{uuid.uuid4().hex[:6]}"
ON_PROCESS_NODE = {
    "nodeSelector": {pipeline.NODE_TYPE_LABEL: "process"},
    "tolerations": [
        {"key": "lmforge.dev/process-node", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    ],
}


class Env:
    def __init__(self, kube: pipeline.Kube, directory: Path, logs: Path, hub: FakeHub, s3: S3Server) -> None:
        self.kube, self.directory, self.logs, self.hub, self.s3 = kube, directory, logs, hub, s3

    def diagnostics(self) -> str:
        return pipeline.diagnostics(self.kube, NAMESPACE, self.logs)

    def apply(self, doc: dict[str, Any]) -> None:
        doc.setdefault("metadata", {})["namespace"] = NAMESPACE
        self.kube.apply([doc])

    def wait_phase(self, kind: str, name: str, phases: tuple[str, ...], timeout: float) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = pipeline.status_of(self.kube, kind, name, NAMESPACE)
            if status.get("phase") == "Failed" and "Failed" not in phases:
                raise AssertionError(
                    f"{kind} {name} failed: {json.dumps(status, indent=1)}{self.diagnostics()}"
                )
            return status if status.get("phase") in phases else None

        return pipeline.wait(
            reached,
            timeout,
            lambda: (
                f"{kind} {name} to be {phases}: "
                f"{pipeline.status_of(self.kube, kind, name, NAMESPACE)}{self.diagnostics()}"
            ),
        )

    def endpoint(self, service: str) -> str:
        from lmforge.devcluster.node.cli import endpoints

        return pipeline.wait(
            lambda: endpoints(self.kube.env.get("KUBECONFIG"), NAMESPACE, service),
            60,
            f"a ready endpoint of Service {service}",
        )[0]

    def pods(self, label: str) -> list[dict[str, Any]]:
        return self.kube.json("get", "pods", "-n", NAMESPACE, "-l", label)["items"]


def default_may_annotate_its_pods() -> dict[str, Any]:
    """The storage initializer of an InferenceService pod (the namespace's default ServiceAccount)
    reports progress on its pod: the workers' Role (get/patch pods) bound to `default` too."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "default-annotates-pods", "namespace": NAMESPACE},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": pipeline.WORKER_SERVICE_ACCOUNT,
        },
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": NAMESPACE}],
    }


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory) -> Iterator[Env]:
    kube = pipeline.Kube.of(cluster.info)
    pipeline.apply_crds(kube, ROOT / "crds")
    directory, logs = tmp_path_factory.mktemp("storage"), tmp_path_factory.mktemp("storage-logs")
    pipeline.prepare(kube, NAMESPACE, directory)  # namespace, worker RBAC, tiny-llama/ and chat.jsonl
    kube.apply([default_may_annotate_its_pods()])
    hub = FakeHub.start()
    hub.add_directory("acme/tiny-llama", directory / "tiny-llama")
    s3 = S3Server().start()
    started = [pipeline.start_node(kube, logs / "node", logs / "node.log")]
    try:
        cache = {"LMFORGE_MODEL_CACHE_HOSTPATH": str(directory / "model-cache")}  # Helm modelCache.enabled
        started.append(
            pipeline.start_operator(
                kube, NAMESPACE, logs / "operator.log", pipeline.free_port(), extra_env=cache
            )
        )
        yield Env(kube, directory, logs, hub, s3)
    finally:
        if len(started) == 2:
            try:
                pipeline.delete_resources(kube, NAMESPACE, timeout=60)
            except pipeline.PipelineError:
                pass
        for process in reversed(started):
            pipeline.stop(process)
        kube("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        kube("delete", "node", NODE_NAME, "--wait=false", check=False)
        hub.stop()
        s3.stop()


def chat(endpoint: str, model: str) -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{endpoint}/v1", api_key="none", max_retries=2, timeout=60)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0
    )


def inference_service(name: str, source: str, env: list[dict[str, Any]], replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": source, "maxModelLen": 256},
            "replicas": replicas,
            "env": env,
            "engine": {"maxNumSeqs": 4, "maxNumBatchedTokens": 256},
            **ON_PROCESS_NODE,
        },
    }


@pytest.mark.slow
def test_hf_model_is_fetched_by_the_storage_initializer_and_served(env: Env) -> None:
    """The bug of #23: an hf:// InferenceService crash-looped (`lmforge serve --model org/name`)."""
    hub_env = [{"name": k, "value": v} for k, v in env.hub.env().items()]
    env.apply(inference_service("hf-chat", "hf://acme/tiny-llama", hub_env))
    status = env.wait_phase("inferenceservices.lmforge.dev", "hf-chat", ("Ready",), timeout=300)
    assert status["readyReplicas"] == 1
    [pod] = env.pods("lmforge.dev/inferenceservice=hf-chat")
    assert pod["spec"]["nodeName"] == NODE_NAME
    [init] = pod["status"]["initContainerStatuses"]
    assert (init["name"], init["state"]["terminated"]["exitCode"]) == ("storage-initializer", 0)
    fetch = json.loads(pod["metadata"]["annotations"]["lmforge.dev/fetch"])
    assert (fetch["uri"], fetch["phase"], fetch["cached"]) == ("hf://acme/tiny-llama", "Done", False)
    assert (
        env.hub.downloads()[
            "/acme/tiny-llama/resolve/" + "0123456789abcdef0123456789abcdef01234567" + "/config.json"
        ]
        == 1
    )

    reply = chat(env.endpoint("hf-chat"), "hf-chat")
    assert reply.model == "hf-chat" and reply.usage.completion_tokens > 0


def s3_env_vars(env: Env) -> list[dict[str, Any]]:
    """AWS_* for the pods: endpoint and region as values, the key pair from the Secret s3-creds."""
    creds = env.s3.env()
    env.kube.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s3-creds", "namespace": NAMESPACE},
                "stringData": {"id": creds["AWS_ACCESS_KEY_ID"], "secret": creds["AWS_SECRET_ACCESS_KEY"]},
            }
        ]
    )
    secret = {"name": "s3-creds"}
    return [
        {"name": "AWS_ENDPOINT_URL", "value": creds["AWS_ENDPOINT_URL"]},
        {"name": "AWS_REGION", "value": creds["AWS_REGION"]},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {**secret, "key": "id"}}},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {**secret, "key": "secret"}}},
    ]


def s3_keys(env: Env, bucket: str, prefix: str) -> set[str]:
    listing = env.s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix) :] for o in listing.get("Contents") or ()}


@pytest.mark.slow
def test_s3_train_quantize_serve_chain(env: Env) -> None:
    """TrainJob from s3:// to s3://, QuantizeJob from that s3:// output to s3://, and its serveAfter
    InferenceService from s3://, all on the process node against the loopback S3 server."""
    from lmforge.runtime.storage.transfer import upload

    bucket = f"chain-{uuid.uuid4().hex[:8]}"
    env.s3.create_bucket(bucket)
    quiet = lambda payload, line: None  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.s3.env().items():
            mp.setenv(name, value)
        upload(env.directory / "tiny-llama", f"s3://{bucket}/base", report=quiet)
        upload(env.directory / "chat.jsonl", f"s3://{bucket}/data/chat.jsonl", report=quiet)
    aws = s3_env_vars(env)

    [trainjob] = pipeline.render("trainjob.yaml", env.directory)
    trainjob["metadata"]["name"] = "s3-tune"
    trainjob["spec"].update(
        model=f"s3://{bucket}/base",
        output={"dir": f"s3://{bucket}/tuned"},
        env=aws,
    )
    trainjob["spec"]["dataset"]["source"] = f"s3://{bucket}/data/chat.jsonl"
    trainjob["spec"]["hyperparameters"].update(maxSteps=10)
    trainjob["spec"]["checkpoint"] = {"everySteps": 5, "keepLast": 1}
    pipeline.wait_master_port()
    env.apply(trainjob)
    trained = env.wait_phase("trainjobs.lmforge.dev", "s3-tune", ("Succeeded",), timeout=600)
    assert trained["progress"]["step"] == 10
    tuned = s3_keys(env, bucket, "tuned/")
    assert {".lmforge-manifest.json", "config.json", "model.safetensors"} <= tuned, tuned
    assert {k.split("/")[1] for k in tuned if k.startswith("checkpoints/")} == {"step-00000010"}

    env.apply(
        {
            "apiVersion": "lmforge.dev/v1alpha1",
            "kind": "QuantizeJob",
            "metadata": {"name": "s3-w8"},
            "spec": {
                "model": f"s3://{bucket}/tuned",
                "method": "w8a16",
                "output": f"s3://{bucket}/tuned-w8a16",
                "serveAfter": {"name": "s3-chat"},
                "env": aws,
                **ON_PROCESS_NODE,
            },
        }
    )
    quantized = env.wait_phase("quantizejobs.lmforge.dev", "s3-w8", ("Succeeded",), timeout=300)
    assert quantized["result"]["outputPath"] == f"s3://{bucket}/tuned-w8a16"
    assert {".lmforge-manifest.json", "config.json"} <= s3_keys(env, bucket, "tuned-w8a16/")

    served = env.wait_phase("inferenceservices.lmforge.dev", "s3-chat", ("Ready",), timeout=300)
    assert served["readyReplicas"] == 1
    [pod] = env.pods("lmforge.dev/inferenceservice=s3-chat")
    fetch = json.loads(pod["metadata"]["annotations"]["lmforge.dev/fetch"])
    assert (fetch["uri"], fetch["phase"]) == (f"s3://{bucket}/tuned-w8a16", "Done")
    reply = chat(env.endpoint("s3-chat"), "s3-chat")
    assert reply.model == "s3-chat" and reply.usage.completion_tokens > 0


@pytest.mark.slow
def test_a_missing_s3_key_fails_the_job_naming_the_uri(env: Env) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    env.s3.create_bucket(bucket)
    env.apply(
        {
            "apiVersion": "lmforge.dev/v1alpha1",
            "kind": "QuantizeJob",
            "metadata": {"name": "s3-missing"},
            "spec": {
                "model": f"s3://{bucket}/no-such-model",
                "method": "w8a16",
                "output": f"s3://{bucket}/out",
                "env": s3_env_vars(env),
                **ON_PROCESS_NODE,
            },
        }
    )
    failed = env.wait_phase("quantizejobs.lmforge.dev", "s3-missing", ("Failed",), timeout=300)
    message = failed["lastFailure"]["message"]
    assert f"cannot download s3://{bucket}/no-such-model: no such object or prefix" in message, failed


def test_a_missing_s3_key_fails_the_inference_service_naming_the_uri(env: Env) -> None:
    """The storage initializer crash-loops on a missing key: the server never starts, and the
    InferenceService (not just its pod) says why, naming the URI."""
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    env.s3.create_bucket(bucket)
    uri = f"s3://{bucket}/no-such-model"
    env.apply(inference_service("missing-chat", uri, s3_env_vars(env)))
    failed = env.wait_phase("inferenceservices.lmforge.dev", "missing-chat", ("Failed",), timeout=300)
    failure = failed["lastFailure"]
    assert f"cannot download {uri}" in failure["message"], failed
    assert failure["message"].startswith("storage-initializer: "), failed
    [ready] = [cond for cond in failed["conditions"] if cond["type"] == "Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "StorageInitializerFailed"), ready
    assert uri in ready["message"], ready


@pytest.mark.slow
def test_node_cache_second_replica_starts_warm(env: Env) -> None:
    """With the operator's node model cache (Helm modelCache), the second replica's storage
    initializer finds the model cached on the node: no download, symlinks into the cache entry."""
    import time

    from lmforge.runtime.storage.transfer import upload

    bucket = f"cache-{uuid.uuid4().hex[:8]}"
    env.s3.create_bucket(bucket)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.s3.env().items():
            mp.setenv(name, value)
        upload(env.directory / "tiny-llama", f"s3://{bucket}/model", report=lambda payload, line: None)
    env.apply(inference_service("cached-chat", f"s3://{bucket}/model", s3_env_vars(env)))
    env.wait_phase("inferenceservices.lmforge.dev", "cached-chat", ("Ready",), timeout=300)
    [first] = env.pods("lmforge.dev/inferenceservice=cached-chat")
    assert json.loads(first["metadata"]["annotations"]["lmforge.dev/fetch"])["cached"] is False

    scaled = time.monotonic()
    env.kube("patch", "inferenceservices.lmforge.dev", "cached-chat", "-n", NAMESPACE, "--type=merge",
             "-p", json.dumps({"spec": {"replicas": 2}}))  # fmt: skip

    def two_ready() -> dict[str, Any] | None:
        status = pipeline.status_of(env.kube, "inferenceservices.lmforge.dev", "cached-chat", NAMESPACE)
        return status if status.get("readyReplicas") == 2 else None

    pipeline.wait(two_ready, 300, lambda: f"a second ready replica{env.diagnostics()}")
    second_replica_s = time.monotonic() - scaled
    [second] = [
        p
        for p in env.pods("lmforge.dev/inferenceservice=cached-chat")
        if p["metadata"]["name"] != first["metadata"]["name"]
    ]
    fetch = json.loads(second["metadata"]["annotations"]["lmforge.dev/fetch"])
    assert (fetch["cached"], fetch["bytes"]) == (True, 0), fetch

    def warm_in_status() -> dict[str, Any] | None:  # the operator's status.model, from both reports
        status = pipeline.status_of(env.kube, "inferenceservices.lmforge.dev", "cached-chat", NAMESPACE)
        model = status.get("model") or {}
        return model if model.get("cachedReplicas") == 1 and model.get("cached") is True else None

    model = pipeline.wait(warm_in_status, 60, lambda: f"status.model.cached true{env.diagnostics()}")
    assert (model["source"], model["downloading"]) == (f"s3://{bucket}/model", 0), model
    print(
        f"\nsecond replica (node cache, warm): Ready {second_replica_s:.1f}s after the scale-up; fetch {fetch}"
    )
    reply = chat(env.endpoint("cached-chat"), "cached-chat")
    assert reply.usage.completion_tokens > 0
