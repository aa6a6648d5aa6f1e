"""HTTP client for the Citrus-V MONAI Label app (docs/api.md).

One ``CitrusVClient`` per server URL. Every failure surfaces as ``CitrusVError`` whose
``str()`` is a sentence for the user. Safe to call from a worker thread (no Qt, no slicer).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .errors import CitrusVCancelled, CitrusVError, error_for_exception, error_for_response
from .label_io import LabelVolume, read_label_volume
from .multipart import parse_multipart
from .result import Result

TASK_PREFIX = "citrusv_"
INFER_TASKS = ("segment", "detect", "report", "closer_look")
TRAINER = "citrusv_finetune"
SIGN_IN_PATH = "/auth/token"
REFRESH_PATH = "/auth/token/refresh"
STRATEGY = "citrusv_uncertainty"


def task_name(task: str) -> str:
    """``segment`` → ``citrusv_segment``; full names pass through."""
    task = task.strip()
    return task if task.startswith(TASK_PREFIX) else TASK_PREFIX + task


SCOPES = ("slice", "range", "volume")


def infer_params(
    prompt: str | None,
    axis: str = "axial",
    scope: str = "slice",
    slice_index: int | None = None,
    slice_range: Sequence[int] | None = None,
    window: str | Sequence[float] | None = None,
    roi: Sequence[float] | Sequence[Sequence[float]] | None = None,
    label: str | None = None,
    is_2d: bool = False,
) -> dict[str, Any]:
    """The ``params`` of ``POST /infer`` (docs/api.md) from what the user chose in the widget.

    ``roi``: a closer look's box, or a list of boxes (one per part of a segment).
    ``is_2d``: the image is one plane (X-ray, picture): neither slice nor axis is sent.
    """
    params: dict[str, Any] = {} if is_2d else {"axis": axis}
    if prompt is not None and prompt.strip():
        params["prompt"] = prompt.strip()
    elif roi is None:
        raise CitrusVError("The question is empty: type what you want to know about the slice.")
    if is_2d:
        pass
    elif scope == "slice":
        if slice_index is None:
            raise CitrusVError("No slice is selected: show the volume in a slice view first.")
        params["slice"] = int(slice_index)
    elif scope == "range":
        if not slice_range or len(slice_range) != 2:
            raise CitrusVError("A slice range needs a first and a last slice.")
        first, last = sorted(int(v) for v in slice_range)
        params["slice"] = [first, last]
    elif scope == "volume":
        params["slice"] = "all"
    else:
        raise CitrusVError(f"scope must be one of {', '.join(SCOPES)}, not '{scope}'.")
    if window is not None and window != "":
        params["window"] = window if isinstance(window, str) else [float(v) for v in window]
    if roi is not None:
        boxes = list(roi)
        if boxes and all(isinstance(b, (list, tuple)) for b in boxes):
            params["roi"] = [[float(v) for v in b] for b in boxes]
        else:
            params["roi"] = [float(v) for v in boxes]
    if label:
        params["label"] = label
    return params


@dataclass
class InferResponse:
    """A parsed ``/infer`` answer: the result and, when the server sent one, the label file."""

    result: Result
    label_bytes: bytes | None = None
    label_filename: str | None = None

    def label_volume(self) -> LabelVolume | None:
        """The label file as ``[k, j, i]`` array + IJK-to-RAS (None when only JSON came back)."""
        if not self.label_bytes:
            return None
        return read_label_volume(self.label_bytes, self.label_filename)

    def save_label(self, directory: str) -> str | None:
        """Write the label file to ``directory`` under its server name; returns the path."""
        if not self.label_bytes:
            return None
        name = os.path.basename(self.label_filename or "label.nii.gz")
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(self.label_bytes)
        return path


@dataclass
class NextSample:
    """The image (and slice) the active-learning strategy wants annotated next."""

    image_id: str
    slice_index: int | None = None
    axis: str = "axial"
    raw: dict[str, Any] = field(default_factory=dict)


def _is_connection_reset(exc: BaseException) -> bool:
    """True for a dropped keep-alive connection (worth one retry), False for refused/timeout."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(
            e,
            (
                ConnectionResetError,
                ConnectionAbortedError,
                BrokenPipeError,
                http.client.RemoteDisconnected,
            ),
        ):
            return True
        if isinstance(e, ConnectionRefusedError):
            return False
        if isinstance(e, BaseException):
            stack.extend([e.__cause__, e.__context__, getattr(e, "reason", None)])
            stack.extend(a for a in e.args if isinstance(a, BaseException))
    return False


