"""`fedft certs`: a CA and a server certificate that really verify, with the right names."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading


def test_certificates_chain_to_the_ca_and_name_the_hosts(tmp_path, capsys):
    from cryptography import x509

    from simulations.cli import main

    assert main(["certs", "superlink.example.org", "127.0.0.1", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "flower-superlink --host 0.0.0.0 --port 8000 --enable-supernode-auth --ssl-ca-certfile" in out
    assert "--superlink superlink.example.org:8000 --root-certificates" in out
    ca = x509.load_pem_x509_certificate((tmp_path / "c" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "c" / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((tmp_path / "c" / key).stat().st_mode) == 0o600
    # the standard library's TLS stack accepts the pair and trusts the chain
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "c" / "server.crt", tmp_path / "c" / "server.key")
    client = ssl.create_default_context(cafile=str(tmp_path / "c" / "ca.crt"))
    assert client.cert_store_stats()["x509_ca"] == 1


def test_certs_refuse_to_overwrite_keys(tmp_path, capsys):
    from simulations.cli import main

    assert main(["certs", "localhost", "--out", str(tmp_path)]) == 0
    assert main(["certs", "localhost", "--out", str(tmp_path)]) == 2
    assert "refusing to overwrite keys" in capsys.readouterr().err


def test_a_tls_handshake_succeeds_with_the_ca_and_fails_without_it(tmp_path):
    from fedft.deploy.certs import make_certificates

    paths = make_certificates(tmp_path, ["127.0.0.1"])
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(paths["server.crt"], paths["server.key"])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(times: int) -> None:
        for _ in range(times):
            conn, _ = listener.accept()
            try:
                with server_context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, args=(2,), daemon=True)
    thread.start()
    trusted = ssl.create_default_context(cafile=str(paths["ca.crt"]))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with trusted.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            tls.sendall(b"x")
    untrusted = ssl.create_default_context()  # the system roots, not the fedft CA
    with socket.create_connection(("127.0.0.1", port)) as raw:
        try:
            untrusted.wrap_socket(raw, server_hostname="127.0.0.1")
            raise AssertionError("a client without the CA certificate connected")
        except ssl.SSLCertVerificationError:
            pass
    thread.join(timeout=5)
    listener.close()


def test_node_keys_are_what_flower_registers_and_loads(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    from fedft.deploy.certs import make_node_key

    private, public = make_node_key(tmp_path / "keys", "hospital-a")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_ssh_private_key(private.read_bytes(), None)  # as flower-supernode reads it
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(public)  # as `flwr supernode register` reads it (exits on a bad key)
    try:
        make_node_key(tmp_path / "keys", "hospital-a")
    except FileExistsError as err:
        assert "hospital-a" in str(err)
    else:
        raise AssertionError("an existing node key was overwritten")
