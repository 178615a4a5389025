"""The server's certificate, read again when its files change, so that a renewed certificate
(cert-manager's, every 60 days or so; a Kubernetes Secret the kubelet swaps in place) is served
without a restart, as the keys file is read again (app/serving/access.py).

Each consumer (the HTTP server's SSL context, the gRPC server's credentials) holds a
``CertificateFiles`` of its own and asks ``renewed()``: at most once a second it looks at the
files' modification times, sizes and inodes, and when they changed it loads the new pair into a
scratch SSL context first. A pair that does not load (a certificate renewed before its key, a
file half-written) is refused with its reason in the log, once, and the certificate served
before stays: loaded straight into the live context, a key that does not match would leave it
with no certificate at all. The live SSL context takes the new pair for every handshake after;
connections already open keep theirs.

What changes take effect: the certificate and key, over HTTPS and gRPC; a client CA
(CNNSERVE_TLS_CLIENT_CA) over gRPC whole, over HTTPS only for the CAs it adds (an SSL context can
trust more, never less): removing a CA takes a restart.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings

log = logging.getLogger("cnnserve")

CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class Pair:
    """What a server presents and trusts, as read from the files."""

    certificate: bytes
    key: bytes
    client_ca: bytes | None


class CertificateFiles:
    def __init__(self, settings: Settings) -> None:
        if settings.tls_cert is None or settings.tls_key is None:
            raise ValueError("no TLS certificate configured")
        self.paths = [
            settings.tls_cert,
            settings.tls_key,
            *([settings.tls_client_ca] if settings.tls_client_ca else []),
        ]
        self.client_ca = settings.tls_client_ca is not None
        self.signature = self.stat()
        self.refusal: str | None = None  # the last one logged
        self.next_check = time.monotonic() + CHECK_SECONDS

    def stat(self) -> tuple[tuple[int, int, int], ...]:
        found = [os.stat(path) for path in self.paths]
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in found)

    def read(self) -> Pair:
        certificate, key, *client_ca = (Path(path).read_bytes() for path in self.paths)
        return Pair(certificate, key, client_ca[0] if client_ca else None)

    def renewed(self) -> Pair | None:
        """The new pair once the files changed and it loads, else None (checked at most once a
        second; a pair that does not load is logged once and not offered)."""
        now = time.monotonic()
        if now < self.next_check:
            return None
        self.next_check = now + CHECK_SECONDS
        try:
            signature = self.stat()
            if signature == self.signature:
                return None
            pair = self.read()
            check(self.paths[0], self.paths[1])
        except (OSError, ssl.SSLError) as error:
            if str(error) != self.refusal:
                self.refusal = str(error)
                log.error("TLS certificate files refused (%s); serving the certificate read before", error)
            return None
        self.signature, self.refusal = signature, None
        log.info("TLS certificate %s read again", self.paths[0])
        return pair


def check(certificate: Path, key: Path) -> None:
    """Raises ssl.SSLError (or OSError) unless the two load together."""
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certificate, key)


def reload_into(context: ssl.SSLContext, files: CertificateFiles) -> None:
    """The renewed pair into the live HTTPS context, if there is one. Called from the server's
    tick: an error here is logged, never raised into the server's loop (the files could change
    again between the check and the load)."""
    if files.renewed() is None:
        return
    try:
        context.load_cert_chain(files.paths[0], files.paths[1])
        if files.client_ca:
            context.load_verify_locations(files.paths[2])
    except (OSError, ssl.SSLError) as error:
        log.error("TLS certificate files changed while being loaded (%s); next check in a second", error)
        files.signature = ()