FileSpec = tuple[str, Callable[[], Any], str]  # field name -> (filename, opener, content type)


class _AbandonableAdapter(HTTPAdapter):
    """requests' adapter, keeping the connections of the requests in flight so that another
    thread can close them (`CitrusVClient.abandon`, Slicer's Cancel): the server then sees the
    client leave and stops a question over a slice range before its next slices, where before
    a cancelled question went on to its last slice."""

    def __init__(self) -> None:
        self._in_flight: weakref.WeakSet = weakref.WeakSet()  # urllib3 connections lent out
        self._guard = threading.Lock()
        super().__init__()

    def _tracked(self, base: type) -> type:
        adapter = self

        class Tracked(base):  # type: ignore[misc, valid-type]
            def _get_conn(self, timeout=None):
                conn = super()._get_conn(timeout)
                with adapter._guard:
                    adapter._in_flight.add(conn)
                return conn

            def _put_conn(self, conn):
                if conn is not None:  # None: the connection was closed and dropped
                    with adapter._guard:
                        adapter._in_flight.discard(conn)
                super()._put_conn(conn)

        return Tracked

    def _track(self, manager):
        manager.pool_classes_by_scheme = {"http": self._tracked(HTTPConnectionPool),
                                          "https": self._tracked(HTTPSConnectionPool)}
        return manager

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self._track(self.poolmanager)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        known = proxy in self.proxy_manager
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        return manager if known else self._track(manager)

    def close_in_flight(self) -> None:
        with self._guard:
            connections = list(self._in_flight)
        for conn in connections:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the waiting thread's read ends now
                except OSError:
                    pass


