"""Live progress from rank 0: a tqdm-style line on stdout (for `kubectl logs`) every
`logEverySteps`, and the pod annotation `lmforge.dev/progress` (JSON) at most every 10 s, which the
operator folds into TrainJob.status.progress.

The payload and the throttle are pure; `PodAnnotator` is the only I/O. It patches the worker's own
pod (POD_NAME / POD_NAMESPACE from the downward API) with the in-cluster service account, through
the `kubernetes` client when importable, else plain HTTPS. Outside a cluster it is disabled; a
failing API server never stops training (the patch runs on a background thread).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ANNOTATION = "lmforge.dev/progress"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MIN_PATCH_INTERVAL_S = 10.0


def eta_seconds(step: int, total_steps: int, start_step: int, elapsed_s: float) -> int | None:
    """Seconds left at this run's pace (steps done since it started or resumed); None before the first."""
    done = step - start_step
    if done <= 0 or elapsed_s <= 0:
        return None
    return max(0, round(elapsed_s / done * (total_steps - step)))


def progress_payload(
    *,
    step: int,
    total_steps: int,
    loss: float | None,
    tokens_per_second: float | None,
    eta: int | None,
    epoch: float | None,
    last_checkpoint: str | None,
) -> dict[str, Any]:
    """The annotation's JSON object (keys as in operator/api/constants.py ANNOTATION_PROGRESS, plus
    `eta`, the same seconds under the short name)."""

    def num(value: float | None, digits: int) -> float | None:
        return None if value is None or not math.isfinite(value) else round(value, digits)

    return {
        "step": step,
        "totalSteps": total_steps,
        "loss": num(loss, 6),
        "tokensPerSecond": num(tokens_per_second, 1),
        "eta": eta,
        "etaSeconds": eta,
        "epoch": num(epoch, 4),
        "lastCheckpoint": last_checkpoint,
    }


def progress_line(
    *,
    step: int,
    total_steps: int,
    start_step: int,
    elapsed_s: float,
    loss: float | None,
    tokens_per_second: float | None,
    lr: float | None,
) -> str:
    from tqdm import tqdm

    postfix = ", ".join(
        part
        for part in (
            f"loss={loss:.4f}" if loss is not None else "",
            f"tok/s={tokens_per_second:.0f}" if tokens_per_second is not None else "",
            f"lr={lr:.3g}" if lr is not None else "",
        )
        if part
    )
    return tqdm.format_meter(
        step,
        total_steps,
        elapsed_s,
        ncols=110,
        prefix="train",
        unit="step",
        postfix=postfix,
        initial=start_step,
    )


@dataclass(slots=True)
class Throttle:
    """`ready()` is true at most once per `interval_s` (and always when forced)."""

    interval_s: float = MIN_PATCH_INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    last: float = -math.inf

    def ready(self, force: bool = False) -> bool:
        now = self.clock()
        if force or now - self.last >= self.interval_s:
            self.last = now
            return True
        return False


# --- the patch ------------------------------------------------------------------------------------


@dataclass(slots=True)
class PodAnnotator:
    namespace: str
    pod: str
    api_url: str
    token_file: Path
    ca_file: Path | None = None
    use_client: bool = True  # the `kubernetes` package when it imports
    timeout_s: float = 5.0
    _api: Any = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, sa_dir: Path = SA_DIR) -> PodAnnotator | None:
        """In a pod (POD_NAME, POD_NAMESPACE, KUBERNETES_SERVICE_HOST and the SA token present),
        else None. LMFORGE_PROGRESS_ANNOTATION=0 turns it off."""
        env = os.environ if env is None else env
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if env.get("LMFORGE_PROGRESS_ANNOTATION", "1") == "0" or not (host and env.get("POD_NAME")):
            return None
        token = sa_dir / "token"
        if not token.is_file():
            return None
        namespace = env.get("POD_NAMESPACE") or (sa_dir / "namespace").read_text().strip()
        host = f"[{host}]" if ":" in host else host
        ca = sa_dir / "ca.crt"
        return cls(namespace, env["POD_NAME"], f"https://{host}:{port}", token, ca if ca.is_file() else None)

    def _token(self) -> str:
        return self.token_file.read_text().strip()  # re-read: bound tokens rotate

    def patch(self, annotations: dict[str, str]) -> None:
        body = {"metadata": {"annotations": annotations}}
        if self.use_client and self._api is None:
            try:
                self._api = self._client_api()
            except ImportError:
                self.use_client = False
        if self.use_client:
            self._api.patch_namespaced_pod(self.pod, self.namespace, body, _request_timeout=self.timeout_s)
            return
        request = urllib.request.Request(
            f"{self.api_url}/api/v1/namespaces/{self.namespace}/pods/{self.pod}",
            method="PATCH",
            data=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/merge-patch+json",
                "Authorization": f"Bearer {self._token()}",
                "Accept": "application/json",
            },
        )
        context = None
        if self.api_url.startswith("https"):
            import ssl

            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as response:
            response.read()

    def _client_api(self) -> Any:
        from kubernetes import client

        conf = client.Configuration()
        conf.host = self.api_url
        conf.ssl_ca_cert = str(self.ca_file) if self.ca_file else None
        conf.api_key["BearerToken"] = f"Bearer {self._token()}"
        conf.refresh_api_key_hook = lambda c: c.api_key.update(  # type: ignore[assignment]  # the stub types the hook attribute as None
            BearerToken=f"Bearer {self._token()}"
        )
        return client.CoreV1Api(client.ApiClient(conf))


