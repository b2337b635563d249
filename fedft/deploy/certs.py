"""``fedft certs``: a certificate authority and a SuperLink server certificate for TLS.

Writes, into one directory: ``ca.crt`` (the CA certificate: give it to every institution,
which passes it to ``flower-supernode --root-certificates``), ``ca.key`` (the CA's private
key: keep it offline at the coordinator), ``server.crt`` and ``server.key`` (the
SuperLink's certificate for the given host names / IP addresses, signed by the CA:
``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile
server.key``). Keys are EC P-256 (ECDSA), written with mode 0600; nothing here talks to the
network.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

SUPERLINK_PORT = 8000  # Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTPS port

FILES = {
    "ca.crt": "the CA certificate: copy to every institution (flower-supernode --root-certificates)",
    "ca.key": "the CA private key: keep it offline at the coordinator, never copy it",
    "server.crt": "the SuperLink certificate (flower-superlink --ssl-certfile)",
    "server.key": "the SuperLink private key (flower-superlink --ssl-keyfile); stays on the coordinator",
}


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedft"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alt_names(hosts: list[str]):
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def make_certificates(out_dir: Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """Create the CA and a server certificate valid for ``hosts``; return the written paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not hosts:
        raise ValueError("give at least one host name or IP address the SuperLink is reached at")
    out_dir = Path(out_dir)
    existing = [name for name in FILES if (out_dir / name).exists()]
    if existing:
        raise FileExistsError(f"{out_dir} already holds {existing}; refusing to overwrite keys")
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("fedft CA")).issuer_name(_name("fedft CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_subject_alt_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_format = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                      encryption_algorithm=serialization.NoEncryption())
    _write(out_dir / "ca.crt", ca_cert.public_bytes(pem), private=False)
    _write(out_dir / "ca.key", ca_key.private_bytes(**key_format), private=True)
    _write(out_dir / "server.crt", server_cert.public_bytes(pem), private=False)
    _write(out_dir / "server.key", server_key.private_bytes(**key_format), private=True)
    return {name: out_dir / name for name in FILES}


def explain(paths: dict[str, Path], hosts: list[str]) -> str:
    """Which file goes where, as the command prints it."""
    lines = [f"wrote a CA and a SuperLink certificate for {', '.join(hosts)}:"]
    lines += [f"  {paths[name]}  {what}" for name, what in FILES.items()]
    lines += ["coordinator:",
              f"  flower-superlink --host 0.0.0.0 --port {SUPERLINK_PORT} --enable-supernode-auth "
              f"--ssl-ca-certfile {paths['ca.crt']} --ssl-certfile {paths['server.crt']} "
              f"--ssl-keyfile {paths['server.key']}",
              "each institution (after copying ca.crt to it):",
              f"  flower-supernode --superlink {hosts[0]}:{SUPERLINK_PORT} --root-certificates ca.crt ..."]
    return "\n".join(lines)


def make_node_key(out_dir: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair: ``NAME`` (private, OpenSSH, 0600) and ``NAME.pub``.

    EC P-384 (a NIST curve, as Flower requires; the same as ``ssh-keygen -t ecdsa -b 384``).
    The institution keeps ``NAME`` (``flower-supernode --auth-supernode-private-key``) and
    sends ``NAME.pub`` to the coordinator, who registers it with ``flwr supernode register``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"node key name {name!r} must be a plain file name")
    out_dir = Path(out_dir)
    private, public = out_dir / name, out_dir / f"{name}.pub"
    existing = [str(p) for p in (private, public) if p.exists()]
    if existing:
        raise FileExistsError(f"{existing} already exist; refusing to overwrite a node key")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH) + b"\n", private=False)
    return private, public
