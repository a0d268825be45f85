"""HTTP health probes of the components (stdlib only: no client library needed to tell if a
process is serving)."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request

from lmforge.devcluster.cluster.certs import Pki


def probe_context(pki: Pki) -> ssl.SSLContext:
    """Trusts our CA (the apiserver) and presents the admin cert. The controller manager and the
    scheduler serve self-signed certs, so for them hostname/CA checks are off: this only asks
    'are you up', it never sends secrets."""
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.client_cert("admin")), str(pki.client_key("admin")))
    return context


def insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def context_for(url: str, pki: Pki, verify_with_ca: bool) -> ssl.SSLContext | None:
    if not url.startswith("https://"):
        return None
    return probe_context(pki) if verify_with_ca else insecure_context()


def is_healthy(url: str, context: ssl.SSLContext | None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False
