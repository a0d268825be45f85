"""The operator's one Kubernetes client: the REST calls the controllers make, on aiohttp.

Why aiohttp and not the official `kubernetes` client: the official client is synchronous, so a
controller needs a thread pool around it, and loading it (its API classes and the response models
that validate every answer) stalled the operator's event loop for ~6 s at start-up. kopf itself
runs on aiohttp, so here every call is a plain coroutine on the operator's loop: no threads, no
models. The official package is still used for one thing, its credential loader (kubeconfig, exec
plugins, in-cluster token refresh), once per client, in a thread: `KubeApi.from_environment`.

Objects are plain dicts in and out. What the controllers rely on:

- `get` returns None for 404 (NotFound);
- `create` returns None for 409 (AlreadyExists): children with fixed names make creation idempotent;
- `delete` and `delete_collection` count 404 as done;
- `replace_status` is a PUT carrying the object's resourceVersion: 409 Conflict when someone wrote
  it since it was read, 404 when it is gone, both raised as `ApiError`;
- `apply` is server-side apply with `force`: the field manager takes ownership of what it sets;
- `list` returns the collection (None for 404: e.g. a CRD that is not installed);
- `merge_patch` returns the patched object, None for 404 (raises 409 when a resourceVersion in the
  patch is stale);
- any other response >= 300 raises `ApiError` (`status`, `reason`, the API server's `message`).

Connection errors and timeouts are aiohttp's (`aiohttp.ClientError`, `TimeoutError`).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from lmforge.operator.api import constants as c

if TYPE_CHECKING:
    from kubernetes.client.configuration import Configuration

Object = dict[str, Any]

APPLY_PATCH = "application/apply-patch+yaml"  # JSON is YAML: the body is sent as JSON
MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """The API server answered >= 300 where the call does not treat that as success."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        self.status = status  # 403 Forbidden, 404 NotFound, 409 Conflict/AlreadyExists, 422 Invalid, ...
        self.reason = reason
        self.body = body
        super().__init__(f"{status} {reason}: {self.message[:500]}")

    @property
    def message(self) -> str:
        """The `message` of the Status object the API server sends with an error; else the body."""
        try:
            status = json.loads(self.body)
        except ValueError:
            return self.body
        message = status.get("message") if isinstance(status, dict) else None
        return message if isinstance(message, str) and message else self.body


@dataclass(frozen=True, slots=True)
class Resource:
    """Where a kind lives in the REST API."""

    group: str  # "" for the core API (pods, services, ...)
    version: str
    plural: str
    namespaced: bool = True

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        """`/api/v1/namespaces/ns/pods/name/status`; without a name, the collection."""
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced:
            if not namespace:
                raise ValueError(f"{self.plural} are namespaced: a namespace is needed")
            root += f"/namespaces/{namespace}"
        path = f"{root}/{self.plural}"
        if name:
            path += f"/{name}"
            if subresource:
                path += f"/{subresource}"
        return path


PODS = Resource("", "v1", "pods")
SERVICES = Resource("", "v1", "services")
CONFIG_MAPS = Resource("", "v1", "configmaps")
DEPLOYMENTS = Resource("apps", "v1", "deployments")
JOBS = Resource("batch", "v1", "jobs")
POD_DISRUPTION_BUDGETS = Resource("policy", "v1", "poddisruptionbudgets")
TRAINJOBS = Resource(c.GROUP, c.VERSION, "trainjobs")
INFERENCESERVICES = Resource(c.GROUP, c.VERSION, "inferenceservices")
QUANTIZEJOBS = Resource(c.GROUP, c.VERSION, "quantizejobs")
KOPF_PEERINGS = Resource("kopf.dev", "v1", "kopfpeerings")
CLUSTER_KOPF_PEERINGS = Resource("kopf.dev", "v1", "clusterkopfpeerings", namespaced=False)
NAMESPACES = Resource("", "v1", "namespaces", namespaced=False)

# (apiVersion, kind) -> resource: what `create`, `apply` and `replace_status` accept.
KINDS: dict[tuple[str, str], Resource] = {
    ("v1", "Pod"): PODS,
    ("v1", "Service"): SERVICES,
    ("v1", "ConfigMap"): CONFIG_MAPS,
    ("apps/v1", "Deployment"): DEPLOYMENTS,
    ("batch/v1", "Job"): JOBS,
    ("policy/v1", "PodDisruptionBudget"): POD_DISRUPTION_BUDGETS,
    (c.API_VERSION, "TrainJob"): TRAINJOBS,
    (c.API_VERSION, "InferenceService"): INFERENCESERVICES,
    (c.API_VERSION, "QuantizeJob"): QUANTIZEJOBS,
    ("kopf.dev/v1", "KopfPeering"): KOPF_PEERINGS,
    ("kopf.dev/v1", "ClusterKopfPeering"): CLUSTER_KOPF_PEERINGS,
}


def resource_of(obj: Mapping[str, Any]) -> Resource:
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    try:
        return KINDS[key]
    except KeyError:
        raise ValueError(f"no REST resource known for apiVersion={key[0]!r} kind={key[1]!r}") from None


def _object_path(obj: Mapping[str, Any], subresource: str | None = None) -> str:
    meta = obj["metadata"]
    return resource_of(obj).path(meta.get("namespace"), meta["name"], subresource)


