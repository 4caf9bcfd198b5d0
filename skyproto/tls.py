"""Cluster certificates: a CA and the node certificates it signs (``skyproto tls``).

Like ``consul tls ca create`` / ``consul tls cert create``: :func:`create_ca` makes a
cluster CA (an ECDSA P-256 key and a self-signed certificate), :func:`create_certificate`
a node certificate signed by it, for both TLS server and client use, with the node's name,
``localhost`` and ``127.0.0.1`` (and any extra names or addresses) as subject alternative
names. :func:`save_ca`, :func:`load_ca` and :func:`save_identity` keep them in files.

The layout on disk (one directory per cluster, one subdirectory per node)::

    DIR/ca.pem            the CA certificate
    DIR/ca.key            the CA private key (mode 0600): needed only to sign, keep it safe
    DIR/NAME/ca.pem       a copy of the CA certificate: the trust directory of NAME
    DIR/NAME/node.crt     NAME's certificate
    DIR/NAME/node.key     NAME's private key (mode 0600)

``DIR/NAME`` is a node's whole *TLS identity*: copy it to the node's host and give it as
``dir=`` of a ``skytls:`` endpoint or as ``--tls-dir`` (see
:mod:`skyproto.transports.tls`). Only the CA certificate ends in ``.pem``, so the
directory also works as Twisted's ``trustRoots=`` / ``caCertsDir=``.

Reactor-free; it uses only the ``cryptography`` package (no pyOpenSSL). Private keys are
written with ``os.open(O_CREAT | O_EXCL, 0o600)``: created with that mode, and never over
an existing file unless ``force`` is given (then the old file is removed first).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ConfigurationError

__all__ = [
    "CA_CERTIFICATE",
    "CA_KEY",
    "DEFAULT_CA_DAYS",
    "DEFAULT_CA_NAME",
    "DEFAULT_CERT_DAYS",
    "NODE_CERTIFICATE",
    "NODE_KEY",
    "CertificateAuthority",
    "Identity",
    "NodeCertificate",
    "certificate_pem",
    "check_name",
    "create_ca",
    "create_certificate",
    "load_ca",
    "new_private_key",
    "private_key_pem",
    "save_ca",
    "save_identity",
    "subject_alternative_names",
    "write_new_file",
]

#: file names, in the cluster directory and in each node's identity directory
CA_CERTIFICATE: Final = "ca.pem"
CA_KEY: Final = "ca.key"
NODE_CERTIFICATE: Final = "node.crt"
NODE_KEY: Final = "node.key"

DEFAULT_CA_NAME: Final = "skyproto cluster CA"
#: validity in days: five years for a CA, one year for a node certificate (as consul)
DEFAULT_CA_DAYS: Final = 1826
DEFAULT_CERT_DAYS: Final = 365
#: certificates start this long before "now", for hosts whose clocks lag a little
_BACKDATE: Final = datetime.timedelta(minutes=5)

#: a node name for a certificate: also a directory name and a DNS-style SAN
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@attrs.frozen
class CertificateAuthority:
    """A cluster CA: its self-signed certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@attrs.frozen
class NodeCertificate:
    """A node's certificate (signed by the cluster CA) and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@attrs.frozen
class Identity:
    """The files of one node's TLS identity directory (``DIR/NAME``)."""

    directory: Path

    @property
    def ca(self) -> Path:
        """The CA certificate that peers' certificates must chain to."""
        return self.directory / CA_CERTIFICATE

    @property
    def certificate(self) -> Path:
        """This node's certificate, presented to servers and to clients."""
        return self.directory / NODE_CERTIFICATE

    @property
    def key(self) -> Path:
        """This node's private key."""
        return self.directory / NODE_KEY


def check_name(name: str) -> str:
    """``name`` if it can name a node certificate, else :class:`ConfigurationError`.

    Letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most 63
    characters: it becomes a directory name and a DNS subject alternative name.
    """
    if not _NAME.fullmatch(name) or ".." in name:
        raise ConfigurationError(
            f"certificate name {name!r} must be 1 to 63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return name


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not value or len(value) > 253 or any(c.isspace() or c in "/:@" for c in value):
        raise ConfigurationError(f"--san {value!r} is neither a host name nor an IP address")
    try:
        value.encode("ascii")
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"--san {value!r}: give an internationalized name in its xn-- (IDNA) form"
        ) from None
    return x509.DNSName(value.lower())


