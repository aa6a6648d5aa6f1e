"""Parse the ``multipart/form-data`` body MONAI Label's ``/infer`` returns.

MONAI Label (``monailabel/endpoints/infer.py: send_response``) answers with a
``requests_toolbelt.MultipartEncoder`` body: a ``params`` part (the result JSON) and an
``image`` part (the label file, with a filename). Without a label file it answers plain JSON.
Written without ``cgi`` (removed in Python 3.13) and without requests_toolbelt (not in Slicer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message


@dataclass
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None

    def text(self) -> str:
        return self.data.decode("utf-8")


def _header_params(value: str) -> tuple[str, dict[str, str]]:
    msg = Message()
    msg["content-type"] = value
    params = dict(msg.get_params(header="content-type", unquote=True)[1:])
    return msg.get_content_type(), params


def boundary_of(content_type: str) -> str:
    msg = Message()
    msg["content-type"] = content_type
    boundary = msg.get_param("boundary", header="content-type")
    if not boundary or not isinstance(boundary, str):
        raise ValueError(f"Content-Type '{content_type}' has no multipart boundary.")
    return boundary


def parse_multipart(body: bytes, content_type: str) -> dict[str, Part]:
    """Split a multipart body into named parts (later parts with the same name win)."""
    delimiter = b"--" + boundary_of(content_type).encode("latin-1")
    chunks = body.split(delimiter)
    parts: dict[str, Part] = {}
    # chunks[0] is the preamble; the chunk after the closing delimiter starts with b"--".
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        elif chunk.startswith(b"\n"):
            chunk = chunk[1:]
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            head, sep, data = chunk.partition(b"\n\n")
            if not sep:
                raise ValueError("A multipart part has no header/body separator.")
        # the CRLF before the next delimiter belongs to the delimiter, not the data
        if data.endswith(b"\r\n"):
            data = data[:-2]
        elif data.endswith(b"\n"):
            data = data[:-1]
        headers: dict[str, str] = {}
        for line in re.split(rb"\r?\n", head):
            if b":" in line:
                key, value = line.split(b":", 1)
                headers[key.decode("latin-1").strip().lower()] = value.decode("utf-8").strip()
        disposition = headers.get("content-disposition", "")
        _, dparams = (
            _header_params("x/x; " + disposition.split(";", 1)[1])
            if ";" in disposition
            else ("", {})
        )
        name = dparams.get("name")
        if name is None:
            continue
        parts[name] = Part(
            name=name,
            data=data,
            filename=dparams.get("filename"),
            content_type=headers.get("content-type"),
        )
    return parts