class CitrusVClient:
    """Talks to one MONAI Label server running the Citrus-V app."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
        session: requests.Session | None = None,
        ca_certificate: str | os.PathLike | None = None,
    ) -> None:
        """`ca_certificate`: a PEM file with the CA that signed an https server's certificate
        (a department's own CA); by default the system's and certifi's CAs are trusted."""
        self.url = url.strip().rstrip("/")
        if not self.url:
            raise CitrusVError("The server URL is empty: enter one like http://127.0.0.1:8000.")
        self.token = token
        self.ca_certificate = os.fspath(ca_certificate).strip() if ca_certificate else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.session = session or requests.Session()
        if session is None:
            adapter = _AbandonableAdapter()
            self.session.mount("http://", adapter)
            self.session.mount("https://", adapter)
        self._abandoned = 0  # how many times `abandon` was called
        # a sign-in's (`sign_in`): in memory only; the password is not kept
        self._signed_in_as: str | None = None
        self._refresh_token: str | None = None

    def abandon(self) -> None:
        """Close this client's requests in flight (from another thread: Slicer's Cancel). Each
        raises CitrusVCancelled in its own thread and is not sent again; the server, seeing the
        client leave, stops a question over a slice range before its next slices. Later
        requests open new connections."""
        self._abandoned += 1
        for adapter in {id(a): a for a in self.session.adapters.values()}.values():
            if isinstance(adapter, _AbandonableAdapter):
                adapter.close_in_flight()

    @property
    def signed_in_as(self) -> str | None:
        """The user name of a sign-in with a password (`sign_in`) that still holds, else None."""
        return self._signed_in_as

    # -- plumbing -----------------------------------------------------------------------
    def headers(self) -> dict[str, str]:
        if not self.token:
            return {}
        token = self.token.strip()
        return {"Authorization": token if " " in token else f"Bearer {token}"}

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        data: Mapping[str, str] | None = None,
        files: Mapping[str, FileSpec] | None = None,
        json_body: Any = None,
        task: str | None = None,
        read_timeout: float | None = None,
        ok: Sequence[int] = (200,),
    ) -> requests.Response:
        """One HTTP call with timeouts, auth and a single retry on a reset connection. Signed
        in with a password (`sign_in`), a 401 (the token ran out: Keycloak's last minutes)
        gets a new token with the sign-in's refresh token, once, and sends the request again;
        where the sign-in has run out too, the CitrusVError says to sign in again."""
        response = self._send(method, path, query, data, files, json_body, read_timeout)
        if (response.status_code == 401 and self._refresh_token
                and path not in (SIGN_IN_PATH, REFRESH_PATH)):
            self._take_token(self._sign_in_call(REFRESH_PATH,
                                                {"refresh_token": self._refresh_token}))
            response = self._send(method, path, query, data, files, json_body, read_timeout)
        if response.status_code not in ok:
            raise error_for_response(response, task)
        return response

    def sign_in(self, username: str, password: str) -> str:
        """``POST /auth/token``: sign in on a server with sign-in on (MONAI Label's, with the
        department's identity provider) and use the token it gives from now on. The password
        is not kept: the answer's refresh token (in memory) gets the next token when this one
        runs out (`POST /auth/token/refresh`), for as long as the identity provider keeps the
        sign-in (Keycloak's defaults: 30 minutes idle, 10 hours in all). Returns the token. A
        wrong password is a CitrusVError with the server's sentence."""
        username = (username or "").strip()
        if not username or not password:
            raise CitrusVError("Enter your user name and password to sign in.")
        token = self._take_token(self._sign_in_call(SIGN_IN_PATH, {"username": username,
                                                                   "password": password}))
        self._signed_in_as = username
        return token

    def _sign_in_call(self, path: str, fields: dict[str, str]) -> requests.Response:
        """A sign-in or refresh; refused, the sign-in held before is forgotten."""
        response = self._send("POST", path, None, fields, None, None, 60)
        if response.status_code != 200:
            self._signed_in_as = self._refresh_token = None
            raise error_for_response(response)
        return response

    def _take_token(self, response: requests.Response) -> str:
        answer = self._json(response)
        token = answer.get("access_token")
        if not token:
            raise CitrusVError("The server has sign-in switched off: no token is needed.")
        self.token = token
        # a server before 2026-12-07 answers no refresh token: when the token runs out, the
        # request's 401 says to sign in again
        self._refresh_token = answer.get("refresh_token") or None
        return token

    def _send(self, method, path, query, data, files, json_body, read_timeout):
        url = self.url + path
        timeout = (self.connect_timeout, read_timeout or self.read_timeout)
        if self.ca_certificate and not os.path.isfile(self.ca_certificate):
            raise CitrusVError(
                f"The CA certificate file '{self.ca_certificate}' does not exist: choose the "
                "department's CA certificate (.pem or .crt), or leave the field empty."
            )
        abandoned = self._abandoned
        for attempt in (1, 2):
            opened: list[Any] = []
            try:
                # form fields go as multipart parts (like MONAI Label's own client), never
                # url-encoded, so the server sees the same request with or without a file
                file_args: dict[str, Any] | None = None
                if data is not None or files:
                    file_args = {key: (None, value) for key, value in (data or {}).items()}
                    for key, (filename, opener, ctype) in (files or {}).items():
                        handle = opener()
                        opened.append(handle)
                        file_args[key] = (filename, handle, ctype)
                response = self.session.request(
                    method,
                    url,
                    params=query,
                    files=file_args,
                    json=json_body,
                    headers=self.headers(),
                    timeout=timeout,
                    # given per request: a session-wide setting loses to REQUESTS_CA_BUNDLE
                    verify=self.ca_certificate or True,
                )
            except requests.exceptions.RequestException as exc:
                if self._abandoned != abandoned:  # closed by `abandon`: not sent again
                    raise CitrusVCancelled() from exc
                if attempt == 1 and _is_connection_reset(exc):
                    time.sleep(0.2)
                    continue
                raise error_for_exception(exc, self.url) from exc
            finally:
                for handle in opened:
                    if hasattr(handle, "close"):
                        handle.close()
            return response
        raise CitrusVError(f"Could not reach the server at {self.url}.")  # pragma: no cover

    @staticmethod
    def _json(response: requests.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise CitrusVError(
                "The server answered with something that is not JSON; "
                "check that the URL points at the MONAI Label server."
            ) from exc

    @staticmethod
    def _file_spec(
        path: str | os.PathLike, content_type: str = "application/octet-stream"
    ) -> FileSpec:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CitrusVError(f"The file '{path}' does not exist.")
        return (os.path.basename(path), lambda: open(path, "rb"), content_type)

    # -- API ----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """``GET /info/``: app name, models, trainers, strategies, model versions."""
        return self._json(self.request("GET", "/info/", read_timeout=30))

    def infer(
        self,
        task: str,
        image_id: str,
        params: Mapping[str, Any] | None = None,
        file: str | os.PathLike | None = None,
        output: str | None = None,
    ) -> InferResponse:
        """``POST /infer/{task}?image=ID`` → parsed result (+ label file when one came back)."""
        name = task_name(task)
        query: dict[str, Any] = {"image": image_id}
        if output:
            query["output"] = output
        files = {"file": self._file_spec(file)} if file else None
        response = self.request(
            "POST",
            f"/infer/{quote(name, safe='')}",
            query=query,
            data={"params": json.dumps(dict(params or {}))},
            files=files,
            task=name,
        )
        return parse_infer_response(response.content, response.headers.get("content-type", ""))

    def upload_image(
        self,
        path: str | os.PathLike,
        image_id: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> str:
        """``PUT /datastore/image`` → the datastore id of the uploaded image."""
        query = {"image": image_id} if image_id else None
        response = self.request(
            "PUT",
            "/datastore/image",
            query=query,
            data={"params": json.dumps(dict(params or {}))},
            files={"file": self._file_spec(path)},
        )
        body = self._json(response)
        return str(body.get("image", image_id))

    def image_exists(self, image_id: str, read_timeout: float = 30) -> bool:
        """``HEAD /datastore/image``: whether the server already has this image id.

        A server on a PACS fetches a series it has not cached yet before it answers, so give a
        SeriesInstanceUID a longer ``read_timeout``.
        """
        response = self.request(
            "HEAD",
            "/datastore/image",
            query={"image": image_id},
            ok=(200, 404),
            read_timeout=read_timeout,
        )
        return response.status_code == 200

    def image_info(self, image_id: str) -> dict[str, Any]:
        """``GET /datastore/image/info``: the server's info on an image ({} if it has none). A
        Citrus-V server adds ``image_sha256``, a digest of the image's bytes (servers since
        2026-12-06), and ``image_stat``, which changes whenever the image's files are written."""
        body = self._json(self.request("GET", "/datastore/image/info", query={"image": image_id}))
        return body if isinstance(body, dict) else {}

    def image_stamp(self, image_id: str) -> str | None:
        """What tells whether the server's image still holds what it held: its
        ``image_sha256`` (the same bytes copied over it keep it), else, from a server that
        gives none, its ``image_stat``; None from a server that gives neither."""
        return image_stamp(self.image_info(image_id))

    def download_image(self, image_id: str, directory: str) -> str:
        """``GET /datastore/image`` to ``directory``; returns the written path."""
        response = self.request("GET", "/datastore/image", query={"image": image_id})
        name = _filename_from_disposition(response.headers.get("content-disposition", ""))
        path = os.path.join(directory, name or f"{image_id}.nii.gz")
        with open(path, "wb") as f:
            f.write(response.content)
        return path

    def put_label(
        self,
        image_id: str,
        label_file: str | os.PathLike,
        label_info: Sequence[Mapping[str, Any]],
        prompt: str | None = None,
        tag: str = "final",
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``PUT /datastore/label?image=ID&tag=final``: send a corrected label as training data."""
        body: dict[str, Any] = dict(params or {})
        body["label_info"] = [dict(item) for item in label_info]
        if prompt:
            body["prompt"] = prompt
        response = self.request(
            "PUT",
            "/datastore/label",
            query={"image": image_id, "tag": tag},
            data={"params": json.dumps(body)},
            files={"label": self._file_spec(label_file)},
        )
        return self._json(response)

    def datastore(self) -> dict[str, Any]:
        """``GET /datastore/?output=all``: images and their labels."""
        return self._json(self.request("GET", "/datastore/", query={"output": "all"}))

    def train(
        self, model: str = TRAINER, params: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """``POST /train/{model}``: start fine-tuning on the submitted corrections."""
        response = self.request(
            "POST", f"/train/{quote(model, safe='')}", json_body=dict(params or {}), task=model
        )
        return self._json(response)

    def train_status(self, all_runs: bool = False) -> dict[str, Any] | list[Any] | None:
        """``GET /train/``: the last (or every) training run; None when none has run yet."""
        response = self.request(
            "GET", "/train/", query={"all": str(all_runs).lower()}, ok=(200, 404), read_timeout=30
        )
        return None if response.status_code == 404 else self._json(response)

    def stop_training(self) -> dict[str, Any]:
        return self._json(self.request("DELETE", "/train/"))

    def next_sample(
        self,
        strategy: str = STRATEGY,
        params: Mapping[str, Any] | None = None,
    ) -> NextSample | None:
        """``POST /activelearning/{strategy}``: what to annotate next (None when none is left)."""
        response = self.request(
            "POST",
            f"/activelearning/{quote(strategy, safe='')}",
            json_body=dict(params or {}),
            task=strategy,
        )
        body = self._json(response)
        if not body or not body.get("id"):
            return None
        slice_value = body.get("slice", body.get("slice_index"))
        if isinstance(slice_value, list):  # a range: look at its middle
            slice_value = (int(slice_value[0]) + int(slice_value[-1])) // 2 if slice_value else None
        return NextSample(
            image_id=str(body["id"]),
            slice_index=None if slice_value is None else int(slice_value),
            axis=str(body.get("axis") or "axial"),
            raw=body,
        )


def image_stamp(info: dict[str, Any]) -> str | None:
    """``CitrusVClient.image_stamp`` of an image info body already read."""
    return info.get("image_sha256") or info.get("image_stat") or None


def _filename_from_disposition(disposition: str) -> str | None:
    from email.message import Message

    if not disposition:
        return None
    msg = Message()
    msg["content-disposition"] = disposition
    name = msg.get_filename()
    return os.path.basename(name) if name else None


def parse_infer_response(body: bytes, content_type: str) -> InferResponse:
    """Parse MONAI Label's ``/infer`` answer: multipart (``params`` + label) or plain JSON."""
    if content_type.lower().startswith("multipart/"):
        parts = parse_multipart(body, content_type)
        if "params" not in parts:
            raise CitrusVError("The server answer has no 'params' part: is this the Citrus-V app?")
        data = json.loads(parts["params"].text())
        label = next((p for n, p in parts.items() if n != "params" and p.filename), None)
        if label is None:
            label = next((p for n, p in parts.items() if n != "params"), None)
        return InferResponse(
            result=Result.from_json(_unwrap(data)),
            label_bytes=label.data if label else None,
            label_filename=label.filename if label else None,
        )
    try:
        data = json.loads(body.decode("utf-8"))
    except ValueError as exc:
        raise CitrusVError(
            "The server answer is neither multipart nor JSON; check the server URL."
        ) from exc
    return InferResponse(result=Result.from_json(_unwrap(data)))


def _unwrap(data: Any) -> Any:
    """MONAI Label's ``params`` may be the result itself or hold it under ``result``."""
    if isinstance(data, str):
        data = json.loads(data)
    if isinstance(data, Mapping) and "task" not in data and isinstance(data.get("result"), Mapping):
        return data["result"]
    return data
