"""The server's certificate, read again when its files change, so that a renewed certificate
(cert-manager's, every 60 days or so; a Kubernetes Secret the kubelet swaps in place) is served
without a restart, as the keys file is read again (app/serving/access.py).

Each consumer (HTTPS, gRPC) holds a ``CertificateFiles`` of its own and asks ``renewed()``: at
most once a second it looks at the files' modification times, sizes and inodes, and when they
changed it loads the new certificate, key and client CA into a scratch SSL context, and offers
them only if they load and the files did not change meanwhile. A set that does not load (a
certificate renewed before its key, a file half-written, a CA file with no certificate) is refused
with its reason in the log, once, and the certificate served before stays.

The live contexts are never changed in place: a key loaded into a context whose certificate it
does not match leaves it with no certificate at all. HTTPS switches each new handshake to the
newest context that loaded (``HttpsCertificates``, through the live context's SNI callback, which
OpenSSL calls for every handshake); gRPC takes a new certificate configuration before its next
handshake. Open connections keep what they were shown.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.config import Settings

log = logging.getLogger("cnnserve")

CHECK_SECONDS = 1.0
Signature = tuple[tuple[int, int, int], ...]


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
        self.certificate, self.key, self.client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
        self.signature = self.stat()
        self.refusal: str | None = None  # the last one logged
        self.next_check = time.monotonic() + CHECK_SECONDS

    def stat(self) -> Signature:
        paths = [self.certificate, self.key, *([self.client_ca] if self.client_ca else [])]
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in map(os.stat, paths))

    def read(self) -> Pair:
        client_ca = self.client_ca.read_bytes() if self.client_ca else None
        return Pair(self.certificate.read_bytes(), self.key.read_bytes(), client_ca)

    def load(self, context: ssl.SSLContext) -> None:
        """The files into ``context``; ssl.SSLError or OSError if they do not load together."""
        context.load_cert_chain(self.certificate, self.key)
        if self.client_ca:
            context.load_verify_locations(self.client_ca)

    def renewed(self) -> Pair | None:
        """The new set once the files changed and it loads, else None (checked at most once a
        second; a set that does not load is logged once and not offered)."""
        now = time.monotonic()
        if now < self.next_check:
            return None
        self.next_check = now + CHECK_SECONDS
        try:
            signature = self.stat()
            if signature == self.signature:
                return None
            pair = self.read()
            self.load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
            if self.stat() != signature:
                return None  # changing still: the next check takes what it settles on
        except (OSError, ssl.SSLError) as error:
            if str(error) != self.refusal:
                self.refusal = str(error)
                log.error("TLS certificate files refused (%s); serving the certificate read before", error)
            return None
        self.signature, self.refusal = signature, None
        log.info("TLS certificate %s read again", self.certificate)
        return pair


class HttpsCertificates:
    """The context each new HTTPS handshake gets: the one the server started with until the files
    change, then the newest that loaded, made as the server made the first (``make``)."""

    def __init__(self, files: CertificateFiles, make: Callable[[], ssl.SSLContext]) -> None:
        self.files = files
        self.make = make
        self.current: ssl.SSLContext | None = None

    def attach(self, live: ssl.SSLContext) -> None:
        live.sni_callback = self.select

    def select(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        if self.current is not None:
            connection.context = self.current

    def refresh(self) -> None:
        """Called from the server's tick: never raises into it."""
        if self.files.renewed() is None:
            return
        try:
            fresh = self.make()
        except (OSError, ssl.SSLError) as error:
            log.error("TLS certificate files changed while being loaded (%s); serving the one before", error)
            self.files.signature = ()  # look again at the next check
            return
        self.current = fresh
