"""With MONAI Label's authentication on, each corrected structure records who sent it.

The identity provider is a stand-in for Keycloak (not installable here): a real HTTP server on
127.0.0.1 that publishes the realm's public key and OpenID configuration, as Keycloak's realm
endpoints do, signs tokens RS256 with the matching private key, and answers sign-ins with a
password (Keycloak's password grant and its 401 "invalid_grant"). MONAI Label itself checks the
signatures and roles. Sign-ins are kept with Keycloak's refresh grant (a refresh token used
once, as Keycloak rotates them). The tests run in file order: the first finds the sign-in server
down.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import parse_qs

import jwt
import numpy as np
import nibabel as nib
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.app.helpers import put_label, reference_label, while_it_waits
from tests.server import copy_studies, start_citrusv_server
from tests.slicer.conftest import citrusv_module, mrml  # noqa: F401 (CitrusV.py on slicer-core)

LIVER, SPLEEN = 5, 1  # labels.json
ANNOTATOR, USER = "monailabel-annotator", "monailabel-user"  # MONAI Label's default role names


PASSWORDS = {"dr.lee": "right", "dr.slow": "right"}  # dr.slow's sign-in takes SLOW_S
SLOW_S = 3.0
TOKEN_PATH = "/realms/citrus/protocol/openid-connect/token"
REFUSED = ("Sign-in refused: the user name or password is wrong, or the account may not sign "
           "in this way (the sign-in server said: Invalid user credentials).")
SIGNED_OUT = ("Your sign-in has run out or was ended: sign in again with your user name and "
              "password (the sign-in server said: Token is not active).")


@pytest.fixture(scope="module")
def realm():
    """(realm URL, sign(username, roles) -> bearer token, state: {"down": True} makes every
    answer a 503 page, as a proxy in front of a stopped Keycloak gives; "refresh": the refresh
    tokens that hold, each to its user (cleared: every sign-in ended); "grants": the grant
    type of each token asked for)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    state = {"down": False, "refresh": {}, "grants": []}

    class Realm(BaseHTTPRequestHandler):
        def _answer(self, code: int, body, kind: str = "application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if state["down"]:
                return self._answer(503, b"<html>503 Service Unavailable</html>", "text/html")
            if self.path == "/realms/citrus":
                return self._answer(200, {"realm": "citrus",
                                          "public_key": base64.b64encode(public).decode()})
            if self.path == "/realms/citrus/.well-known/openid-configuration":
                return self._answer(200, {"token_endpoint": f"{url.rsplit('/realms', 1)[0]}"
                                                            f"{TOKEN_PATH}"})
            self._answer(404, {})

        def do_POST(self):  # noqa: N802
            form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
            if state["down"]:
                return self._answer(503, b"<html>503 Service Unavailable</html>", "text/html")
            grant = form.get("grant_type", [""])[0]
            if self.path != TOKEN_PATH or grant not in ("password", "refresh_token"):
                return self._answer(400, {"error": "unsupported_grant_type"})
            state["grants"].append(grant)
            if grant == "refresh_token":
                user = state["refresh"].pop(form.get("refresh_token", [""])[0], None)
                if user is None:  # Keycloak: ran out, used already, or the session ended
                    return self._answer(400, {"error": "invalid_grant",
                                              "error_description": "Token is not active"})
            else:
                user, password = form["username"][0], form.get("password", [""])[0]
                if user == "dr.slow":
                    time.sleep(SLOW_S)
                if PASSWORDS.get(user) != password:
                    return self._answer(401, {"error": "invalid_grant",
                                              "error_description": "Invalid user credentials"})
            refresh = secrets.token_urlsafe(16)
            state["refresh"][refresh] = user
            self._answer(200, {"access_token": sign(user, [ANNOTATOR, USER]),
                               "token_type": "Bearer", "expires_in": 300,
                               "refresh_token": refresh, "refresh_expires_in": 1800,
                               "id_token": "not passed on", "session_state": "x"})

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Realm)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_port}/realms/citrus"

    def sign(username: str, roles: list[str], valid_s: int = 3600) -> str:
        claims = {"preferred_username": username, "realm_access": {"roles": roles},
                  "exp": int(time.time()) + valid_s, "jti": secrets.token_hex(8)}
        return jwt.encode(claims, key, algorithm="RS256")

    yield url, sign, state
    httpd.shutdown()


@pytest.fixture(scope="module")
def auth_server(realm, tmp_path_factory, tiny_model_dir, citrusv_sample_studies):
    root = tmp_path_factory.mktemp("auth_server")
    studies = copy_studies(root / "studies", citrusv_sample_studies)
    shutil.copytree(tiny_model_dir, root / "model")
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm[0]}
    with start_citrusv_server(studies, root / "model", env=env) as server:
        yield server


