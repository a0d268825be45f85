"""Pod volumes as local directories under the pod's directory.

emptyDir -> <pod>/volumes/<name>; hostPath -> the path itself; configMap / secret / downwardAPI /
projected (service account token, CA, namespace) -> files written into <pod>/volumes/<name>;
persistentVolumeClaim -> <state>/pvc/<namespace>/<claim> (shared by every pod using the claim).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.devcluster.node.podspec import SpecError, field_ref

TOKEN_SECONDS = 3607


@dataclass(frozen=True)
class Sources:
    """Reads the agent does for volumes (None: not found)."""

    config_map: Callable[[str, str], Mapping[str, str] | None]  # (namespace, name) -> data
    secret: Callable[[str, str], Mapping[str, str] | None]  # (namespace, name) -> decoded data
    token: Callable[[Mapping[str, Any], str | None, int], str]  # (pod, audience, seconds) -> JWT


def decode_secret(secret: Mapping[str, Any]) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode(errors="replace") for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def _write(directory: Path, files: Mapping[str, str], mode: int | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for relative, content in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(content)
        if mode is not None:
            tmp.chmod(mode)
        tmp.replace(path)


def _keyed(kind: str, data: Mapping[str, str] | None, spec: Mapping[str, Any]) -> dict[str, str]:
    if data is None:
        if spec.get("optional"):
            return {}
        raise SpecError("FailedMount", f"{kind} {spec.get('name')!r} not found")
    items = spec.get("items")
    if not items:
        return dict(data)
    out = {}
    for item in items:
        if item["key"] not in data:
            if spec.get("optional"):
                continue
            raise SpecError("FailedMount", f"{kind} {spec.get('name')!r} has no key {item['key']!r}")
        out[item["path"]] = data[item["key"]]
    return out


def _downward(pod: Mapping[str, Any], items: list[Mapping[str, Any]], pod_ip: str) -> dict[str, str]:
    return {
        i["path"]: field_ref(pod, i["fieldRef"]["fieldPath"], pod_ip, "127.0.0.1")
        for i in items
        if "fieldRef" in i
    }


def _projected(
    projected: Mapping[str, Any], pod: Mapping[str, Any], namespace: str, sources: Sources, pod_ip: str
) -> dict[str, str]:
    """The files of a projected volume: service account tokens, configMap/secret keys, downward fields."""
    files: dict[str, str] = {}
    for source in projected.get("sources") or ():
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            files[token["path"]] = sources.token(
                pod, token.get("audience"), token.get("expirationSeconds", TOKEN_SECONDS)
            )
        elif "configMap" in source:
            config_map = source["configMap"]
            files.update(_keyed("configMap", sources.config_map(namespace, config_map["name"]), config_map))
        elif "secret" in source:
            secret = source["secret"]
            files.update(_keyed("secret", sources.secret(namespace, secret["name"]), secret))
        elif "downwardAPI" in source:
            files.update(_downward(pod, source["downwardAPI"].get("items") or [], pod_ip))
    return files


def materialise(
    pod: Mapping[str, Any], pod_dir: Path, pvc_root: Path, sources: Sources, pod_ip: str
) -> dict[str, Path]:
    """Volume name -> local directory (or file, for a hostPath file), written now."""
    namespace = pod["metadata"].get("namespace", "default")
    out: dict[str, Path] = {}
    for volume in (pod.get("spec") or {}).get("volumes") or ():
        name, local = volume["name"], pod_dir / "volumes" / volume["name"]
        if "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            out[name] = path
        elif "emptyDir" in volume:
            local.mkdir(parents=True, exist_ok=True)
            out[name] = local
        elif "persistentVolumeClaim" in volume:
            path = pvc_root / namespace / volume["persistentVolumeClaim"]["claimName"]
            path.mkdir(parents=True, exist_ok=True)
            out[name] = path
        elif "configMap" in volume:
            spec = volume["configMap"]
            _write(
                local,
                _keyed("configMap", sources.config_map(namespace, spec["name"]), spec),
                spec.get("defaultMode"),
            )
            out[name] = local
        elif "secret" in volume:
            spec = {**volume["secret"], "name": volume["secret"].get("secretName")}
            _write(
                local,
                _keyed("secret", sources.secret(namespace, spec["name"]), spec),
                spec.get("defaultMode"),
            )
            out[name] = local
        elif "downwardAPI" in volume:
            _write(local, _downward(pod, volume["downwardAPI"].get("items") or [], pod_ip), None)
            out[name] = local
        elif "projected" in volume:
            _write(local, _projected(volume["projected"], pod, namespace, sources, pod_ip), None)
            out[name] = local
        else:
            kinds = sorted(k for k in volume if k != "name")
            raise SpecError("FailedMount", f"volume {name!r}: unsupported type {kinds}")
    return out


def mount_map(container: Mapping[str, Any], volumes: Mapping[str, Path]) -> dict[str, str]:
    """Container mountPath -> local path (subPath applied)."""
    out = {}
    for mount in container.get("volumeMounts") or ():
        base = volumes.get(mount["name"])
        if base is None:
            raise SpecError("FailedMount", f"volumeMount {mount['name']!r} names no volume")
        local = base / mount["subPath"] if mount.get("subPath") else base
        out[mount["mountPath"].rstrip("/") or "/"] = os.fspath(local)
    return out