class KubeApi:
    """One aiohttp session (opened on first use, in the running loop) against the API server
    described by `configuration` (the official client's `Configuration`, only read here)."""

    def __init__(self, configuration: Configuration, *, connections: int = 32, timeout: float = 60.0) -> None:
        self._config = configuration
        self._connections = connections
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_environment(cls, **kwargs: Any) -> KubeApi:
        """Credentials from the pod's service account, else the kubeconfig (KUBECONFIG as it is
        now, not when `kubernetes` was imported; else ~/.kube/config). Blocking (file reads, maybe
        an exec plugin): call it in a thread."""
        from kubernetes import config
        from kubernetes.client.configuration import Configuration

        configuration = Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration
            )
        return cls(configuration, **kwargs)

    # --- the calls ---------------------------------------------------------------------------------

    async def get(self, resource: Resource, namespace: str | None, name: str) -> Object | None:
        """The object, or None when it does not exist."""
        return await self._request("GET", resource.path(namespace, name), ok=(404,))

    async def list(self, resource: Resource, namespace: str | None = None, **params: str) -> Object | None:
        """The collection (`items`), with query `params` such as fieldSelector; None for 404."""
        return await self._request("GET", resource.path(namespace), None, ok=(404,), **params)

    async def merge_patch(
        self, resource: Resource, namespace: str | None, name: str, patch: Mapping[str, Any]
    ) -> Object | None:
        """JSON merge patch; None when the object is gone."""
        return await self._request(
            "PATCH", resource.path(namespace, name), patch, ok=(404,), content_type=MERGE_PATCH
        )

    async def create(self, obj: Mapping[str, Any]) -> Object | None:
        """POST to the object's collection: the created object, or None when one of that name
        already exists (409 AlreadyExists)."""
        meta = obj["metadata"]
        return await self._request("POST", resource_of(obj).path(meta.get("namespace")), obj, ok=(409,))

    async def apply(self, obj: Mapping[str, Any], field_manager: str) -> Object:
        """Server-side apply, forcing `field_manager`'s ownership of every field `obj` sets; creates
        the object when it is missing."""
        return await self._request(
            "PATCH",
            _object_path(obj),
            obj,
            content_type=APPLY_PATCH,
            fieldManager=field_manager,
            force="true",
        )

    async def replace_status(self, obj: Mapping[str, Any]) -> Object:
        """PUT of the status subresource with the object's resourceVersion: raises ApiError 409
        when anyone wrote the object since it was read, 404 when it is gone."""
        return await self._request("PUT", _object_path(obj, "status"), obj)

    async def scale(
        self, resource: Resource, namespace: str, name: str, replicas: int, field_manager: str
    ) -> Object:
        """Merge patch of the /scale subresource's spec.replicas."""
        return await self._request(
            "PATCH",
            resource.path(namespace, name, "scale"),
            {"spec": {"replicas": replicas}},
            content_type=MERGE_PATCH,
            fieldManager=field_manager,
        )

    async def delete(
        self, resource: Resource, namespace: str | None, name: str, *, grace_period_seconds: int | None = None
    ) -> None:
        """Delete one object (0 seconds grace: at once, e.g. a pod whose node is gone); a missing
        object counts as deleted."""
        params = {} if grace_period_seconds is None else {"gracePeriodSeconds": str(grace_period_seconds)}
        await self._request("DELETE", resource.path(namespace, name), None, ok=(404,), **params)

    async def delete_collection(self, resource: Resource, namespace: str, label_selector: str) -> None:
        """Delete every object of `resource` in `namespace` matching `label_selector` (one call)."""
        if not label_selector:
            raise ValueError("delete_collection needs a label selector (an empty one matches everything)")
        await self._request("DELETE", resource.path(namespace), ok=(404,), labelSelector=label_selector)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- plumbing ----------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        cfg = self._config
        if cfg.refresh_api_key_hook is not None:  # in-cluster / exec plugins: the token is renewed
            cfg.refresh_api_key_hook(cfg)
        token = cfg.get_api_key_with_prefix("authorization") or cfg.get_api_key_with_prefix("BearerToken")
        return {"Authorization": token} if token else {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            cfg = self._config
            connector = aiohttp.TCPConnector(limit=self._connections, ssl=self._ssl_context())
            self._session = aiohttp.ClientSession(
                base_url=cfg.host.rstrip("/") + "/",
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            )
        return self._session

    def _ssl_context(self) -> ssl.SSLContext | bool:
        cfg = self._config
        if not cfg.host.startswith("https:"):
            return False
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        if not cfg.verify_ssl:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        return context

    async def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        ok: tuple[int, ...] = (),
        content_type: str = "application/json",
        **params: str,
    ) -> Any:
        """One call: the decoded JSON answer; None for a status in `ok`; ApiError for any
        other status >= 300."""
        headers = self._headers()
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body), content_type
        async with self._http().request(
            method, path.lstrip("/"), data=data, params=params or None, headers=headers
        ) as response:
            text = await response.text()
            if response.status < 300:
                return json.loads(text) if text else None
            if response.status in ok:
                return None
            raise ApiError(response.status, response.reason or "", text)


@dataclass(slots=True, kw_only=True)
class ControllerRuntime:
    """Base of each controller's per-process state (kept in kopf's memo): the Kubernetes client,
    built on first use by `api_factory` (tests pass one that points at their server)."""

    api_factory: Callable[[], KubeApi] = KubeApi.from_environment
    # (namespace, name) of objects whose finalizer was released in a terminating namespace
    # (controllers/namespace_release.py): kopf no longer watches them, so their handlers stop here.
    released: set[tuple[str, str]] = field(default_factory=set)
    _api: KubeApi | None = field(default=None, repr=False)

    @property
    def api(self) -> KubeApi:
        if self._api is None:
            self._api = self.api_factory()
        return self._api

    async def connect(self) -> None:
        """Reads the credentials (file I/O, maybe an exec plugin) off the event loop, at start-up,
        before the first handler needs them."""
        await asyncio.to_thread(lambda: self.api)

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None
