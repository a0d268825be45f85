"""Pod spec -> what to exec (pure): argv, env, working directory and the mount map.

How a container becomes a local process (the image is ignored):
- env: envFrom, then env (later wins); values from `value` (with `$(VAR)` expansion), fieldRef
  (metadata.name/namespace/uid/labels/annotations, spec.nodeName/serviceAccountName,
  status.podIP/hostIP), configMapKeyRef, secretKeyRef, resourceFieldRef; then command + args
  with `$(VAR)` expanded, kubelet style (`$$` escapes).
- mounts: every container mountPath maps to a local directory (`mount_map`); occurrences of a
  mountPath in args and env values are rewritten to the local path, and the whole map is in
  env `LMFORGE_MOUNT_MAP` (JSON) for code that builds paths itself.
- networking: `0.0.0.0` in args becomes the pod IP (each pod owns a 127.x loopback address, so
  two pods can use the same port); cluster DNS names with a dot (`<host>.<subdomain>`,
  `<svc>.<ns>[.svc[.cluster.local]]`) in args and env values become IPs (`dns`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

MOUNT_MAP_ENV = "LMFORGE_MOUNT_MAP"
ANY_ADDRESS = "0.0.0.0"
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class SpecError(ValueError):
    """The container cannot run here (reason, message), e.g. a missing ConfigMap key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PodContext:
    """Everything outside the container spec that its env and args depend on."""

    pod: Mapping[str, Any]
    pod_ip: str
    host_ip: str = "127.0.0.1"
    config_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # name -> data
    secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # name -> decoded data
    mount_map: Mapping[str, str] = field(default_factory=dict)  # container mountPath -> local path
    dns: Mapping[str, str] = field(default_factory=dict)  # cluster DNS name -> IP
    base_env: Mapping[str, str] = field(default_factory=dict)  # PATH, HOME, ... (pod env wins)


@dataclass(frozen=True)
class ProcessSpec:
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str | None  # None: the caller's per-pod work dir


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables are replaced, `$$` is `$`, the rest stays."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR.sub(replace, text)


