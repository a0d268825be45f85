"""A local fake Hugging Face Hub for tests and the e2e suites: an HTTP server on loopback that
implements just what `huggingface_hub` calls for small repos (repo info, tree listing, file
HEAD/GET), so the real snapshot_download code path runs end to end with HF_ENDPOINT pointed at
it. Repos are (kind, "org/name") -> {path: bytes}; `add_directory` serves a checkpoint on disk.

    hub = FakeHub.start({("models", "acme/tiny"): {"config.json": b"{}"}})
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SHA = "0123456789abcdef0123456789abcdef01234567"
Repos = dict[tuple[str, str], dict[str, bytes]]


@dataclass
class FakeHub:
    url: str
    repos: Repos = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    token_seen: list[str | None] = field(default_factory=list)

    server: Any = field(default=None, repr=False)

    def downloads(self) -> Counter[str]:
        return Counter(p for m, p in self.requests if m == "GET" and "/resolve/" in p)

    @classmethod
    def start(cls, repos: Repos | None = None) -> FakeHub:
        state = cls(url="", repos=dict(repos or {}))
        state.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        state.url = f"http://127.0.0.1:{state.server.server_address[1]}"
        threading.Thread(target=state.server.serve_forever, daemon=True).start()
        return state

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def add_directory(self, repo_id: str, directory: Path, kind: str = "models") -> None:
        """Serve every file below `directory` as repo `repo_id`."""
        self.repos[(kind, repo_id)] = {
            p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*"))
            if p.is_file()
        }

    def env(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1"}


def _handler(state: FakeHub) -> type[BaseHTTPRequestHandler]:  # noqa: C901 - a fake hub's route table
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(
            self, status: int, body: bytes, headers: dict[str, str] | None = None, head: bool = False
        ) -> None:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _not_found(self, head: bool) -> None:
            self._send(
                404,
                b'{"error": "Repository not found"}',
                {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"},
                head,
            )

        def _serve(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            state.requests.append(("HEAD" if head else "GET", path))
            auth = self.headers.get("Authorization")
            state.token_seen.append(auth.removeprefix("Bearer ") if auth else None)
            if m := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/[^/]+)?", path):
                files = state.repos.get((m[1], m[2]))
                if files is None:
                    return self._not_found(head)
                info = {"id": m[2], "sha": SHA, "siblings": [{"rfilename": f} for f in files]}
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
            if m := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/tree/[^/]+(?:/.*)?", path):
                files = state.repos.get((m[1], m[2]))
                if files is None:
                    return self._not_found(head)
                tree = [
                    {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in files.items()
                ]
                return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
            if m := re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
                files = state.repos.get(("datasets" if m[1] else "models", m[2]))
                if files is None or m[3] not in files:
                    return self._not_found(head)
                body = files[m[3]]
                return self._send(
                    200,
                    body,
                    {
                        "X-Repo-Commit": SHA,
                        "ETag": f'"{hashlib.sha1(body).hexdigest()}"',
                        "Content-Type": "application/octet-stream",
                    },
                    head,
                )
            return self._not_found(head)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(head=True)

    return Handler
