"""The module's client over https: the real server with MONAI Label's --ssl_certfile/--ssl_keyfile
and a certificate signed by a department CA made on the fly (tests/tls.py), as a hospital's IT
would set up the GPU workstation. The client trusts that CA when given its certificate (the
module's "CA certificate" field, `citrusv ask --ca-cert`, `history.py restore --ca-cert`), and
each way of getting https wrong gets its own sentence."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from CitrusVLib import CitrusVClient, CitrusVError

from tests.app.helpers import reference_label
from tests.server import private_citrusv_server, REPO
from tests.tls import make_certificates

SPLEEN = 1  # labels.json
CITRUSV = [sys.executable, "-c", "import sys; from citrusv.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def https_server(tmp_path_factory, tiny_model_dir, citrusv_sample_studies, certs):
    with private_citrusv_server(tmp_path_factory.mktemp("https_server"), tiny_model_dir,
                                citrusv_sample_studies, tls=(certs.cert, certs.key, certs.ca)) as server:
        yield server


def _sentence(client: CitrusVClient) -> str:
    with pytest.raises(CitrusVError) as caught:
        client.info()
    return str(caught.value)


def test_asks_and_corrections_go_over_https_with_the_department_ca(https_server, certs, tmp_path):
    assert https_server.url.startswith("https://127.0.0.1:")
    client = CitrusVClient(https_server.url, ca_certificate=certs.ca, read_timeout=300)
    assert client.info()["name"] == "Citrus-V"

    # `citrusv ask --server`: the headless twin of the module, same client
    png = tmp_path / "spleen.png"
    ask = [*CITRUSV, "ask", "--server", https_server.url, "--image", "chest_ct", "--slice", "40",
           "--prompt", "Segment the spleen.", "--png", str(png)]
    done = subprocess.run([*ask, "--ca-cert", str(certs.ca)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert png.stat().st_size > 0
    refused = subprocess.run(ask, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: This computer does not trust the certificate of "
                                     f"the server at {https_server.url}"), refused.stderr

    # a correction over https, kept as sent; the admin sends it again over https
    label = reference_label(tmp_path / "spleen.nii.gz", SPLEEN,
                            https_server.studies / "chest_ct.nii.gz")
    client.put_label("chest_ct", label, [{"name": "spleen", "idx": 1}],
                     prompt="Segment the spleen.")
    history = REPO / "monailabel_app" / "history.py"
    kept = (https_server.studies / "labels" / "final" / ".history" / "chest_ct")
    entry = sorted(p.name.split(".")[0] for p in kept.glob("*.json"))[0]
    restore = [sys.executable, str(history), "--datastore", str(https_server.studies), "restore",
               "chest_ct", entry, "--server", https_server.url]
    done = subprocess.run([*restore, "--ca-cert", str(certs.ca)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(f"Sent {entry} of chest_ct again"), (
        done.stdout + done.stderr)
    done = subprocess.run(restore, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "could not send the correction" in done.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr
    assert len(list(kept.glob("*.json"))) == 2  # the original and the one restore sent


def test_each_https_mistake_gets_its_sentence(https_server, certs, tmp_path):
    url = https_server.url
    port = url.rsplit(":", 1)[1]
    assert _sentence(CitrusVClient(url)) == (
        f"This computer does not trust the certificate of the server at {url}: choose the "
        "department's CA certificate (a .pem or .crt file from IT) in the Server section.")
    # the certificate names 127.0.0.1 only
    other = f"https://localhost:{port}"
    assert _sentence(CitrusVClient(other, ca_certificate=certs.ca)).startswith(
        f"The certificate of the server at {other} is for another name")
    plain = f"http://127.0.0.1:{port}"
    assert _sentence(CitrusVClient(plain)).startswith(
        f"The server at {plain} closed the connection without answering: if it uses https, "
        "change the URL to https://")
    missing = tmp_path / "no-such-ca.pem"
    assert _sentence(CitrusVClient(url, ca_certificate=missing)) == (
        f"The CA certificate file '{missing}' does not exist: choose the department's CA "
        "certificate (.pem or .crt), or leave the field empty.")
    # a CA that did not sign this server's certificate
    stranger = make_certificates(tmp_path / "other-ca")
    assert _sentence(CitrusVClient(url, ca_certificate=stranger.ca)).startswith(
        "This computer does not trust the certificate")


def _small_server(certs=None):
    """A stdlib HTTP(S) server on 127.0.0.1 in a thread (not MONAI Label: these cases fail in
    the handshake, before any request reaches an app)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    if certs is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.cert, certs.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_https_url_for_a_plain_http_server_says_so():
    server = _small_server()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        assert _sentence(CitrusVClient(url)) == (
            f"The server at {url} does not use https: change the URL to http://.")
    finally:
        server.shutdown()
        server.server_close()


def test_expired_certificate_says_so(tmp_path):
    certs = make_certificates(tmp_path, expired=True)
    server = _small_server(certs)
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        assert _sentence(CitrusVClient(url, ca_certificate=certs.ca)) == (
            f"The certificate of the server at {url} has expired: ask IT to renew it.")
    finally:
        server.shutdown()
        server.server_close()


def test_module_remembers_the_ca_certificate_and_passes_it_to_the_client():
    source = (Path(REPO) / "slicer_extension" / "CitrusV" / "CitrusV.py").read_text()
    assert "caCertificatePathLineEdit.currentPath" in source and "SETTINGS_CA" in source
    assert "CitrusVClient(url, token=token, ca_certificate=caCertificate)" in source