def field_ref(pod: Mapping[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", "default"),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return simple[path]
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    match = _FIELD_KEY.match(path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    raise SpecError("CreateContainerConfigError", f"unsupported fieldRef {path!r}")


def _resource(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    section, _, name = ref.get("resource", "").partition(".")
    value = str(((container.get("resources") or {}).get(section) or {}).get(name, "0"))
    if name == "cpu":
        return str(max(1, math.ceil(cpu_cores(value))))
    return value


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _key_ref(kind: str, sources: Mapping[str, Mapping[str, str]], ref: Mapping[str, Any]) -> str | None:
    data = sources.get(ref.get("name", ""))
    if data is None or ref.get("key") not in data:
        if ref.get("optional"):
            return None
        what = f"{kind} {ref.get('name')!r}" + ("" if data is None else f" key {ref.get('key')!r}")
        raise SpecError("CreateContainerConfigError", f"{what} not found")
    return data[ref["key"]]


def container_env(container: Mapping[str, Any], ctx: PodContext) -> dict[str, str]:
    """The container's own variables, in kubelet order (envFrom, then env with expansion)."""
    env = _env_from(container, ctx)
    for var in container.get("env") or ():
        name, source = var["name"], var.get("valueFrom")
        if source is None:
            env[name] = expand(var.get("value", ""), {**ctx.base_env, **env})
            continue
        value = _value_from(name, source, container, ctx)
        if value is not None:
            env[name] = value
    return env


def _env_from(container: Mapping[str, Any], ctx: PodContext) -> dict[str, str]:
    """envFrom: every key of the referenced configMaps and secrets (a missing optional one adds none)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or ():
        prefix = source.get("prefix", "")
        for kind, sources, key in (
            ("configMap", ctx.config_maps, "configMapRef"),
            ("secret", ctx.secrets, "secretRef"),
        ):
            ref = source.get(key)
            if ref is None:
                continue
            data = sources.get(ref.get("name", ""))
            if data is None:
                if ref.get("optional"):
                    continue
                raise SpecError("CreateContainerConfigError", f"{kind} {ref.get('name')!r} not found")
            env.update({prefix + k: v for k, v in data.items()})
    return env


def _value_from(
    name: str, source: Mapping[str, Any], container: Mapping[str, Any], ctx: PodContext
) -> str | None:
    """An env var's valueFrom; None for a missing optional key (the variable is then unset)."""
    if "fieldRef" in source:
        return field_ref(ctx.pod, source["fieldRef"]["fieldPath"], ctx.pod_ip, ctx.host_ip)
    if "configMapKeyRef" in source:
        return _key_ref("configMap", ctx.config_maps, source["configMapKeyRef"])
    if "secretKeyRef" in source:
        return _key_ref("secret", ctx.secrets, source["secretKeyRef"])
    if "resourceFieldRef" in source:
        return _resource(container, source["resourceFieldRef"])
    raise SpecError("CreateContainerConfigError", f"env {name}: unsupported valueFrom {sorted(source)}")


def _pattern(word: str, allow_slash_before: bool) -> re.Pattern:
    before = r"(?<![\w.-])" if allow_slash_before else r"(?<![\w./-])"
    return re.compile(before + re.escape(word) + r"(?![\w.-])")


def _literal(replacement: str) -> Callable[[re.Match[str]], str]:
    """A re.sub replacement that inserts `replacement` as it is (a string would expand backslashes)."""
    return lambda _match: replacement


def rewrite(text: str, mount_map: Mapping[str, str], dns: Mapping[str, str]) -> str:
    """Mount paths (longest first) to local paths, then cluster DNS names to IPs."""
    for mount_path in sorted(mount_map, key=len, reverse=True):
        if mount_map[mount_path] != mount_path:
            text = _pattern(mount_path.rstrip("/") or "/", False).sub(_literal(mount_map[mount_path]), text)
    for name in sorted(dns, key=len, reverse=True):
        if name in text:
            text = _pattern(name, True).sub(_literal(dns[name]), text)
    return text


def mentions(container: Mapping[str, Any], names: set[str]) -> set[str]:
    """Which of `names` the container's command, args or literal env values use."""
    words = [
        *(container.get("command") or ()),
        *(container.get("args") or ()),
        *(v.get("value", "") for v in container.get("env") or ()),
    ]
    return {n for n in names if any(_pattern(n, True).search(w) for w in words)}


def omp_threads(container: Mapping[str, Any]) -> str | None:
    """torch and BLAS use every core unless told: a cpu limit becomes OMP_NUM_THREADS."""
    limit = ((container.get("resources") or {}).get("limits") or {}).get("cpu")
    return str(max(1, math.ceil(cpu_cores(str(limit))))) if limit else None


def process_spec(container: Mapping[str, Any], ctx: PodContext) -> ProcessSpec:
    """The argv/env/cwd of `container` in pod `ctx.pod` (raises SpecError)."""
    argv = [*(container.get("command") or ()), *(container.get("args") or ())]
    if not container.get("command"):
        raise SpecError(
            "CreateContainerConfigError",
            f"container {container.get('name')!r} has no command: images are not run here, "
            "only commands (the process node ignores `image`)",
        )
    own = {k: rewrite(v, ctx.mount_map, ctx.dns) for k, v in container_env(container, ctx).items()}
    env = {**ctx.base_env, **own}
    if ctx.base_env.get("PATH") and "PATH" in own:  # the project's venv stays first
        env["PATH"] = ctx.base_env["PATH"].split(":", 1)[0] + ":" + own["PATH"]
    threads = omp_threads(container)
    if threads and "OMP_NUM_THREADS" not in own:
        env["OMP_NUM_THREADS"] = threads
    env[MOUNT_MAP_ENV] = json.dumps(dict(ctx.mount_map), sort_keys=True)
    argv = [rewrite(expand(a, env), ctx.mount_map, ctx.dns) for a in argv]
    argv = [
        ctx.pod_ip
        if a == ANY_ADDRESS
        else a.replace(f"={ANY_ADDRESS}", f"={ctx.pod_ip}").replace(f"{ANY_ADDRESS}:", f"{ctx.pod_ip}:")
        for a in argv
    ]
    cwd = container.get("workingDir")
    if cwd:
        cwd = rewrite(cwd, ctx.mount_map, {})
    return ProcessSpec(tuple(argv), env, cwd)


BIND_MOUNT_ROOTS = ("/run/", "/var/run/")  # runtime dirs: the only place an empty mount point is made


def bind_mountable(mount_map: Mapping[str, str]) -> dict[str, str]:
    """Mounts worth a real bind mount (as root): paths code may hard-code, such as the service
    account token dir /var/run/secrets/kubernetes.io/serviceaccount, under /run only."""
    return {m: p for m, p in mount_map.items() if m != p and m.startswith(BIND_MOUNT_ROOTS)}


def with_bind_mounts(argv: tuple[str, ...], binds: Mapping[str, str]) -> tuple[str, ...]:
    """argv run in a private mount namespace where each mountPath is bind-mounted from its local
    directory (needs root and util-linux `unshare`); a mount that fails is skipped."""
    if not binds:
        return argv
    script = "".join(
        f'mkdir -p "{m}" 2>/dev/null; mount --bind "{p}" "{m}" 2>/dev/null; '
        for m, p in sorted(binds.items())
    )
    return (
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        script + 'exec "$@"',
        "sh",
        *argv,
    )


def pod_dns_names(pod: Mapping[str, Any]) -> list[str]:
    """`<hostname>.<subdomain>` and its namespace-qualified forms (headless Service records)."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    hostname, subdomain = spec.get("hostname"), spec.get("subdomain")
    if not (hostname and subdomain):
        return []
    base, ns = f"{hostname}.{subdomain}", meta.get("namespace", "default")
    return [base, f"{base}.{ns}", f"{base}.{ns}.svc", f"{base}.{ns}.svc.cluster.local"]


def service_dns_names(name: str, namespace: str) -> list[str]:
    return [f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
