"""With MONAI Label's authentication on, each corrected structure records who sent it.

The identity provider is a stand-in for Keycloak (not installable here): a real HTTP server on
127.0.0.1 that publishes the realm's public key, as Keycloak's realm endpoint does, and tokens
signed RS256 with the matching private key. MONAI Label itself checks the signatures and roles.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import numpy as np
import nibabel as nib
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.app.helpers import put_label, reference_label
from tests.server import copy_studies, start_citrusv_server

LIVER, SPLEEN = 5, 1  # labels.json
ANNOTATOR, USER = "monailabel-annotator", "monailabel-user"  # MONAI Label's default role names


@pytest.fixture(scope="module")
def realm():
    """(realm URL, sign(username, roles) -> bearer token)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    body = json.dumps({"realm": "citrus", "public_key": base64.b64encode(public).decode()}).encode()

    class Realm(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/realms/citrus" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body if self.path == "/realms/citrus" else b"{}")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Realm)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def sign(username: str, roles: list[str], valid_s: int = 3600) -> str:
        claims = {"preferred_username": username, "realm_access": {"roles": roles},
                  "exp": int(time.time()) + valid_s}
        return jwt.encode(claims, key, algorithm="RS256")

    yield f"http://127.0.0.1:{httpd.server_port}/realms/citrus", sign
    httpd.shutdown()


@pytest.fixture(scope="module")
def auth_server(realm, tmp_path_factory, tiny_model_dir, citrusv_sample_studies):
    root = tmp_path_factory.mktemp("auth_server")
    studies = copy_studies(root / "studies", citrusv_sample_studies)
    shutil.copytree(tiny_model_dir, root / "model")
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm[0]}
    with start_citrusv_server(studies, root / "model", env=env) as server:
        yield server


def test_each_corrected_structure_records_who_sent_it(auth_server, realm, tmp_path):
    sign = realm[1]
    ct = auth_server.studies / "chest_ct.nii.gz"
    liver = reference_label(tmp_path / "liver.nii.gz", LIVER, ct)
    spleen = reference_label(tmp_path / "spleen.nii.gz", SPLEEN, ct)
    final = auth_server.studies / "labels" / "final" / "chest_ct.nii.gz"

    r = put_label(auth_server, "chest_ct", liver, {"label_info": [{"name": "liver", "idx": 1}]})
    assert r.status_code == 401, r.text  # no token
    r = put_label(auth_server, "chest_ct", liver, {"label_info": [{"name": "liver", "idx": 1}]},
                  sign("dr.viewer", [USER]))
    assert r.status_code == 403, r.text  # may look, not correct
    assert not final.exists()

    # what the client says about the sender is not taken
    r = put_label(auth_server, "chest_ct", liver,
                  {"label_info": [{"name": "liver", "idx": 1, "user": "x"}], "user": "someone.else",
                   "claimed_by": "Dr. Claimed"},  # a name claimed without sign-in, dropped here
                  sign("dr.lee", [ANNOTATOR]))
    assert r.status_code == 200, r.text
    r = put_label(auth_server, "chest_ct", spleen, {"label_info": [{"name": "spleen", "idx": 1}]},
                  sign("dr.kim", [ANNOTATOR]))
    assert r.status_code == 200, r.text

    token = sign("dr.lee", [USER])
    objects = auth_server.get("/datastore/?output=all",
                              headers={"Authorization": f"Bearer {token}"}).json()["objects"]
    info = objects["chest_ct"]["labels"]["final"]["info"]
    assert {e["name"]: e["user"] for e in info["label_info"]} == {"liver": "dr.lee",
                                                                  "spleen": "dr.kim"}
    assert "user" not in info
    # the corrections kept as sent (labels/final/.history) name the same senders, and only them
    kept = sorted((final.parent / ".history" / "chest_ct").glob("*.json"))
    records = [json.loads(p.read_text()) for p in kept]
    assert [(r["user"], r["label_info"][0]["name"]) for r in records] == [
        ("dr.lee", "liver"), ("dr.kim", "spleen")]
    assert "someone.else" not in kept[0].read_text() and '"x"' not in kept[0].read_text()
    assert "Dr. Claimed" not in kept[0].read_text() + json.dumps(info)
    data = np.asarray(nib.load(final).dataobj)
    assert np.array_equal(data == 1, np.asarray(nib.load(liver).dataobj) > 0)
    assert np.array_equal(data == 2, np.asarray(nib.load(spleen).dataobj) > 0)


def test_forged_or_expired_tokens_are_refused(auth_server, realm, tmp_path):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = {"preferred_username": "mallory", "realm_access": {"roles": [ANNOTATOR]},
              "exp": int(time.time()) + 3600}
    forged = jwt.encode(claims, other, algorithm="RS256")  # not the realm's key
    unsigned = jwt.encode(claims, None, algorithm="none")
    expired = realm[1]("dr.lee", [ANNOTATOR], valid_s=-60)
    for token in (forged, unsigned, expired):
        r = auth_server.get("/datastore/?output=all", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, r.text
    good = realm[1]("dr.lee", [USER])
    assert auth_server.get("/datastore/?output=all",
                           headers={"Authorization": f"Bearer {good}"}).status_code == 200
