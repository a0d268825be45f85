"""The slice of the kubelet API that `kubectl logs` needs: GET /containerLogs/{ns}/{pod}/{container}
(query: previous, tailLines, limitBytes, follow, timestamps ignored) over HTTPS.

The local apiserver runs without --kubelet-certificate-authority and --kubelet-client-certificate,
so it dials kubelets without verifying their certificate and presents none: a self-signed
certificate is enough and there is no client to authenticate (the server binds 127.0.0.1 only).
"""

from __future__ import annotations

import re
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

# (namespace, pod, container, previous) -> (log file, still running) or None
LogLookup = Callable[[str, str, str, bool], "tuple[Path, Callable[[], bool]] | None"]
_PATH = re.compile(r"^/containerLogs/([^/]+)/([^/]+)/([^/]+)/?$")


def ensure_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "kubelet.crt", directory / "kubelet.key"
    if not (cert.exists() and key.exists()):
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "3650",
                "-subj",
                "/CN=lmforge-local",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
            ],
            check=True,
            capture_output=True,
        )
    return cert, key


def tail(data: bytes, lines: int | None, limit: int | None) -> bytes:
    if lines is not None:
        parts = data.splitlines(keepends=True)
        data = b"".join(parts[-lines:]) if lines > 0 else b""
    if limit is not None:
        data = data[:limit]
    return data


class _LogsHandler(BaseHTTPRequestHandler):
    """GET /containerLogs: one request per thread of the server; `lookup` is set per server."""

    lookup: LogLookup
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        match = _PATH.match(url.path)
        if not match:
            self._reply(404, b"only /containerLogs is served by the lmforge process node\n")
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        namespace, pod, container = match.groups()
        found = self.lookup(namespace, pod, container, query.get("previous") == "true")
        if found is None:
            self._reply(
                404,
                f"container {match.group(3)} of pod {match.group(1)}/{match.group(2)} "
                "has no logs here\n".encode(),
            )
            return
        path, running = found
        data = path.read_bytes() if path.exists() else b""
        lines = int(query["tailLines"]) if "tailLines" in query else None
        limit = int(query["limitBytes"]) if "limitBytes" in query else None
        if query.get("follow") != "true":
            self._reply(200, tail(data, lines, limit))
            return
        self._follow(path, running, data, lines)

    def _follow(self, path: Path, running: Callable[[], bool], data: bytes, lines: int | None) -> None:
        """follow=true: the tail so far, then what the container appends, chunked, until it exits."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        offset = len(data)
        self._chunk(tail(data, lines, None))
        try:
            while True:
                alive = running()
                with open(path, "rb") as f:
                    f.seek(offset)
                    more = f.read()
                offset += len(more)
                self._chunk(more)
                if not alive:
                    break
                time.sleep(0.5)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class KubeletServer:
    def __init__(self, lookup: LogLookup, cert_dir: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        class Handler(_LogsHandler):
            pass

        Handler.lookup = staticmethod(lookup)
        cert, key = ensure_certificate(cert_dir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="kubelet-api")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
