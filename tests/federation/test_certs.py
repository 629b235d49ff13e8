"""Certificates and SuperNode keys: a real TLS handshake, the chain, SANs, Flower's own key loaders."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedvlm.cli import main
from fedvlm.errors import ConfigError
from fedvlm.federation.certs import make_certificates, make_supernode_key


def _handshake(certs_dir: Path, server_name: str) -> str:
    """Serve TLS with server.pem on 127.0.0.1 and connect verifying against ca.crt as ``server_name``."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certs_dir / "server.pem", certs_dir / "server.key")
    client_context = ssl.create_default_context(cafile=str(certs_dir / "ca.crt"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_context.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            answer = tls.recv(2).decode()
        thread.join(timeout=10)
    return answer


def test_server_certificate_verifies_for_its_hosts_only(tmp_path: Path) -> None:
    written = make_certificates(tmp_path, ["127.0.0.1", "localhost", "superlink.example.org"])
    ca = x509.load_pem_x509_certificate(written.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(written.server_cert.read_bytes())
    assert server.issuer == ca.subject
    ca_public = ca.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    ca_public.verify(
        server.signature,
        server.tbs_certificate_bytes,
        ec.ECDSA(server.signature_hash_algorithm),  # type: ignore[arg-type]
    )
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    assert _handshake(tmp_path, "127.0.0.1") == "ok"
    assert _handshake(tmp_path, "localhost") == "ok"
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path, "10.1.2.3")


def test_private_keys_are_owner_only_and_nothing_is_overwritten(tmp_path: Path) -> None:
    written = make_certificates(tmp_path, num_supernodes=2)
    for private in (written.ca_key, written.server_key, *(k.private_key for k in written.supernode_keys)):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    before = written.ca_cert.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        make_certificates(tmp_path)
    assert written.ca_cert.read_bytes() == before
    with pytest.raises(ConfigError, match="at least one host"):
        make_certificates(tmp_path / "other", hosts=[" "])


def test_supernode_keys_load_with_flowers_own_loaders(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    key = make_supernode_key(tmp_path, "hospital-a")
    assert (key.private_key.name, key.public_key.name) == ("hospital-a.key", "hospital-a.pub")
    private = load_ssh_private_key(key.private_key.read_bytes(), None)  # what flower-supernode does
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert try_load_public_key(key.public_key)  # what `flwr supernode register` does
    with pytest.raises(ConfigError, match="plain file name"):
        make_supernode_key(tmp_path, "../escape")


def test_cli_certs(tmp_path: Path) -> None:
    argv = ["certs", "--out", str(tmp_path / "c"), "--hosts", "127.0.0.1,superlink.local", "--supernodes", "1"]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "ca.crt", "ca.key", "server.key", "server.pem", "supernode-0.key", "supernode-0.pub",
    ]  # fmt: skip
    assert main(["certs", "--out", str(tmp_path / "site"), "--supernode-key", "hospital-b"]) == 0
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["hospital-b.key", "hospital-b.pub"]
    assert main(["certs", "--out", str(tmp_path / "c")]) == 2  # refuses to overwrite
