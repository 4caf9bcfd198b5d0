"""The ``skytls:`` endpoint: TLS both ways, every certificate checked against the cluster CA.

Twisted's own ``ssl:`` and ``tls:`` server strings cannot ask a client for a certificate, so
skyproto ships this endpoint plugin for its cluster ports (master and harbor links)::

    skytls:PORT[:interface=ADDR][:backlog=N][:dir=DIR]              listen
    skytls:HOST:PORT[:dir=DIR][:hostname=NAME][:timeout=S][:bindAddress=ADDR]   connect

``DIR`` is a TLS identity directory made by ``skyproto tls cert NAME --dir D`` (``D/NAME``:
``ca.pem``, ``node.crt``, ``node.key``; see :mod:`skyproto.tls`). Both sides present
``node.crt`` and accept only a peer whose certificate chains to a certificate in ``ca.pem``;
a client also checks that the server's certificate names ``HOST`` (or ``hostname=``).

Without ``dir=``, the endpoint uses this process's default identity,
:func:`set_default_identity` (``twistd skymaster|skynode --tls-dir DIR`` sets it). That is
what makes the address a node *advertises* work: it is ``skytls:HOST:PORT`` with no files in
it, and each peer that dials it presents its own certificate, not the advertiser's. The
default identity is read when a client endpoint connects (so a node that has none fails its
dial with a clear reason rather than at parse time); a server endpoint reads its identity
when it is parsed.

Closing: Twisted's TLS transport does not shut down on ``loseConnection`` while a producer
is registered (twisted#8992: "working as designed": a producer may still hold data), and
skyproto's framing registers a *streaming* producer only to hear about congestion. So a
``skytls:`` connection unregisters a streaming producer when it is told to close, and an
orderly close (``skyproto status``, a node stopping) completes as over ``tcp:``.

The plugin objects import nothing from pyOpenSSL until a ``skytls:`` string is parsed;
without it (``pip install 'skyproto[tls]'``) parsing raises :class:`TLSConfigurationError`.
Never imports the global reactor.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IProtocolFactory,
    IReactorCore,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import endpoints as _endpoints
from ..errors import ConfigurationError
from ..tls import Identity

__all__ = [
    "PREFIX",
    "LoadedIdentity",
    "SkyTLSClientEndpoint",
    "SkyTLSClientParser",
    "SkyTLSServerEndpoint",
    "SkyTLSServerParser",
    "TLSConfigurationError",
    "client_creator",
    "default_identity",
    "load_identity",
    "server_options",
    "set_default_identity",
]

PREFIX: Final = "skytls"

_SERVER_OPTIONS: Final = frozenset({"port", "interface", "backlog", "dir"})
_CLIENT_OPTIONS: Final = frozenset({"host", "port", "dir", "hostname", "timeout", "bindAddress"})

_log = Logger()

_PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class TLSConfigurationError(ConfigurationError, ValueError):
    """A ``skytls:`` string or identity that cannot work (a ValueError, as Twisted's
    endpoint parsers raise, so every caller's bad-endpoint handling reports it)."""


@attrs.define
class _Default:
    identity: Identity | None = None


#: this process's default identity (one per process, as Erlang's TLS distribution options)
_default = _Default()


def set_default_identity(directory: str | Path | None) -> Identity | None:
    """Make ``directory`` the identity of ``skytls:`` endpoints that give no ``dir=``
    (None: no default). It is checked now: :class:`TLSConfigurationError` if unusable."""
    if directory is None:
        _default.identity = None
        return None
    identity = Identity(Path(directory).expanduser())
    load_identity(identity)
    _default.identity = identity
    return identity


def default_identity() -> Identity | None:
    """The identity set by :func:`set_default_identity`, if any."""
    return _default.identity


@attrs.frozen
class LoadedIdentity:
    """An identity's files, read and checked: the CA certificates, this node's certificate
    and its private key (``cryptography`` objects)."""

    identity: Identity
    authorities: Sequence[x509.Certificate]
    certificate: x509.Certificate
    key: _PrivateKey


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigurationError(
            f"TLS identity {path.parent}: {path.name} is missing "
            "(make one with: skyproto tls cert NAME --dir DIR)") from None
    except OSError as e:
        raise TLSConfigurationError(f"cannot read {path}: {e.strerror}") from None


def load_identity(identity: Identity) -> LoadedIdentity:
    """Read and check an identity directory: ``ca.pem`` holds one or more certificates,
    ``node.key`` is an unencrypted private key and ``node.crt`` its certificate."""
    if not identity.directory.is_dir():
        raise TLSConfigurationError(f"TLS identity {identity.directory} is not a directory")
    ca_data, certificate_data, key_data = (
        _read(identity.ca), _read(identity.certificate), _read(identity.key))
    try:
        authorities = x509.load_pem_x509_certificates(ca_data)
    except ValueError:
        raise TLSConfigurationError(f"{identity.ca} holds no PEM certificate") from None
    try:
        certificate = x509.load_pem_x509_certificate(certificate_data)
    except ValueError:
        raise TLSConfigurationError(f"{identity.certificate} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise TLSConfigurationError(
            f"{identity.key} is not an unencrypted PEM private key") from None
    if not isinstance(key, _PrivateKey):
        raise TLSConfigurationError(f"{identity.key} holds an unsupported kind of key")
    if key.public_key() != certificate.public_key():
        raise TLSConfigurationError(f"{identity.key} is not the key of {identity.certificate}")
    return LoadedIdentity(identity, authorities, certificate, key)


def _require_pyopenssl(description: str) -> None:
    if not _endpoints.tls_available():  # looked up at each call (tests replace it)
        raise TLSConfigurationError(
            f"{description} needs pyOpenSSL and service_identity, which are not installed: "
            f"{_endpoints.TLS_INSTALL_HINT}")


def _openssl_parts(loaded: LoadedIdentity) -> tuple[Any, Any, Any]:
    """(PrivateCertificate, trust root, X509/PKey pair) for Twisted's TLS options."""
    from OpenSSL import crypto
    from twisted.internet import ssl

    untyped: Any = ssl  # Twisted's _sslverify has no annotations
    certificate = crypto.X509.from_cryptography(loaded.certificate)
    key = crypto.PKey.from_cryptography_key(loaded.key)
    private = untyped.PrivateCertificate.fromCertificateAndKeyPair(
        untyped.Certificate(certificate), untyped.KeyPair(key))
    trust = untyped.trustRootFromCertificates(
        [untyped.Certificate(crypto.X509.from_cryptography(ca)) for ca in loaded.authorities])
    return private, trust, (certificate, key)


def server_options(loaded: LoadedIdentity) -> Any:
    """Server-side TLS options: present the node certificate, require a client certificate
    that chains to the CA (TLS 1.2 at least, Twisted's default ciphers)."""
    from twisted.internet import ssl

    _, trust, (certificate, key) = _openssl_parts(loaded)
    # a trustRoot makes CertificateOptions verify the peer and require its certificate
    return ssl.CertificateOptions(privateKey=key, certificate=certificate, trustRoot=trust)


def client_creator(loaded: LoadedIdentity, hostname: str) -> Any:
    """Client-side TLS: check the server's certificate against the CA and ``hostname`` (a
    DNS name or an IP address), and present the node certificate."""
    from twisted.internet import ssl

    private, trust, _ = _openssl_parts(loaded)
    return ssl.optionsForClientTLS(hostname, trustRoot=trust, clientCertificate=private)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _options(args: tuple[object, ...], kwargs: dict[str, object], names: Sequence[str],
             allowed: frozenset[str], description: str) -> dict[str, str]:
    """Positional then keyword fields by name; unknown or repeated ones are errors."""
    if len(args) > len(names):
        raise TLSConfigurationError(f"{description}: too many positional fields")
    fields = {name: _text(value) for name, value in zip(names, args, strict=False)}
    for key, value in kwargs.items():
        if key not in allowed:
            raise TLSConfigurationError(
                f"{description}: unknown option {key!r} (known: {', '.join(sorted(allowed))})")
        if key in fields:
            raise TLSConfigurationError(f"{description}: {key} given twice")
        fields[key] = _text(value)
    return fields


def _number(fields: dict[str, str], key: str, description: str, default: int | None = None,
            low: int = 0, high: int = 0xFFFF) -> int:
    text = fields.get(key)
    if not text:
        if default is None:
            raise TLSConfigurationError(f"{description}: {key} is missing")
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise TLSConfigurationError(f"{description}: {key} must be {low}..{high}, not {text!r}")
    return int(text)


def _identity(fields: dict[str, str]) -> Identity | None:
    directory = fields.get("dir")
    return Identity(Path(directory).expanduser()) if directory else default_identity()


def _description(args: tuple[object, ...], kwargs: dict[str, object]) -> str:
    parts = [PREFIX, *(_text(a) for a in args), *(f"{k}={_text(v)}" for k, v in kwargs.items())]
    return ":".join(parts)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class SkyTLSServerParser:
    """``serverFromString(reactor, "skytls:PORT:interface=ADDR:dir=DIR")`` (a plugin object)."""

    prefix = PREFIX

    def parseStreamServer(self, reactor: IReactorCore, *args: object,
                          **kwargs: object) -> IStreamServerEndpoint:
        """``skytls:PORT[:interface=...][:dir=...]`` as a mutual-TLS server endpoint."""
        description = _description(args, kwargs)
        _require_pyopenssl(description)
        fields = _options(args, kwargs, ("port",), _SERVER_OPTIONS, description)
        port = _number(fields, "port", description)
        backlog = _number(fields, "backlog", description, default=50, low=1, high=1 << 16)
        identity = _identity(fields)
        if identity is None:
            raise TLSConfigurationError(
                f"{description} has no TLS identity: give dir=DIR (or twistd --tls-dir DIR)")
        return SkyTLSServerEndpoint(reactor, port, server_options(load_identity(identity)),
                                    backlog, fields.get("interface", ""))


def _tls_error(error: BaseException) -> str:
    """``certificate verify failed`` rather than ``[('SSL routines', '', '...')]``."""
    args = getattr(error, "args", ())
    found = args[0] if args and isinstance(args[0], list) else []
    reasons = [str(r[-1]) for r in found if isinstance(r, tuple) and r]
    return "; ".join(reasons) or str(error) or type(error).__name__


def _closing_tls_factory(creator: Any, is_client: bool, factory: IProtocolFactory) -> Any:
    """A TLSMemoryBIOFactory whose connections close on ``loseConnection`` even with a
    streaming producer registered (see the module docstring), and log why TLS failed."""
    return _closing_tls_factory_class()(creator, is_client, factory)


@functools.cache
def _closing_tls_factory_class() -> Any:
    """Made once, on first use: the module must import without pyOpenSSL."""
    from OpenSSL import SSL
    from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

    class ClosingTLSTransport(BufferingTLSTransport):
        _streaming_producer = False

        def registerProducer(self, producer: Any, streaming: bool) -> None:
            super().registerProducer(producer, streaming)  # type: ignore[no-untyped-call]
            self._streaming_producer = bool(streaming)

        def unregisterProducer(self) -> None:
            self._streaming_producer = False
            super().unregisterProducer()  # type: ignore[no-untyped-call]

        def loseConnection(self) -> None:
            super().loseConnection()
            if self._streaming_producer and self.disconnecting:
                self.unregisterProducer()  # lets the TLS shutdown begin

        def makeConnection(self, transport: Any) -> None:
            peer = transport.getPeer()
            self._peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
            super().makeConnection(transport)  # type: ignore[no-untyped-call]

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            # a TLS failure is kept in _reason and passed on in place of the TCP close
            actual = getattr(self, "_reason", None) or reason
            if isinstance(actual, Failure) and isinstance(actual.value, SSL.Error):
                _log.info("TLS with {peer} failed: {error}", peer=self._peer,
                          error=_tls_error(actual.value))
            super().connectionLost(reason)

    class ClosingTLSFactory(TLSMemoryBIOFactory):
        protocol = ClosingTLSTransport

    return ClosingTLSFactory


@implementer(IStreamServerEndpoint)
class SkyTLSServerEndpoint:
    """Listens on TCP (IPv6 if ``interface`` is an IPv6 address) and speaks TLS with
    ``options`` (see :func:`server_options`)."""

    def __init__(self, reactor: Any, port: int, options: Any, backlog: int = 50,
                 interface: str = "") -> None:
        self.reactor = reactor
        self.port = port
        self.options = options
        self.backlog = backlog
        self.interface = interface

    def listen(self, factory: IProtocolFactory) -> Deferred[Any]:
        """Listen on TCP and wrap each connection in TLS that requires a client certificate from the
        cluster CA."""
        from twisted.internet.abstract import isIPv6Address
        from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint

        inner: IStreamServerEndpoint = (
            TCP6ServerEndpoint if isIPv6Address(self.interface) else TCP4ServerEndpoint
        )(self.reactor, self.port, self.backlog, self.interface)
        listening: Deferred[Any] = inner.listen(
            _closing_tls_factory(self.options, False, factory))
        return listening


@implementer(IStreamClientEndpoint)
class SkyTLSClientEndpoint:
    """Dials ``host:port`` and speaks TLS with this process's (or the given) identity,
    read at each connect."""

    def __init__(self, reactor: Any, host: str, port: int, identity: Identity | None,
                 hostname: str | None = None, timeout: int = 30,
                 bind_address: str | None = None) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.identity = identity
        self.hostname = hostname or host
        self.timeout = timeout
        self.bind_address = bind_address

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        """Connect with TCP and TLS, presenting our certificate and accepting only the cluster CA's.
        """
        from twisted.internet.endpoints import HostnameEndpoint

        identity = self.identity or default_identity()
        if identity is None:
            return fail(TLSConfigurationError(
                f"{PREFIX}:{self.host}:{self.port}: this process has no TLS identity "
                "(give dir=DIR, or twistd --tls-dir DIR)"))
        try:
            creator = client_creator(load_identity(identity), self.hostname)
        except TLSConfigurationError as e:
            return fail(e)
        bind = None if self.bind_address is None else (self.bind_address, 0)
        inner = HostnameEndpoint(self.reactor, self.host.encode("idna"), self.port,
                                 self.timeout, bind)
        connecting: Deferred[Any] = inner.connect(_closing_tls_factory(creator, True, factory))
        return connecting.addCallback(lambda tls: tls.wrappedProtocol)


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class SkyTLSClientParser:
    """``clientFromString(reactor, "skytls:HOST:PORT[:dir=DIR]")`` (a plugin object)."""

    prefix = PREFIX

    def parseStreamClient(self, reactor: IReactorCore, *args: object,
                          **kwargs: object) -> SkyTLSClientEndpoint:
        """``skytls:HOST:PORT[:dir=...]`` as a mutual-TLS client endpoint."""
        description = _description(args, kwargs)
        _require_pyopenssl(description)
        fields = _options(args, kwargs, ("host", "port"), _CLIENT_OPTIONS, description)
        host = fields.get("host")
        if not host:
            raise TLSConfigurationError(f"{description}: host is missing")
        port = _number(fields, "port", description, low=1)
        timeout = _number(fields, "timeout", description, default=30, low=1, high=3600)
        identity = Identity(Path(fields["dir"]).expanduser()) if fields.get("dir") else None
        return SkyTLSClientEndpoint(reactor, host, port, identity, fields.get("hostname"),
                                    timeout, fields.get("bindAddress"))
