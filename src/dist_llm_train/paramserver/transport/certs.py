"""Certificates for the parameter server's gRPC TLS: one private CA, a server certificate, client certificates.

`write_certificates(out, hosts, clients)` writes PEM files an operator hands out:

    ca.pem                        the CA's certificate: clients verify the PS with it (DLT_PS_TLS_CA)
    ca.key                        the CA's key: keep it offline; it signs new certificates
    paramserver.pem / .key        the PS's certificate (subject alternative names: `hosts`) and key
    <client>.pem / <client>.key   one per client name, for mutual TLS (the PS's `tls_client_ca` = ca.pem)

ECDSA P-256 keys, SHA-256 signatures, validity `days`. Private keys are written with mode 0600. This is
the `cryptography` package's documented recipe (x509.CertificateBuilder); the project adds only the layout.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _signed(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
    *,
    ca: bool = False,
    hosts: list[str] | None = None,
    usage: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def write_certificates(out: Path, hosts: list[str], clients: list[str], days: int = 365) -> list[Path]:
    """Write a CA, the PS's certificate for `hosts` and one client certificate per name; returns the files."""
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or address")
    out.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dist-llm-train CA")])
    ca = _signed("dist-llm-train CA", ca_key, ca_name, ca_key, days, ca=True)
    written = [out / "ca.pem", out / "ca.key"]
    _write_cert(written[0], ca)
    _write_key(written[1], ca_key)
    leaves: list[tuple[str, list[str] | None, x509.ObjectIdentifier]] = [
        ("paramserver", hosts, ExtendedKeyUsageOID.SERVER_AUTH)
    ]
    leaves += [(name, None, ExtendedKeyUsageOID.CLIENT_AUTH) for name in clients]
    for name, leaf_hosts, usage in leaves:
        key = _key()
        cert = _signed(name, key, ca_name, ca_key, days, hosts=leaf_hosts, usage=[usage])
        _write_cert(out / f"{name}.pem", cert)
        _write_key(out / f"{name}.key", key)
        written += [out / f"{name}.pem", out / f"{name}.key"]
    return written
