"""Certificates (skyproto.tls, ``skyproto tls``), the ``skytls:`` endpoint, and TLS without
pyOpenSSL: one clear line, never a traceback."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from skyproto import cli, endpoints, tap
from skyproto import tls as certs
from skyproto.endpoints import (
    client_endpoint_for,
    listener_client_endpoint,
    require_tls,
    tls_available,
    uses_tls,
)
from skyproto.errors import ConfigurationError
from skyproto.node.node import Node
from skyproto.services.echo import Echo
from skyproto.transports import tls as skytls

from .cluster import SECRET

TIMEOUT = 10
INSTALL = "pip install 'skyproto[tls]'"


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@attrs.define
class Cluster:
    """A cluster CA in ``root`` and identities made with it (``root/NAME``)."""

    root: Path
    ca: certs.CertificateAuthority

    def identity(self, name: str, *sans: str) -> Path:
        node = certs.create_certificate(self.ca, name, sans)
        return certs.save_identity(self.root / name, self.ca, node).directory


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A temporary directory, removed afterwards whatever happened."""
    path = Path(tempfile.mkdtemp(prefix="skytls"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(workdir: Path) -> Cluster:
    ca = certs.create_ca()
    certs.save_ca(workdir / "cluster", ca)
    return Cluster(workdir / "cluster", ca)


@pytest.fixture(autouse=True)
def no_default_identity() -> Iterator[None]:
    """The process default identity is global: every test starts and ends without one."""
    skytls.set_default_identity(None)
    yield
    skytls.set_default_identity(None)


@pytest.fixture
def no_pyopenssl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate an installation without the ``tls`` extra."""
    monkeypatch.setattr(endpoints, "tls_available", lambda: False)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- certificates -----------------------------------------------------------------------


def test_ca_is_a_self_signed_p256_ca_that_signs_certificates_only() -> None:
    now = datetime.datetime(2030, 1, 2, tzinfo=datetime.UTC)
    ca = certs.create_ca("test CA", days=10, now=now)
    cert = ca.certificate
    cert.verify_directly_issued_by(cert)
    assert cert.subject == cert.issuer
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=10)


def test_node_certificate_names_serves_and_is_signed_by_the_ca() -> None:
    ca = certs.create_ca()
    node = certs.create_certificate(ca, "alpha", ["db1.example.com", "10.0.0.5", "alpha"])
    cert = node.certificate
    cert.verify_directly_issued_by(ca.certificate)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["alpha", "localhost", "db1.example.com"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.5")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert node.key.public_key() == cert.public_key()


def test_node_certificate_never_outlives_its_ca() -> None:
    ca = certs.create_ca(days=30)
    node = certs.create_certificate(ca, "alpha", days=365)
    assert node.certificate.not_valid_after_utc == ca.certificate.not_valid_after_utc


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "-x", "a b", "x" * 64, "a..b"])
def test_bad_certificate_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError, match="certificate name"):
        certs.check_name(name)


@pytest.mark.parametrize("san", ["a b", "http://x", "user@host", "", "bücher.example"])
def test_bad_sans_are_refused(san: str) -> None:
    with pytest.raises(ConfigurationError, match="--san"):
        certs.subject_alternative_names("alpha", [san])


def test_keys_are_0600_and_never_overwritten_without_force(workdir: Path) -> None:
    ca = certs.create_ca()
    certificate, key = certs.save_ca(workdir / "d", ca)
    assert mode(key) == 0o600
    assert mode(workdir / "d") == 0o700
    assert certs.load_ca(workdir / "d").certificate == ca.certificate
    with pytest.raises(ConfigurationError, match=r"ca\.pem already exists .*--force"):
        certs.save_ca(workdir / "d", certs.create_ca())
    assert certs.load_ca(workdir / "d").certificate == ca.certificate  # untouched
    other = certs.create_ca()
    certs.save_ca(workdir / "d", other, force=True)
    assert certs.load_ca(workdir / "d").certificate == other.certificate
    assert mode(key) == 0o600

    identity = certs.save_identity(workdir / "d" / "alpha", other,
                                   certs.create_certificate(other, "alpha"))
    assert mode(identity.key) == 0o600
    assert sorted(p.name for p in identity.directory.iterdir()) == ["ca.pem", "node.crt",
                                                                     "node.key"]
    assert identity.ca.read_bytes() == certificate.read_bytes()


def test_a_key_is_never_written_through_a_symbolic_link(workdir: Path) -> None:
    target = workdir / "elsewhere"
    target.write_text("precious")
    (workdir / "ca.key").symlink_to(target)
    with pytest.raises(ConfigurationError, match="already exists"):
        certs.write_new_file(workdir / "ca.key", b"secret", 0o600)
    assert target.read_text() == "precious"


def test_load_ca_says_what_is_wrong(workdir: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"no CA in .*skyproto tls ca --dir"):
        certs.load_ca(workdir)
    certs.save_ca(workdir, certs.create_ca())
    (workdir / "ca.key").unlink()
    certs.write_new_file(workdir / "ca.key", certs.private_key_pem(certs.new_private_key()),
                         0o600)
    with pytest.raises(ConfigurationError, match=r"ca\.key is not the key of"):
        certs.load_ca(workdir)


# --- skyproto tls ca / cert -------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_makes_a_ca_and_a_certificate_and_prints_the_endpoints(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = workdir / "tls"
    status, out, err = run_cli(capsys, "tls", "ca", "--dir", str(d))
    assert (status, err) == (0, "")
    assert "ca.key (mode 0600" in out
    assert mode(d / "ca.key") == 0o600

    status, out, err = run_cli(capsys, "tls", "cert", "alpha", "--dir", str(d),
                               "--san", "db1.example.com", "--san", "10.0.0.5")
    assert (status, err) == (0, "")
    home = d.resolve() / "alpha"
    assert mode(home / "node.key") == 0o600
    assert "valid for alpha, localhost, 127.0.0.1, db1.example.com, 10.0.0.5" in out
    assert f"listen:  skytls:PORT:interface=127.0.0.1:dir={home}" in out
    assert f"connect: skytls:HOST:PORT:dir={home}" in out
    assert f"--tls-dir {home}" in out
    assert (f"tls:HOST:PORT:trustRoots={home}:certificate={home}/node.crt:"
            f"privateKey={home}/node.key") in out
    x509.load_pem_x509_certificate((home / "node.crt").read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate((d / "ca.pem").read_bytes()))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tls", "cert", "alpha", "--dir", "{d}/none"], "no CA in"),
        (["tls", "cert", "a/b", "--dir", "{d}"], "certificate name 'a/b'"),
        (["tls", "cert", "alpha", "--dir", "{d}", "--san", "a b"], "--san 'a b'"),
        (["tls", "cert", "alpha", "--dir", "{d}", "--days", "0"], "--days must be"),
        (["tls", "cert", "beta", "--dir", "{d}"], "already exists (give --force"),
        (["tls", "ca", "--dir", "{d}"], "ca.pem already exists (give --force"),
    ],
)
def test_cli_mistakes_are_one_line_and_exit_1(
        workdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
        message: str) -> None:
    d = workdir / "tls"
    assert cli.main(["tls", "ca", "--dir", str(d)]) == 0
    assert cli.main(["tls", "cert", "beta", "--dir", str(d)]) == 0
    capsys.readouterr()
    status, out, err = run_cli(capsys, *(a.format(d=d) for a in argv))
    assert status == 1
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("skyproto: error: ")
    assert message in err


def test_cli_force_replaces_an_identity(workdir: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    d = workdir / "tls"
    assert cli.main(["tls", "ca", "--dir", str(d)]) == 0
    assert cli.main(["tls", "cert", "alpha", "--dir", str(d)]) == 0
    before = (d / "alpha" / "node.key").read_bytes()
    assert cli.main(["tls", "cert", "alpha", "--dir", str(d), "--force"]) == 0
    assert (d / "alpha" / "node.key").read_bytes() != before
    assert mode(d / "alpha" / "node.key") == 0o600
    capsys.readouterr()


# --- endpoint strings -------------------------------------------------------------------


def test_tls_kinds() -> None:
    assert uses_tls("ssl:2013:privateKey=k") and uses_tls("tls:h:1") and uses_tls("skytls:1")
    assert not uses_tls("tcp:1") and not uses_tls("unix:/s") and not uses_tls("loopback:x")


@pytest.mark.parametrize(
    ("listen", "host", "expected"),
    [
        (None, "127.0.0.1", "tcp:127.0.0.1:7001"),
        ("tcp:0:interface=127.0.0.1", "127.0.0.1", "tcp:127.0.0.1:7001"),
        ("ssl:0:privateKey=k.pem", "127.0.0.1", "ssl:127.0.0.1:7001"),
        ("tls:/etc/certs:port=0", "127.0.0.1", "ssl:127.0.0.1:7001"),
        ("skytls:0:interface=127.0.0.1:dir=/x", "127.0.0.1", "skytls:127.0.0.1:7001"),
        ("SKYTLS:0", "::1", "skytls:host=\\:\\:1:port=7001"),
        ("tcp6:0", "::1", "tcp:host=\\:\\:1:port=7001"),
    ],
)
def test_a_listener_is_described_in_the_scheme_it_listens_with(
        listen: str | None, host: str, expected: str) -> None:
    assert listener_client_endpoint(listen, host, 7001) == expected


class FakePort:
    def __init__(self, address: Any) -> None:
        self.address = address

    def getHost(self) -> Any:
        return self.address


def test_tap_logs_and_advertises_the_real_scheme() -> None:
    port: Any = FakePort(IPv4Address("TCP", "127.0.0.1", 2013))
    assert tap.describe_address(port, "ssl:2013:privateKey=k") == "ssl:127.0.0.1:2013"
    assert tap.describe_address(port, "skytls:2013:dir=d") == "skytls:127.0.0.1:2013"
    assert tap.describe_address(port) == "tcp:127.0.0.1:2013"
    everywhere: Any = FakePort(IPv6Address("TCP", "::", 7001))
    assert tap.advertised_address(everywhere, "skytls:7001:interface=\\:\\:").startswith(
        "skytls:")
    assert tap.advertised_address(everywhere, "skytls:7001").endswith(":7001")


@pytest.mark.parametrize(
    ("advertised", "expected"),
    [
        ("skytls:10.0.0.5:7001:dir=/etc/sky/alpha", "skytls:10.0.0.5:7001"),
        ("skytls:10.0.0.5:7001", "skytls:10.0.0.5:7001"),
        ("ssl:h:1:caCertsDir=/ca:privateKey=k:certKey=c", "ssl:h:1:caCertsDir=/ca"),
        ("tls:h:1:trustRoots=/ca:certificate=c:privateKey=k", "tls:h:1:trustRoots=/ca"),
        ("unix:/run/a.sock:mode=600:lockfile=1", "unix:/run/a.sock"),
        ("tcp:127.0.0.1:7001", "tcp:127.0.0.1:7001"),
    ],
)
def test_an_advertised_endpoint_never_names_our_own_key(advertised: str, expected: str) -> None:
    assert client_endpoint_for(advertised) == expected


# --- without pyOpenSSL ------------------------------------------------------------------


def test_a_missing_module_is_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tls_available()
    monkeypatch.setitem(sys.modules, "OpenSSL", None)  # makes "import OpenSSL" fail
    assert not tls_available()
    monkeypatch.undo()
    assert tls_available()
    monkeypatch.setitem(sys.modules, "service_identity", None)
    assert not tls_available()


@pytest.mark.usefixtures("no_pyopenssl")
def test_require_tls_names_the_option_and_the_extra() -> None:
    require_tls("--listen", "tcp:2013")  # nothing to say
    with pytest.raises(ConfigurationError) as info:
        require_tls("--master", "tls:example.com:2013")
    assert str(info.value) == (f"--master tls:example.com:2013 needs pyOpenSSL and "
                               f"service_identity, which are not installed: {INSTALL}")


def one_line_exit(capsys: pytest.CaptureFixture[str], make: Any, options: Any,
                  program: str) -> str:
    with pytest.raises(SystemExit) as info:
        make(options)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"{program}: error: ") and INSTALL in err
    assert "Traceback" not in err
    return err


@pytest.mark.usefixtures("no_pyopenssl")
def test_daemons_without_pyopenssl_exit_1_with_one_line(
        capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    secret = ["--secret-file", str(workdir / "cookie")]
    master = tap.MasterOptions()
    master.parseOptions(["--listen", "ssl:0:privateKey=k.pem", *secret])
    err = one_line_exit(capsys, tap.make_master_service, master, "skymaster")
    assert "--listen ssl:0:privateKey=k.pem needs pyOpenSSL" in err

    node = tap.NodeOptions()
    node.parseOptions(["--harbor", "1", "--master", "skytls:127.0.0.1:2013", *secret])
    err = one_line_exit(capsys, tap.make_node_service, node, "skynode")
    assert "--master skytls:127.0.0.1:2013 needs" in err

    node = tap.NodeOptions()
    node.parseOptions(["--harbor", "1", "--peer", "2=tls:h:1", *secret])
    assert "--peer tls:h:1 needs" in one_line_exit(capsys, tap.make_node_service, node,
                                                   "skynode")
    node = tap.NodeOptions()
    node.parseOptions(["--harbor", "1", "--tls-dir", str(workdir), *secret])
    assert "--tls-dir needs" in one_line_exit(capsys, tap.make_node_service, node, "skynode")
    assert not (workdir / "cookie").exists()  # stopped before anything else happened


def test_skytls_without_an_identity_is_one_line(capsys: pytest.CaptureFixture[str],
                                                workdir: Path) -> None:
    node = tap.NodeOptions()
    node.parseOptions(["--harbor", "1", "--master", "skytls:127.0.0.1:2013",
                       "--secret-file", str(workdir / "cookie")])
    with pytest.raises(SystemExit) as info:
        tap.make_node_service(node)
    assert info.value.code == 1
    assert capsys.readouterr().err == (
        "skynode: error: --master skytls:127.0.0.1:2013 has no TLS identity: give --tls-dir "
        "DIR (or dir=DIR in the endpoint)\n")


def test_a_bad_tls_dir_is_one_line(capsys: pytest.CaptureFixture[str], cluster: Cluster,
                                   workdir: Path) -> None:
    alpha = cluster.identity("alpha")
    (alpha / "node.crt").unlink()
    master = tap.MasterOptions()
    master.parseOptions(["--listen", "skytls:0:interface=127.0.0.1", "--tls-dir", str(alpha),
                         "--secret-file", str(workdir / "cookie")])
    with pytest.raises(SystemExit) as info:
        tap.make_master_service(master)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"skymaster: error: TLS identity {alpha}: node.crt is missing")


@pytest.mark.usefixtures("no_pyopenssl")
@pytest.mark.parametrize(("argv", "option"), [
    (["status", "--master", "skytls:127.0.0.1:2013"], "--master"),
    (["names", "--mapper", "ssl:127.0.0.1:4369"], "--mapper"),
])
def test_cli_without_pyopenssl_is_one_line(capsys: pytest.CaptureFixture[str],
                                           argv: list[str], option: str) -> None:
    status, out, err = run_cli(capsys, *argv)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"skyproto: error: {option} ")
    assert INSTALL in err


@pytest.mark.usefixtures("no_pyopenssl")
def test_library_without_pyopenssl_raises_configuration_error(cluster: Cluster) -> None:
    reactor = get_reactor()
    with pytest.raises(ConfigurationError, match=r"needs pyOpenSSL.*skyproto\[tls\]"):
        serverFromString(reactor, f"skytls:0:dir={cluster.identity('alpha')}")
    with pytest.raises(ConfigurationError, match=r"needs pyOpenSSL.*skyproto\[tls\]"):
        clientFromString(reactor, "skytls:127.0.0.1:1")
    node = Node(1, reactor, SECRET)
    with pytest.raises(ConfigurationError, match=r"bad listen endpoint .*skyproto\[tls\]"):
        node.listen("skytls:0:interface=127.0.0.1")


# --- the skytls: endpoint ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ("skytls:", "port is missing"),
        ("skytls:99999", "port must be"),
        ("skytls:0:bogus=1", "unknown option 'bogus'"),
        ("skytls:0:port=1", "port given twice"),
        ("skytls:0", "has no TLS identity"),
        ("skytls:0:dir=/nonexistent/x", "is not a directory"),
    ],
)
def test_bad_server_strings(description: str, message: str) -> None:
    with pytest.raises(skytls.TLSConfigurationError, match=message):
        serverFromString(get_reactor(), description)


def test_bad_identities_are_named(cluster: Cluster) -> None:
    alpha = cluster.identity("alpha")
    (alpha / "node.key").unlink()
    with pytest.raises(ConfigurationError, match=r"node\.key is missing"):
        skytls.set_default_identity(alpha)
    certs.write_new_file(alpha / "node.key", certs.private_key_pem(certs.new_private_key()),
                         0o600)
    with pytest.raises(ConfigurationError, match=r"node\.key is not the key of"):
        serverFromString(get_reactor(), f"skytls:0:dir={alpha}")
    (alpha / "ca.pem").write_text("nothing\n")
    with pytest.raises(ConfigurationError, match=r"ca\.pem holds no PEM certificate"):
        skytls.load_identity(certs.Identity(alpha))
    assert skytls.default_identity() is None


def test_client_strings_are_parsed_without_reading_files() -> None:
    endpoint = clientFromString(get_reactor(),
                                "skytls:host=db1:port=7001:hostname=alpha:timeout=5")
    assert isinstance(endpoint, skytls.SkyTLSClientEndpoint)
    assert (endpoint.host, endpoint.port, endpoint.hostname, endpoint.timeout) == (
        "db1", 7001, "alpha", 5)
    assert endpoint.identity is None  # the process default, read at connect time
    for bad, message in [("skytls:db1", "port is missing"), ("skytls::1", "host is missing"),
                         ("skytls:db1:1:privateKey=k", "unknown option")]:
        with pytest.raises(skytls.TLSConfigurationError, match=message):
            clientFromString(get_reactor(), bad)


class Recorder(Protocol):
    """Sends ``greeting``; keeps what arrives; ``lost`` fires with the reason."""

    def __init__(self, greeting: bytes = b"", echo: bool = False,
                 producer: bool = False) -> None:
        self.greeting = greeting
        self.echo = echo
        self.producer = producer
        self.received = b""
        self.got: Deferred[bytes] = Deferred()
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.producer:  # as skyproto's framing does: streaming, for congestion only
            self.transport.registerProducer(Idle(), True)  # type: ignore[attr-defined]
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)
        if not self.got.called:
            self.got.callback(self.received)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reason = reason
        self.lost.callback(None)


@implementer(IPushProducer)
class Idle:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def common_name(transport: Any) -> str:
    """The CN of the certificate the other end of a TLS ``transport`` presented."""
    subject = transport.getPeerCertificate().to_cryptography().subject
    return str(subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value)


async def listen(description: str, servers: list[Recorder]) -> Any:
    def build() -> Recorder:
        servers.append(Recorder(echo=True, producer=True))
        return servers[-1]

    return await serverFromString(get_reactor(), description).listen(
        Factory.forProtocol(build))


@pytest_twisted.ensureDeferred
async def test_both_sides_present_certificates_and_close_cleanly(cluster: Cluster) -> None:
    reactor = get_reactor()
    alpha, beta = cluster.identity("alpha"), cluster.identity("beta")
    servers: list[Recorder] = []
    port = await listen(f"skytls:0:interface=127.0.0.1:dir={alpha}", servers)
    try:
        skytls.set_default_identity(beta)  # what --tls-dir does: no dir= in the string
        client = Recorder(b"hello", producer=True)
        endpoint = clientFromString(reactor, f"skytls:127.0.0.1:{port.getHost().port}")
        await connectProtocol(endpoint, client).addTimeout(TIMEOUT, reactor)
        assert await client.got.addTimeout(TIMEOUT, reactor) == b"hello"
        assert client.transport is not None
        assert common_name(client.transport) == "alpha"
        assert common_name(servers[0].transport) == "beta"
        # Twisted's TLS waits for a registered producer before it shuts down; skytls:
        # closes anyway, so an orderly close (a node stopping) never hangs.
        client.transport.loseConnection()
        await client.lost.addTimeout(TIMEOUT, reactor)
        await servers[0].lost.addTimeout(TIMEOUT, reactor)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_certificate_from_another_ca_is_refused(cluster: Cluster, workdir: Path,
                                                        events: list[Any]) -> None:
    reactor = get_reactor()
    alpha = cluster.identity("alpha")
    other = certs.create_ca("another CA")
    rogue = certs.save_identity(workdir / "rogue", cluster.ca,  # trusts the cluster CA...
                                certs.create_certificate(other, "rogue"))  # ...not from it
    servers: list[Recorder] = []
    port = await listen(f"skytls:0:interface=127.0.0.1:dir={alpha}", servers)
    try:
        client = Recorder(b"let me in")
        endpoint = clientFromString(
            reactor, f"skytls:127.0.0.1:{port.getHost().port}:dir={rogue.directory}")
        await connectProtocol(endpoint, client).addTimeout(TIMEOUT, reactor)
        await client.lost.addTimeout(TIMEOUT, reactor)
        assert client.reason is not None
        assert "unknown ca" in client.reason.getErrorMessage()
        assert client.received == b""
        await servers[0].lost.addTimeout(TIMEOUT, reactor)
        assert servers[0].received == b""
        logged = [e for e in events if e.get("log_format", "").startswith("TLS with")]
        assert any(e["error"] == "certificate verify failed" for e in logged), logged
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_server_is_checked_against_the_host_name(cluster: Cluster) -> None:
    reactor = get_reactor()
    alpha, beta = cluster.identity("alpha"), cluster.identity("beta")
    servers: list[Recorder] = []
    port = await listen(f"skytls:0:interface=127.0.0.1:dir={alpha}", servers)
    try:
        where = f"skytls:127.0.0.1:{port.getHost().port}:dir={beta}"
        client = Recorder(b"x")
        await connectProtocol(clientFromString(reactor, f"{where}:hostname=alpha"),
                              client).addTimeout(TIMEOUT, reactor)
        assert await client.got.addTimeout(TIMEOUT, reactor) == b"x"
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost.addTimeout(TIMEOUT, reactor)

        wrong = Recorder(b"x")
        await connectProtocol(clientFromString(reactor, f"{where}:hostname=beta"),
                              wrong).addTimeout(TIMEOUT, reactor)
        await wrong.lost.addTimeout(TIMEOUT, reactor)
        assert wrong.received == b""
        assert wrong.reason is not None
        assert "DNSMismatch" in wrong.reason.getErrorMessage()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_dialing_without_an_identity_fails_with_a_reason() -> None:
    endpoint = clientFromString(get_reactor(), "skytls:127.0.0.1:1")
    with pytest.raises(skytls.TLSConfigurationError, match="this process has no TLS identity"):
        await endpoint.connect(Factory.forProtocol(Protocol))


@pytest_twisted.ensureDeferred
async def test_two_nodes_call_each_other_over_skytls(cluster: Cluster) -> None:
    reactor = get_reactor()
    alpha = Node(1, reactor, SECRET, default_timeout=TIMEOUT)
    beta = Node(2, reactor, SECRET, default_timeout=TIMEOUT)
    try:
        alpha.spawn(Echo())
        port: Any = await alpha.listen(
            f"skytls:0:interface=127.0.0.1:dir={cluster.identity('alpha')}")
        beta.add_peer(1, f"skytls:127.0.0.1:{port.getHost().port}:"
                         f"dir={cluster.identity('beta')}")
        assert await beta.call(0x01000002, "over tls") == "over tls"
    finally:
        await Deferred.fromCoroutine(stop_all(reactor, alpha, beta))


async def stop_all(reactor: Any, *nodes: Node) -> None:
    for node in nodes:
        await node.stop().addTimeout(TIMEOUT, reactor)


def test_plugin_module_imports_without_pyopenssl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twisted imports every plugin module while scanning: ours must not need pyOpenSSL."""
    import importlib

    for name in [m for m in sys.modules if m.startswith("twisted.plugins.skyproto_tls")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "OpenSSL", None)
    module = importlib.import_module("twisted.plugins.skyproto_tls")
    assert module.skytls_server.prefix == module.skytls_client.prefix == "skytls"
