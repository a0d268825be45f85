"""The cluster's PKI, made with the `openssl` CLI (present on every Debian/Ubuntu through
ca-certificates; the `cryptography` wheel is not among kopf's or kubernetes' dependencies).

One CA signs: the apiserver's serving cert, one client cert per identity (RBAC reads CN as the
user and O as the groups), and nothing else. The service-account token key pair is separate.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/12"
KUBERNETES_SERVICE_IP = "10.96.0.1"  # first address of the range: the `kubernetes` Service
DAYS = 3650


@dataclass(frozen=True)
class ClientIdentity:
    name: str  # file stem under pki/
    user: str  # certificate CN
    groups: tuple[str, ...] = ()  # certificate O fields


# The controller manager and scheduler get the identities the bootstrap RBAC roles are bound to;
# the admin (also used by kwok, which plays every kubelet) is in system:masters.
IDENTITIES = (
    ClientIdentity("admin", "kubernetes-admin", ("system:masters",)),
    ClientIdentity("kube-controller-manager", "system:kube-controller-manager"),
    ClientIdentity("kube-scheduler", "system:kube-scheduler"),
)

APISERVER_SANS = (
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
    "IP:127.0.0.1",
    f"IP:{KUBERNETES_SERVICE_IP}",
)


@dataclass(frozen=True)
class Pki:
    """Paths of every PEM file under `<state>/pki`."""

    directory: Path

    ca_cert = property(lambda self: self.directory / "ca.crt")
    ca_key = property(lambda self: self.directory / "ca.key")
    apiserver_cert = property(lambda self: self.directory / "apiserver.crt")
    apiserver_key = property(lambda self: self.directory / "apiserver.key")
    sa_key = property(lambda self: self.directory / "sa.key")
    sa_pub = property(lambda self: self.directory / "sa.pub")

    def client_cert(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    def client_key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def complete(self) -> bool:
        files = [self.ca_cert, self.apiserver_cert, self.sa_key, self.sa_pub]
        files += [self.client_cert(i.name) for i in IDENTITIES]
        return all(f.exists() for f in files)


class CertError(RuntimeError):
    """openssl missing or failing; the message carries its stderr."""


def subject(user: str, groups: tuple[str, ...] = ()) -> str:
    """openssl -subj syntax: '/O=system:masters/CN=kubernetes-admin'."""
    return "".join(f"/O={g}" for g in groups) + f"/CN={user}"


def leaf_extensions(server: bool, sans: tuple[str, ...] = ()) -> str:
    """The x509v3 extension section for a leaf certificate signed by the CA."""
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={'serverAuth' if server else 'clientAuth'}",
    ]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    return "\n".join(lines) + "\n"


def ensure_pki(directory: Path) -> Pki:
    """Create the PKI once per state dir; a restarted cluster keeps its certs (and kubeconfigs)."""
    pki = Pki(directory)
    if pki.complete():
        return pki
    openssl = shutil.which("openssl")
    if openssl is None:
        raise CertError(
            "step 'generate certificates' failed: the `openssl` command is missing (apt-get install openssl)."
        )
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    run = _runner(openssl)
    run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", pki.ca_key)
    run(
        "req",
        "-x509",
        "-new",
        "-key",
        pki.ca_key,
        "-subj",
        "/CN=lmforge-local-ca",
        "-days",
        DAYS,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,digitalSignature,keyCertSign,cRLSign",
        "-out",
        pki.ca_cert,
    )
    _issue(
        run,
        pki,
        pki.apiserver_key,
        pki.apiserver_cert,
        "/CN=kube-apiserver",
        leaf_extensions(server=True, sans=APISERVER_SANS),
    )
    for identity in IDENTITIES:
        _issue(
            run,
            pki,
            pki.client_key(identity.name),
            pki.client_cert(identity.name),
            subject(identity.user, identity.groups),
            leaf_extensions(server=False),
        )
    run("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", pki.sa_key)
    run("pkey", "-in", pki.sa_key, "-pubout", "-out", pki.sa_pub)
    return pki


def _issue(run, pki: Pki, key: Path, cert: Path, subj: str, extensions: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        csr, ext = Path(tmp) / "req.csr", Path(tmp) / "ext.cnf"
        ext.write_text(extensions)
        run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        run("req", "-new", "-key", key, "-subj", subj, "-out", csr)
        run(
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            pki.ca_cert,
            "-CAkey",
            pki.ca_key,
            "-set_serial",
            "0x" + secrets.token_hex(16),
            "-days",
            DAYS,
            "-sha256",
            "-extfile",
            ext,
            "-out",
            cert,
        )


def _runner(openssl: str):
    def run(*args: object) -> None:
        result = subprocess.run([openssl, *map(str, args)], capture_output=True, text=True)
        if result.returncode != 0:
            raise CertError(
                f"step 'generate certificates' failed: openssl {args[0]} exited "
                f"{result.returncode}:\n{result.stderr.strip()}"
            )

    return run
