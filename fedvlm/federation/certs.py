"""TLS certificates and SuperNode authentication keys for Flower's deployment engine.

Files written by :func:`make_certificates` (into ``out``):

============================  ================================================================
``ca.crt``                    the federation's certificate authority (public; every site gets it)
``ca.key``                    the CA's private key (stays with the coordinator, offline if possible)
``server.pem``                the SuperLink's TLS certificate, signed by the CA, with the SuperLink's
                              IP addresses and DNS names as subject alternative names
``server.key``                the SuperLink's TLS private key (stays on the SuperLink host)
``supernode-<i>.key``         a SuperNode's authentication private key (OpenSSH format, NIST P-384),
                              given to ``flower-supernode --auth-supernode-private-key``
``supernode-<i>.pub``         its public key (OpenSSH format), registered at the SuperLink with
                              ``flwr supernode register supernode-<i>.pub``
============================  ================================================================

:func:`make_supernode_key` writes one ``<name>.key``/``<name>.pub`` pair, so a hospital can make
its own and send only the public key to the coordinator. Private keys are written with mode 0600.
Nothing is overwritten: an existing file stops the call before anything is written.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedvlm.errors import ConfigError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
SUPERNODE_PREFIX = "supernode"
PRIVATE_KEY_SUFFIX = ".key"
PUBLIC_KEY_SUFFIX = ".pub"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
"""Subject alternative names of a SuperLink reached on this machine only (tests, a pilot)."""


@dataclass(frozen=True)
class SupernodeKey:
    """One SuperNode's authentication key pair (paths)."""

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class Certificates:
    """Paths of the files :func:`make_certificates` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    supernode_keys: list[SupernodeKey] = field(default_factory=list)


def make_certificates(
    out: Path, hosts: Sequence[str] = DEFAULT_HOSTS, num_supernodes: int = 0, valid_days: int = 365
) -> Certificates:
    """Make a CA, a SuperLink server certificate for ``hosts`` and ``num_supernodes`` node key pairs.

    Args:
        out: Folder to write into (created if missing).
        hosts: IP addresses and DNS names by which SuperNodes and ``flwr`` reach the SuperLink; the
            first one is also the certificate's common name. TLS fails for an address not listed.
        num_supernodes: How many SuperNode authentication key pairs to make
            (``supernode-0.key`` …); 0 when each hospital makes its own with :func:`make_supernode_key`.
        valid_days: Validity of the CA and the server certificate.

    Returns:
        The written paths.

    Raises:
        ConfigError: If ``hosts`` is empty or a file to write exists already.

    Example:
        >>> import tempfile
        >>> written = make_certificates(Path(tempfile.mkdtemp()), ["127.0.0.1", "superlink.example.org"], 1)
        >>> [p.name for p in (written.ca_cert, written.server_cert, written.supernode_keys[0].public_key)]
        ['ca.crt', 'server.pem', 'supernode-0.pub']
    """
    names = [host.strip() for host in hosts if host.strip()]
    if not names:
        raise ConfigError("certificates need at least one host name or IP address for the SuperLink")
    result = Certificates(
        ca_cert=out / CA_CERT,
        ca_key=out / CA_KEY,
        server_cert=out / SERVER_CERT,
        server_key=out / SERVER_KEY,
        supernode_keys=[_key_paths(out, f"{SUPERNODE_PREFIX}-{i}") for i in range(num_supernodes)],
    )
    _refuse_existing(
        [
            result.ca_cert,
            result.ca_key,
            result.server_cert,
            result.server_key,
            *(p for key in result.supernode_keys for p in (key.private_key, key.public_key)),
        ]
    )
    out.mkdir(parents=True, exist_ok=True)

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedvlm federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedvlm federation CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write_private(result.ca_key, _pem_private(ca_key))
    result.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(result.server_key, _pem_private(server_key))
    result.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    for key in result.supernode_keys:
        _write_supernode_key(key)
    return result


def make_supernode_key(out: Path, name: str) -> SupernodeKey:
    """Make one SuperNode authentication key pair, ``<name>.key`` and ``<name>.pub``, in ``out``.

    Flower 1.41 authenticates SuperNodes with NIST-curve EC keys in OpenSSH format: the private key
    stays at the hospital (``flower-supernode --auth-supernode-private-key``), the public key goes
    to the coordinator (``flwr supernode register <name>.pub``).

    Raises:
        ConfigError: If ``name`` is not a plain file name or a file to write exists already.
    """
    if not name or Path(name).name != name or name.startswith("."):
        raise ConfigError(f"SuperNode key name {name!r} must be a plain file name, e.g. 'hospital-a'")
    key = _key_paths(out, name)
    _refuse_existing([key.private_key, key.public_key])
    out.mkdir(parents=True, exist_ok=True)
    _write_supernode_key(key)
    return key


def _key_paths(out: Path, name: str) -> SupernodeKey:
    return SupernodeKey(out / f"{name}{PRIVATE_KEY_SUFFIX}", out / f"{name}{PUBLIC_KEY_SUFFIX}")


def _write_supernode_key(key: SupernodeKey) -> None:
    private = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        key.private_key,
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    key.public_key.write_bytes(public + b"\n")


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (created 0600, never world-readable)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _refuse_existing(paths: Sequence[Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)}: choose another --out or remove them")


__all__ = ["Certificates", "SupernodeKey", "make_certificates", "make_supernode_key"]