def subject_alternative_names(name: str, extra: Iterable[str] = ()) -> list[x509.GeneralName]:
    """``name``, ``localhost``, ``127.0.0.1``, then ``extra``, without repeats, in order.

    A value that parses as an IP address becomes an IP SAN, anything else a DNS SAN.
    """
    check_name(name)
    names: list[x509.GeneralName] = []
    for value in (name, "localhost", "127.0.0.1", *extra):
        general = _general_name(value)
        if general not in names:
            names.append(general)
    return names


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (what every TLS stack, pyOpenSSL included, accepts)."""
    return ec.generate_private_key(ec.SECP256R1())


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now(datetime.UTC)


def create_ca(common_name: str = DEFAULT_CA_NAME, days: int = DEFAULT_CA_DAYS,
              now: datetime.datetime | None = None,
              key: ec.EllipticCurvePrivateKey | None = None) -> CertificateAuthority:
    """A new cluster CA, valid for ``days`` from ``now`` (may sign node certificates only:
    path length 0)."""
    if days <= 0:
        raise ConfigurationError(f"--days must be a positive number of days, not {days}")
    key = key or new_private_key()
    start = _now(now) - _BACKDATE
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(certificate, key)


def create_certificate(ca: CertificateAuthority, name: str, sans: Sequence[str] = (),
                       days: int = DEFAULT_CERT_DAYS, now: datetime.datetime | None = None,
                       key: ec.EllipticCurvePrivateKey | None = None) -> NodeCertificate:
    """A certificate for node ``name``, signed by ``ca``, for TLS servers and clients.

    Its subject alternative names are :func:`subject_alternative_names` of ``name`` and
    ``sans``; it is valid for ``days`` from ``now``, and never beyond the CA.
    """
    check_name(name)
    if days <= 0:
        raise ConfigurationError(f"--days must be a positive number of days, not {days}")
    key = key or new_private_key()
    start = _now(now) - _BACKDATE
    end = min(start + datetime.timedelta(days=days), ca.certificate.not_valid_after_utc)
    public = key.public_key()
    ca_public = ca.key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(subject_alternative_names(name, sans)),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public),
                       critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return NodeCertificate(certificate, key)


def certificate_pem(certificate: x509.Certificate) -> bytes:
    """The PEM form of ``certificate``."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The unencrypted PKCS#8 PEM form of ``key`` (protect the file by its mode)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_new_file(path: Path, data: bytes, mode: int, force: bool = False) -> None:
    """Write ``data`` to a file created now with ``mode`` (``O_EXCL``: never an existing
    file, nor through a symbolic link). With ``force``, an existing file is removed first;
    without it, an existing file is a :class:`ConfigurationError`."""
    if force and (path.exists() or path.is_symlink()):
        path.unlink()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     mode)
    except FileExistsError:
        raise ConfigurationError(f"{path} already exists (give --force to replace it)") from None
    except OSError as e:
        raise ConfigurationError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _check_absent(paths: Iterable[Path], force: bool) -> None:
    """Refuse before writing anything, so a refusal leaves no half-written set behind."""
    if force:
        return
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ConfigurationError(f"{path} already exists (give --force to replace it)")


def _make_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigurationError(f"cannot create directory {directory}: {e.strerror}") from None
    if not directory.is_dir():
        raise ConfigurationError(f"{directory} is not a directory")


def save_ca(directory: Path, ca: CertificateAuthority, force: bool = False) -> tuple[Path, Path]:
    """Write ``DIR/ca.pem`` and ``DIR/ca.key`` (mode 0600); return their paths."""
    _make_directory(directory)
    certificate, key = directory / CA_CERTIFICATE, directory / CA_KEY
    _check_absent((certificate, key), force)
    write_new_file(key, private_key_pem(ca.key), 0o600, force)
    write_new_file(certificate, certificate_pem(ca.certificate), 0o644, force)
    return certificate, key


def load_ca(directory: Path) -> CertificateAuthority:
    """The CA saved in ``directory`` by :func:`save_ca`."""
    certificate_path, key_path = directory / CA_CERTIFICATE, directory / CA_KEY
    try:
        certificate_data = certificate_path.read_bytes()
        key_data = key_path.read_bytes()
    except FileNotFoundError as e:
        raise ConfigurationError(
            f"no CA in {directory}: {e.filename} is missing "
            f"(make one with: skyproto tls ca --dir {directory})") from None
    except OSError as e:
        raise ConfigurationError(f"cannot read {e.filename}: {e.strerror}") from None
    try:
        certificate = x509.load_pem_x509_certificate(certificate_data)
    except ValueError:
        raise ConfigurationError(f"{certificate_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise ConfigurationError(
            f"{key_path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"{key_path} is not an ECDSA key")
    if key.public_key() != certificate.public_key():
        raise ConfigurationError(f"{key_path} is not the key of {certificate_path}")
    return CertificateAuthority(certificate, key)


def save_identity(directory: Path, ca: CertificateAuthority, node: NodeCertificate,
                  force: bool = False) -> Identity:
    """Write a node's identity directory: ``ca.pem``, ``node.crt``, ``node.key`` (0600)."""
    _make_directory(directory)
    identity = Identity(directory)
    _check_absent((identity.key, identity.certificate, identity.ca), force)
    write_new_file(identity.key, private_key_pem(node.key), 0o600, force)
    write_new_file(identity.certificate, certificate_pem(node.certificate), 0o644, force)
    write_new_file(identity.ca, certificate_pem(ca.certificate), 0o644, force)
    return identity
