"""One plain sentence for every way a call to the Citrus-V server can fail.

The widget shows ``str(error)`` in a message box; nothing here knows about Qt.
"""

from __future__ import annotations

import json
from typing import Any

import requests


class CitrusVError(Exception):
    """A server call failed; ``str(err)`` is the sentence to show the user."""

    def __init__(self, message: str, status: int | None = None, detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.detail = detail


class ImageReplacedError(CitrusVError):
    """The server's image under a volume's datastore id holds other content than when the volume
    was downloaded from it (maybe replaced on disk by another scan): nothing drawn on the
    volume may go to that id."""

    def __init__(self, image_id: str, name: str) -> None:
        super().__init__(
            f"The server's image '{image_id}' holds other content than when '{name}' was "
            "downloaded from it (another scan may have replaced it there), so the volume is no "
            "longer taken for it."
        )
        self.image_id = image_id


class CitrusVCancelled(CitrusVError):
    """The user pressed Cancel while a request was running."""

    def __init__(self) -> None:
        super().__init__("The request was cancelled.")


def server_detail(response: requests.Response) -> str | None:
    """The ``detail`` sentence of a MONAI Label / FastAPI error body, if there is one."""
    try:
        body: Any = response.json()
    except (ValueError, json.JSONDecodeError):
        text = (response.text or "").strip()
        return text.splitlines()[0][:300] if text else None
    if isinstance(body, dict):
        detail = body.get("detail", body.get("error", body.get("message")))
    else:
        detail = body
    if isinstance(detail, list):
        # FastAPI validation errors: [{"loc": [...], "msg": "...", ...}]
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", []) if x != "body")
                msg = item.get("msg", "")
                parts.append(f"{loc}: {msg}" if loc else str(msg))
            else:
                parts.append(str(item))
        detail = "; ".join(p for p in parts if p)
    if detail is None:
        return None
    return str(detail).strip() or None


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _unknown_task(status: int, detail: str | None, task: str) -> bool:
    text = (detail or "").lower()
    if "there is no model" in text:  # MONAI Label's own message for an unknown infer/train task
        return True
    return status == 404 and (not text or text == "not found" or task.lower() in text)


def error_for_response(response: requests.Response, task: str | None = None) -> CitrusVError:
    """Map an HTTP error response to a CitrusVError with one sentence."""
    status = response.status_code
    detail = server_detail(response)
    if status == 401 and (detail or "").startswith(("Sign-in refused", "Your sign-in has run")):
        message = _sentence(detail)  # POST /auth/token(/refresh): the server's sentence
    elif status in (401, 403):
        # MONAI Label: 401 "Could not validate credentials", 403 'Role "..." is required ...'
        said = f": {detail.rstrip('.')}" if detail else ""
        message = (
            f"The server refused the request (not authorised{said}): sign in again, or check "
            "the access token in the CitrusV settings."
        )
    elif task and _unknown_task(status, detail, task):
        message = (
            f"The server does not know the task '{task}': check the server URL and that it runs "
            "the Citrus-V app."
        )
    elif status == 404:
        message = (
            _sentence(detail)
            if detail
            else ("The server has no such resource: check the server URL and the image id.")
        )
    elif status == 413:
        message = (
            _sentence(detail)
            if detail
            else ("The image is too large for the server: send a smaller region or one slice.")
        )
    elif status == 507:
        message = (
            _sentence(detail)
            if detail
            else "The server's disk is full (HTTP 507): ask IT to free space, then try again."
        )
    elif status == 503 and (detail or "").startswith("The sign-in server"):
        message = _sentence(detail)  # the department's identity provider, not this server
    elif status == 503:
        message = "The server is not ready yet (HTTP 503)" + (
            f": {detail.rstrip('.')}." if detail else "; try again in a minute."
        )
    elif status == 400 and (detail or "").strip() == "There was an error parsing the body":
        # FastAPI's answer when reading the upload fails on the server before the app sees
        # it (a full disk answers 507 since the app's fix; this client sends well-formed
        # multipart, so the cause is on the server's side)
        message = (
            f"The server could not read the upload ('{detail.strip()}'); the server log says "
            "why. Send it again; if it fails again, ask IT to look at the server."
        )
    elif 400 <= status < 500:
        message = (
            _sentence(detail) if detail else f"The server rejected the request (HTTP {status})."
        )
    else:
        message = (
            f"The server failed while handling the request (HTTP {status}); see the server log"
            + (f": {detail.rstrip('.')}." if detail else ".")
        )
    return CitrusVError(message, status=status, detail=detail)


def _tls_sentence(text: str, url: str) -> str:
    """What went wrong in an https handshake, from OpenSSL's words in the exception."""
    lowered = text.lower()
    if "wrong_version_number" in lowered or "wrong version number" in lowered:
        return f"The server at {url} does not use https: change the URL to http://."
    if "certificate has expired" in lowered:
        return f"The certificate of the server at {url} has expired: ask IT to renew it."
    if "mismatch" in lowered or "doesn't match" in lowered or "not valid for" in lowered:
        return (
            f"The certificate of the server at {url} is for another name: use the address "
            "written in the certificate (ask IT which one), not an alias or an IP address."
        )
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        return (
            f"This computer does not trust the certificate of the server at {url}: choose the "
            "department's CA certificate (a .pem or .crt file from IT) in the Server section."
        )
    return f"Could not make a secure connection to {url}: check http:// versus https://."


def error_for_exception(exc: BaseException, url: str) -> CitrusVError:
    """Map a requests/network exception to a CitrusVError with one sentence."""
    if isinstance(exc, CitrusVError):
        return exc
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        message = f"The server at {url} did not answer in time: check the URL and the network."
    elif isinstance(exc, requests.exceptions.ReadTimeout):
        message = (
            f"The server at {url} took too long to answer: it may still be loading the model; "
            "try again or raise the timeout."
        )
    elif isinstance(exc, requests.exceptions.SSLError):
        message = _tls_sentence(str(exc), url)
    elif isinstance(exc, requests.exceptions.ConnectionError):
        if url.lower().startswith("http://") and "closed connection without response" in str(exc):
            message = (
                f"The server at {url} closed the connection without answering: if it uses "
                "https, change the URL to https://; otherwise check that it is running."
            )
        else:
            message = (
                f"Could not connect to the server at {url}: check that it is running and the URL."
            )
    elif isinstance(
        exc,
        (
            requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
        ),
    ):
        message = f"The server URL '{url}' is not valid: use a form like http://127.0.0.1:8000."
    else:
        message = f"The request to {url} failed: {exc}."
    return CitrusVError(message)
