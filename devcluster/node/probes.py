"""One probe attempt (httpGet / tcpSocket / exec), kubelet semantics: HTTP 200-399 is success."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProbeTiming:
    initial_delay_s: float
    period_s: float
    timeout_s: float
    success_threshold: int
    failure_threshold: int

    @classmethod
    def of(cls, probe: Mapping[str, Any]) -> ProbeTiming:
        return cls(
            float(probe.get("initialDelaySeconds", 0)),
            float(probe.get("periodSeconds", 10)),
            float(probe.get("timeoutSeconds", 1)),
            int(probe.get("successThreshold", 1)),
            int(probe.get("failureThreshold", 3)),
        )


def resolve_port(port: int | str, container: Mapping[str, Any]) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for item in container.get("ports") or ():
        if item.get("name") == port:
            return int(item["containerPort"])
    raise ValueError(f"no container port named {port!r}")


def run_probe(
    probe: Mapping[str, Any],
    container: Mapping[str, Any],
    pod_ip: str,
    env: Mapping[str, str],
    cwd: str | None,
) -> tuple[bool, str]:
    """(success, detail) of one attempt."""
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            get = probe["httpGet"]
            host, port = get.get("host") or pod_ip, resolve_port(get["port"], container)
            if get.get("scheme", "HTTP").upper() == "HTTPS":
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    host, port, timeout=timeout, context=ssl._create_unverified_context()
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or ()}
                conn.request("GET", get.get("path", "/"), headers=headers)
                status = conn.getresponse().status
            finally:
                conn.close()
            return 200 <= status < 400, f"HTTP probe failed with statuscode: {status}"
        if "tcpSocket" in probe:
            tcp = probe["tcpSocket"]
            with socket.create_connection(
                (tcp.get("host") or pod_ip, resolve_port(tcp["port"], container)), timeout=timeout
            ):
                return True, ""
        if "exec" in probe:
            result = subprocess.run(
                probe["exec"]["command"],
                env=dict(env),
                cwd=cwd,
                capture_output=True,
                timeout=timeout,
                text=True,
            )
            return result.returncode == 0, (result.stdout + result.stderr)[-200:]
    except (OSError, http.client.HTTPException, subprocess.TimeoutExpired, ValueError) as error:
        return False, f"probe error: {error}"
    return False, f"unsupported probe {sorted(probe)}"