class BackgroundSender:
    """Sends the newest payload on a daemon thread; older unsent payloads are dropped. Errors are
    logged once to stderr and otherwise ignored."""

    def __init__(self, annotator: PodAnnotator, log: Callable[[str], None] | None = None):
        self.annotator = annotator
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._pending: dict[str, Any] | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._warned = False
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="lmforge-progress", daemon=True)
        self._thread.start()

    def submit(self, payload: dict[str, Any]) -> None:
        with self._cond:
            self._pending = payload
            self._cond.notify()

    def close(self, timeout_s: float = 5.0) -> None:
        """Flushes the last payload (waiting at most `timeout_s`) and stops the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                payload, self._pending = self._pending, None
                if payload is None:
                    return
            try:
                self.annotator.patch({ANNOTATION: json.dumps(payload, separators=(",", ":"))})
                self.sent += 1
            except Exception as exc:  # never let progress reporting break training
                if not self._warned:
                    self._warned = True
                    self.log(
                        f"[lmforge.train] cannot annotate pod {self.annotator.namespace}/"
                        f"{self.annotator.pod} with progress: {exc}"
                    )


# --- what the loop calls --------------------------------------------------------------------------


class ProgressReporter:
    """Rank 0's view: `step()` after every optimizer step, `checkpoint()` after a save, `close()`."""

    def __init__(
        self,
        *,
        total_steps: int,
        start_step: int,
        log_every_steps: int,
        annotator: PodAnnotator | None = None,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        throttle: Throttle | None = None,
        sender: Any = None,
    ):
        self.total_steps, self.start_step, self.log_every_steps = total_steps, start_step, log_every_steps
        self.out = out or sys.stdout
        self.clock = clock
        self.sender = sender or (BackgroundSender(annotator) if annotator else None)  # .submit(), .close()
        self.throttle = throttle or Throttle(clock=clock)
        self.started = clock()
        self.last_checkpoint: str | None = None
        self.payload: dict[str, Any] | None = None
        self._submitted: dict[str, Any] | None = None
        self._window_start, self._window_tokens, self._window_losses = self.started, 0, list[float]()

    def step(self, step: int, loss: float, tokens: int, epoch: float, lr: float | None = None) -> None:
        self._window_tokens += tokens
        self._window_losses.append(loss)
        last = step >= self.total_steps
        if step % self.log_every_steps and step != self.start_step + 1 and not last:
            return
        now = self.clock()
        window_s = max(now - self._window_start, 1e-9)
        mean_loss = sum(self._window_losses) / len(self._window_losses)
        tokens_per_second = self._window_tokens / window_s
        elapsed = now - self.started
        self._window_start, self._window_tokens, self._window_losses = now, 0, []
        print(
            progress_line(
                step=step,
                total_steps=self.total_steps,
                start_step=self.start_step,
                elapsed_s=elapsed,
                loss=mean_loss,
                tokens_per_second=tokens_per_second,
                lr=lr,
            ),
            file=self.out,
            flush=True,
        )
        self.payload = progress_payload(
            step=step,
            total_steps=self.total_steps,
            loss=mean_loss,
            tokens_per_second=tokens_per_second,
            eta=eta_seconds(step, self.total_steps, self.start_step, elapsed),
            epoch=epoch,
            last_checkpoint=self.last_checkpoint,
        )
        self._annotate(force=last)

    def checkpoint(self, path: str) -> None:
        self.last_checkpoint = path
        if self.payload is not None:
            self.payload["lastCheckpoint"] = path
        print(f"[lmforge.train] saved checkpoint {path}", file=self.out, flush=True)

    def _annotate(self, force: bool = False) -> None:
        if not self.sender or self.payload is None or self.payload == self._submitted:
            return
        if self.throttle.ready(force):
            self._submitted = dict(self.payload)
            self.sender.submit(self._submitted)

    def close(self) -> None:
        """Sends the final state (forced) and flushes."""
        if self.sender:
            self._annotate(force=True)
            self.sender.close()
