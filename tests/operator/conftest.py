"""`apiserver`: a small in-memory Kubernetes API server on aiohttp, for the client
(operator/kube.py) and the controllers' calls through it.

It keeps objects by path and answers the verbs the operator uses the way kube-apiserver does
(status codes, `Status` bodies, resourceVersion checks on PUT, content types of PATCH), and logs
every request so a test can see what went over the wire. The real API server is exercised by
the e2e suites."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    authorization: str | None
    body: Any
    client_cn: str | None = None  # CN of the TLS client certificate, if one was presented


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class FakeApiServer:
    url: str = ""
    token: str | None = None  # when set, requests without `Authorization: Bearer <token>` get 401
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # object path -> object
    requests: list[Request] = field(default_factory=list)
    fail: dict[tuple[str, str], tuple[int, str, str]] = field(
        default_factory=dict
    )  # (method, path) -> answer
    _versions: Iterator[int] = field(default_factory=lambda: itertools.count(100))

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]

    def put(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store an object as if someone created it: it gets a resourceVersion."""
        stored = json.loads(json.dumps(obj))
        stored.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
        self.objects[path] = stored
        return stored

    async def handle(self, request: web.Request) -> web.Response:
        text = await request.text()
        body = json.loads(text) if text else None
        cert = request.transport.get_extra_info("peercert") if request.transport else None
        client_cn = next(
            (value for rdn in (cert or {}).get("subject", ()) for key, value in rdn if key == "commonName"),
            None,
        )
        self.requests.append(
            Request(
                request.method,
                request.path,
                dict(request.query),
                request.content_type,
                request.headers.get("Authorization"),
                body,
                client_cn,
            )
        )
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._status(401, "Unauthorized", "Unauthorized")
        if (request.method, request.path) in self.fail:
            return self._status(*self.fail[(request.method, request.path)])
        return await self._serve(request, body)

    async def _serve(self, request: web.Request, body: Any) -> web.Response:  # noqa: C901 - a fake API server's route table, one branch per verb
        method, path = request.method, request.path
        parts = path.rstrip("/").split("/")
        # /api/v1/namespaces/ns/pods/name/status -> resource "pods", name, subresource
        offset = 3 if parts[1] == "api" else 4
        rest = parts[offset:]
        if rest[:1] == ["namespaces"]:
            rest = rest[2:]
        plural, name, sub = (rest + [None, None, None])[:3]
        obj_path = path.rsplit("/", 1)[0] if sub else path
        collection = name is None
        if method == "GET" and not collection:
            found = self.objects.get(obj_path)
            return (
                self._json(200, found)
                if found
                else self._status(404, "NotFound", f'{plural} "{name}" not found')
            )
        if method == "POST" and collection:
            obj_name = body["metadata"]["name"]
            if f"{path}/{obj_name}" in self.objects:
                return self._status(409, "AlreadyExists", f'{plural} "{obj_name}" already exists')
            return self._json(201, self.put(f"{path}/{obj_name}", body))
        if method == "PUT" and sub == "status":
            found = self.objects.get(obj_path)
            if found is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            if body["metadata"].get("resourceVersion") != found["metadata"]["resourceVersion"]:
                return self._status(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {plural} "{name}": '
                    "the object has been modified; please apply your changes "
                    "to the latest version and try again",
                )
            return self._json(200, self.put(obj_path, {**found, "status": body.get("status")}))
        if method == "PATCH" and sub == "scale":
            found = self.objects.get(obj_path)
            if request.content_type != "application/merge-patch+json":
                return self._status(415, "UnsupportedMediaType", request.content_type)
            if found is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            found["spec"]["replicas"] = body["spec"]["replicas"]
            self.put(obj_path, found)
            return self._json(200, {"kind": "Scale", "spec": {"replicas": body["spec"]["replicas"]}})
        if method == "GET" and collection:  # a LIST; fieldSelector: only status.phase=<phase>
            phase = request.query.get("fieldSelector", "").removeprefix("status.phase=") or None
            items = [
                o
                for p, o in self.objects.items()
                if p.rsplit("/", 1)[0] == path
                and (phase is None or (o.get("status") or {}).get("phase") == phase)
            ]
            return self._json(200, {"kind": "List", "items": items})
        if (
            method == "PATCH"
            and not collection
            and not sub
            and request.content_type == "application/merge-patch+json"
        ):
            found = self.objects.get(obj_path)  # only metadata fields, resourceVersion checked
            if found is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            meta = dict(body.get("metadata") or {})
            version = meta.pop("resourceVersion", None)
            if version is not None and version != found["metadata"]["resourceVersion"]:
                return self._status(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{name}"')
            return self._json(200, self.put(obj_path, {**found, "metadata": {**found["metadata"], **meta}}))
        if method == "PATCH" and not collection and not sub:
            if request.content_type != "application/apply-patch+yaml":
                return self._status(415, "UnsupportedMediaType", request.content_type)
            if not request.query.get("fieldManager"):
                return self._status(
                    422,
                    "Invalid",
                    'PatchOptions.meta.k8s.io "" is invalid: fieldManager: '
                    "Required value: is required for apply patch",
                )
            created = obj_path not in self.objects
            return self._json(201 if created else 200, self.put(obj_path, body))
        if method == "DELETE" and not collection:
            found = self.objects.pop(obj_path, None)
            return (
                self._json(200, found)
                if found
                else self._status(404, "NotFound", f'{plural} "{name}" not found')
            )
        if method == "DELETE" and collection:
            wanted = dict(
                term.split("=", 1) for term in request.query.get("labelSelector", "").split(",") if term
            )
            gone = [
                p
                for p, o in self.objects.items()
                if p.rsplit("/", 1)[0] == path
                and wanted.items() <= (o["metadata"].get("labels") or {}).items()
            ]
            return self._json(200, {"kind": "List", "items": [self.objects.pop(p) for p in gone]})
        return self._status(405, "MethodNotAllowed", f"{method} {path}")

    @staticmethod
    def _json(code: int, obj: Any) -> web.Response:
        return web.json_response(obj, status=code)

    @staticmethod
    def _status(code: int, reason: str, message: str) -> web.Response:
        return web.json_response(status_body(code, reason, message), status=code)


@pytest.fixture
def start_apiserver() -> Iterator[Callable[..., FakeApiServer]]:
    """`start_apiserver(token=None, ssl_context=None)`: a FakeApiServer on 127.0.0.1 (https with
    `ssl_context`), in a thread with its own event loop (tests drive clients with asyncio.run);
    stopped at teardown."""
    with ExitStack() as stack:

        def start(token: str | None = None, ssl_context: Any = None) -> FakeApiServer:
            return stack.enter_context(_serving(FakeApiServer(token=token), ssl_context))

        yield start


@pytest.fixture
def apiserver(start_apiserver: Callable[..., FakeApiServer]) -> FakeApiServer:
    return start_apiserver()


@contextmanager
def _serving(server: FakeApiServer, ssl_context: Any) -> Iterator[FakeApiServer]:
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    server.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