def _sign_in(server, user: str, password: str):
    return server.post("/auth/token", data={"username": user, "password": password,
                                            "grant_type": "password"}, timeout=60)


def test_a_sign_in_server_that_is_down_is_a_503_that_names_it(auth_server, realm):
    """MONAI Label 0.8.5 answered 500 with a traceback to a sign-in, and to every request with
    a token (its key is fetched at the first), while the sign-in server was down. First in
    the file: the server has not fetched the realm's key yet."""
    url, sign, state = realm
    state["down"] = True
    try:
        r = _sign_in(auth_server, "dr.lee", "right")
        token_check = auth_server.get("/datastore/?output=all", headers={
            "Authorization": f"Bearer {sign('dr.lee', [ANNOTATOR])}"})
    finally:
        state["down"] = False
    assert r.status_code == 503, r.text
    assert r.json()["detail"].startswith(
        f"The sign-in server ({url}) could not be asked for its token address (HTTPError: 503 "
        "Server Error: Service Unavailable for url: "), r.text
    assert r.json()["detail"].endswith(
        "); ask IT to check it (MONAI_LABEL_AUTH_REALM_URI), then try again."), r.text
    assert token_check.status_code == 503, token_check.text
    assert token_check.json()["detail"].startswith(
        f"The sign-in server ({url}) could not be asked for its key, so no token can be "
        "checked (HTTPError: 503 "), token_check.text
    # back up: nothing of the outage was kept
    r = _sign_in(auth_server, "dr.lee", "right")
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    r = auth_server.get("/datastore/?output=all", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and "chest_ct" in r.json()["objects"], r.text


def test_a_wrong_password_is_a_401_and_a_slow_sign_in_holds_no_one_else(auth_server):
    r = _sign_in(auth_server, "dr.lee", "wrong")
    assert (r.status_code, r.json()) == (401, {"detail": REFUSED})
    # MONAI Label asked the sign-in server on the event loop: every request waited for it
    signed_in, other, took, still_signing_in = while_it_waits(
        lambda: _sign_in(auth_server, "dr.slow", "right"), lambda: auth_server.get("/auth/"))
    assert other.status_code == 200 and other.json()["enabled"] is True, other.text
    assert still_signing_in and took < SLOW_S / 2, took
    assert signed_in.status_code == 200 and signed_in.json()["token_type"] == "Bearer"


def test_a_sign_in_answers_a_refresh_token_that_gets_the_next_token(auth_server, realm):
    """MONAI Label 0.8.5 answered a sign-in with the access token alone (a client had to keep
    the password to sign in again after Keycloak's 5 minutes); now with the refresh token, and
    `POST /auth/token/refresh` turns it into the next token."""
    state = realm[2]
    r = _sign_in(auth_server, "dr.lee", "right")
    assert r.status_code == 200, r.text
    first = r.json()
    assert set(first) == {"access_token", "token_type", "expires_in", "refresh_token",
                          "refresh_expires_in"}, first  # not Keycloak's id_token, session_state
    assert (first["expires_in"], first["refresh_expires_in"]) == (300, 1800)
    r = auth_server.post("/auth/token/refresh", data={"refresh_token": first["refresh_token"]})
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["access_token"] != first["access_token"], second
    assert second["refresh_token"] != first["refresh_token"], second
    assert state["grants"][-2:] == ["password", "refresh_token"]
    r = auth_server.get("/datastore/?output=all",
                        headers={"Authorization": f"Bearer {second['access_token']}"})
    assert r.status_code == 200 and "chest_ct" in r.json()["objects"], r.text
    # used once already (Keycloak rotates them), ran out, or the sign-in was ended
    r = auth_server.post("/auth/token/refresh", data={"refresh_token": first["refresh_token"]})
    assert (r.status_code, r.json()) == (401, {"detail": SIGNED_OUT})
    r = auth_server.post("/auth/token/refresh", data={"refresh_token": " "})
    assert (r.status_code, r.json()) == (400, {"detail": (
        "Send the form field refresh_token: the one the sign-in (POST /auth/token) or the last "
        "refresh answered with.")})


def test_the_slicer_client_signs_in_and_refreshes_its_token_without_the_password(auth_server,
                                                                                 realm):
    """The module's client (`CitrusVLib`): sign in with a password (the module's Sign in row)
    instead of pasting a token; the password is not kept, and a token that ran out is replaced
    with the sign-in's refresh token; a sign-in that ended is said."""
    from CitrusVLib import CitrusVClient, CitrusVError

    sign, state = realm[1], realm[2]
    client = CitrusVClient(auth_server.url)
    with pytest.raises(CitrusVError) as refused:
        client.sign_in("dr.lee", "wrong")
    assert str(refused.value) == REFUSED
    assert client.signed_in_as is None
    assert client.sign_in("dr.lee", "right") == client.token and client.signed_in_as == "dr.lee"
    assert '"right"' not in json.dumps(vars(client), default=str)  # not kept
    assert "citrusv_segment" in client.info()["models"]
    asked = len(state["grants"])
    ran_out = sign("dr.lee", [USER], valid_s=-60)
    client.token = ran_out  # as the token is after Keycloak's few minutes
    assert "citrusv_segment" in client.info()["models"]
    assert client.token != ran_out and state["grants"][asked:] == ["refresh_token"]
    state["refresh"].clear()  # the sign-in ended at the identity provider (idle, signed out)
    client.token = ran_out
    with pytest.raises(CitrusVError) as ended:
        client.info()
    assert str(ended.value) == SIGNED_OUT
    assert client.signed_in_as is None
    # with no sign-in to repeat, the sentence says what to do
    with pytest.raises(CitrusVError) as stale:
        CitrusVClient(auth_server.url, token=ran_out).info()
    assert str(stale.value) == (
        "The server refused the request (not authorised: Could not validate credentials): "
        "sign in again, or check the access token in the CitrusV settings.")


def test_the_modules_server_line_says_when_the_sign_in_has_ended(
        auth_server, realm, citrusv_module, monkeypatch):  # noqa: F811 (the fixture imported above)
    """`CitrusVWidget._report`, its Qt parts stood in for: an error after which the client is no
    longer signed in replaces "Signed in as dr.lee." in the Server section."""
    from CitrusVLib import CitrusVClient, CitrusVError

    client = CitrusVClient(auth_server.url)
    client.sign_in("dr.lee", "right")
    realm[2]["refresh"].clear()
    client.token = realm[1]("dr.lee", [USER], valid_s=-60)
    with pytest.raises(CitrusVError) as ended:
        client.info()
    shown = []
    monkeypatch.setattr(citrusv_module.slicer.util, "errorDisplay",
                        lambda message, **kw: shown.append(message))
    ui = SimpleNamespace(serverStatusLabel=SimpleNamespace(text="Signed in as dr.lee."),
                         statusLabel=SimpleNamespace(text=""))
    citrusv_module.CitrusVWidget._report(SimpleNamespace(ui=ui, client=lambda: client),
                                         ended.value, "Run")
    assert ui.serverStatusLabel.text == citrusv_module.SIGNED_OUT
    assert ui.statusLabel.text == SIGNED_OUT and shown == [SIGNED_OUT]


def test_the_modules_sign_in_row_signs_in_and_forgets_the_typed_password(
        auth_server, citrusv_module):  # noqa: F811 (the fixture imported above)
    """The module's Sign in button (`CitrusVWidget.onSignIn`), its Qt parts stood in for and
    the server call made in place: a pasted token is dropped, the password field is emptied
    either way, a wrong password is the server's sentence in the status line."""
    from CitrusVLib import CitrusVClient

    client, reported = CitrusVClient(auth_server.url), []

    def widget(password: str) -> SimpleNamespace:
        ui = SimpleNamespace(userLineEdit=SimpleNamespace(text=" dr.lee "),
                             passwordLineEdit=SimpleNamespace(text=password),
                             tokenLineEdit=SimpleNamespace(text="a token pasted before"),
                             serverStatusLabel=SimpleNamespace(text="Not connected."))
        return SimpleNamespace(ui=ui, client=lambda: client, serverUrl=lambda: auth_server.url,
                               callServer=lambda _label, function, *args: function(*args),
                               _report=lambda e, what: reported.append((what, str(e))))

    wrong = widget("wrong")
    citrusv_module.CitrusVWidget.onSignIn(wrong)
    assert wrong.ui.serverStatusLabel.text == REFUSED and reported == [("Sign in", REFUSED)]
    assert (wrong.ui.passwordLineEdit.text, wrong.ui.tokenLineEdit.text) == ("", "")
    right = widget("right")
    citrusv_module.CitrusVWidget.onSignIn(right)
    assert right.ui.serverStatusLabel.text == "Signed in as dr.lee." and len(reported) == 1
    assert (right.ui.passwordLineEdit.text, right.ui.tokenLineEdit.text) == ("", "")
    assert client.signed_in_as == "dr.lee" and "citrusv_segment" in client.info()["models"]


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
