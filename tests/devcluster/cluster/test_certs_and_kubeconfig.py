"""PKI (needs the openssl CLI, as `cluster up` does) and kubeconfig rendering."""

import base64
import shutil
import stat
import subprocess

import pytest
import yaml

from lmforge.devcluster.cluster.certs import IDENTITIES, ensure_pki, leaf_extensions, subject
from lmforge.devcluster.cluster.kubeconfig import render_kubeconfig, write_kubeconfig


def test_subject_puts_groups_before_the_user():
    assert subject("kubernetes-admin", ("system:masters",)) == "/O=system:masters/CN=kubernetes-admin"
    assert subject("system:kube-scheduler") == "/CN=system:kube-scheduler"


def test_leaf_extensions():
    server = leaf_extensions(server=True, sans=("DNS:localhost", "IP:127.0.0.1"))
    assert "extendedKeyUsage=serverAuth" in server
    assert "subjectAltName=DNS:localhost,IP:127.0.0.1" in server
    assert "subjectAltName" not in leaf_extensions(server=False)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_pki_certs_chain_to_the_ca_and_carry_rbac_identities(tmp_path):
    pki = ensure_pki(tmp_path / "pki")
    assert pki.complete()
    certs = [pki.apiserver_cert] + [pki.client_cert(i.name) for i in IDENTITIES]
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", pki.ca_cert, *certs], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    admin = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-in", pki.client_cert("admin")],
        capture_output=True,
        text=True,
    ).stdout
    assert "O = system:masters" in admin and "CN = kubernetes-admin" in admin
    san = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", pki.apiserver_cert],
        capture_output=True,
        text=True,
    ).stdout
    assert "IP Address:127.0.0.1" in san and "IP Address:10.96.0.1" in san
    before = pki.ca_cert.read_bytes()
    ensure_pki(tmp_path / "pki")  # idempotent: a restarted cluster keeps its CA
    assert pki.ca_cert.read_bytes() == before


def test_render_kubeconfig_embeds_credentials():
    config = render_kubeconfig("https://127.0.0.1:6443", b"CA", b"CERT", b"KEY")
    assert config["current-context"] == "lmforge"
    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"CA"
    user = config["users"][0]["user"]
    assert base64.b64decode(user["client-certificate-data"]) == b"CERT"
    assert base64.b64decode(user["client-key-data"]) == b"KEY"
    assert config["contexts"][0]["context"] == {"cluster": "lmforge", "user": "admin", "namespace": "default"}


def test_write_kubeconfig_is_private(tmp_path):
    path = write_kubeconfig(tmp_path / "sub" / "kubeconfig", render_kubeconfig("https://x", b"a", b"b", b"c"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert yaml.safe_load(path.read_text())["kind"] == "Config"
