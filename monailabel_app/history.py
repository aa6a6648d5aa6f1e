"""List the corrections a MONAI Label server received, as they were sent, and send one again.

    python monailabel_app/history.py --datastore DIR                  # every image's corrections
    python monailabel_app/history.py --datastore DIR list IMAGE       # one image's, with voxels
    python monailabel_app/history.py --datastore DIR restore IMAGE ENTRY [--server URL] [--token T]

`--datastore` is the server's `--studies` folder (with a PACS, its cache folder: see the README's
"What the server keeps on disk"). The server keeps each final label it receives in
`labels/final/.history/IMAGE/ENTRY.*` before it merges it into the image's label, so a structure
that a later correction re-drew or removed is still there. `restore` sends entry ENTRY to the
running server again as a new correction (PUT /datastore/label), with the structures, question
and window it had: those structures are put back, the others stay as they are. With sign-in on,
pass an annotator's access token; the server then records that person as the sender (without
sign-in, the name the entry's sender gave is sent again, marked as claimed). Run it with
the server's Python (`.venv/bin/python`); it loads no model. A correction sent for an image
that was since replaced on disk by another under the same name is marked `*` in the listing,
and `restore` does not send it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

APP_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(APP_DIR))

from lib.cli import run, table  # noqa: E402
from lib.files import HISTORY_DIR, image_sha256, kept_records  # noqa: E402

LABELS = Path("labels") / "final"
HISTORY = LABELS / HISTORY_DIR


def entries(datastore: Path, image: str | None = None) -> list[dict]:
    """The kept corrections (their .json records, plus `path` of the label file), oldest first."""
    root = datastore / HISTORY
    images = [image] if image else sorted(p.name for p in root.glob("*") if p.is_dir())
    return [{**r, "path": root / name / r.get("file", "")} for name in images
            for r in kept_records(str(datastore / LABELS), name)]


class ImagesNow:
    """Each image's digest as its file or folder holds it now, over one listing: the server's
    index is read once, each image hashed once (files.py keeps the file digests)."""

    def __init__(self, datastore: Path):
        self.datastore = datastore
        self._names: dict[str, str] | None = None
        self._digests: dict[str, str | None] = {}

    def digest(self, image: str) -> str | None:
        """`image_sha256` of the file or folder the server's index names for `image` (None: no
        such image, nothing to compare)."""
        if image not in self._digests:
            name = self._index().get(image)
            try:
                self._digests[image] = image_sha256(str(self.datastore / name)) if name else None
            except OSError:
                self._digests[image] = None
        return self._digests[image]

    def _index(self) -> dict[str, str]:
        if self._names is None:
            self._names = {}
            try:
                index = json.loads((self.datastore / "datastore_v2.json").read_text())
                for image, obj in index["objects"].items():
                    self._names[image] = str(obj["image"]["info"]["name"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
        return self._names


def replaced(datastore: Path, record: dict, now: ImagesNow | None = None) -> bool:
    """Whether a kept correction was sent for other content than its image's file or folder
    holds now (a scan replaced on disk under the same name); the server keeps the image's
    digest with each correction since 2026-12-06 (older ones, and a PACS's, say no). `now`
    keeps the index and each image's digest over one listing."""
    want = record.get("image_sha256")
    if not want:
        return False
    have = (now or ImagesNow(datastore)).digest(str(record.get("image")))
    return have is not None and have != want


def _structures(record: dict, count: bool) -> str:
    names = {int(e["idx"]): str(e["name"]) for e in record.get("label_info") or []
             if isinstance(e, dict) and "idx" in e and "name" in e}
    if not count:
        return ", ".join(names.values()) or "-"
    import nibabel as nib

    try:
        data = np.asarray(nib.load(record["path"]).dataobj)
    except Exception as e:  # a damaged file is listed as such, not a stack trace
        return f"unreadable label file ({type(e).__name__})"
    values = {int(v): int(n) for v, n in zip(*np.unique(data, return_counts=True)) if v}
    parts = [f"{names.get(v, f'label {v}')} {values.get(v, 0)} voxels"
             + ("" if values.get(v) else " (removes it)") for v in sorted(set(names) | set(values))]
    return ", ".join(parts) or "empty"


def sender(record: dict) -> str:
    """Who sent a kept correction: the signed-in user, or the name the client gave when nobody
    signed in (marked as claimed), or "-"."""
    if record.get("user"):
        return str(record["user"])
    if record.get("claimed_by"):
        return f"{record['claimed_by']} (claimed, no sign-in)"
    return "-"


def list_entries(datastore: Path, image: str | None) -> str:
    found = entries(datastore, image)
    if not found:
        where = datastore / HISTORY / (image or "")
        return f"No corrections kept in {where}."
    rows = [("image", "entry", "received", "sender", "structures")]
    now = ImagesNow(datastore)
    marked = False
    for r in found:
        entry = Path(r["file"]).name.split(".")[0]
        if replaced(datastore, r, now):
            entry, marked = entry + " *", True
        rows.append((r.get("image", "?"), entry, r.get("received", "?"),
                     sender(r), _structures(r, count=image is not None)))
    return table(rows) + ("\n* sent for an image since replaced on disk by another under the "
                          "same name; `restore` does not send it to the one there now."
                          if marked else "")


def restore(datastore: Path, image: str, entry: str, server: str, token: str | None,
            ca_cert: str | None = None) -> str:
    import requests

    match = [r for r in entries(datastore, image) if Path(r["file"]).name.split(".")[0] == entry]
    if not match:
        raise ValueError(f"image '{image}' has no kept correction '{entry}'; run "
                         f"`list {image}` to see its entries.")
    record = match[0]
    if replaced(datastore, record):
        raise ValueError(f"entry {entry} was sent for the image that '{image}' named then, which "
                         "was replaced on disk by another since; it is not sent to the one there "
                         "now.")
    # without sign-in the entry's sender is sent again as it was given (a server with sign-in
    # drops it and records the token's user)
    params = {k: record[k] for k in ("label_info", "prompt", "window", "claimed_by") if k in record}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{server.rstrip('/')}/datastore/label"
    try:
        with open(record["path"], "rb") as f:
            r = requests.put(url, params={"image": image, "tag": "final"}, headers=headers,
                             files={"label": (record["path"].name, f, "application/gzip")},
                             data={"params": json.dumps(params)}, timeout=120,
                             verify=ca_cert or True)
    except OSError as e:  # requests' connection errors are OSErrors too
        raise ValueError(f"could not send the correction to {server}: {e}") from None
    if r.status_code != 200:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise ValueError(f"the server at {server} answered {r.status_code}: {detail}")
    return f"Sent {entry} of {image} again; its structures are back: {_structures(record, False)}."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datastore", default="sample_data/studies",
                    help="the server's --studies folder (with a PACS: its cache folder)")
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("list", help="list kept corrections (the default: every image's)")
    p.add_argument("image", nargs="?")
    p = sub.add_parser("restore", help="send a kept correction to the server again")
    p.add_argument("image")
    p.add_argument("entry")
    p.add_argument("--server", default="http://127.0.0.1:8000", help="the MONAI Label server")
    p.add_argument("--token", default=None, help="an annotator's access token (sign-in on)")
    p.add_argument("--ca-cert", default=None,
                   help="with an https server: the CA certificate (PEM) that signed its certificate")
    args = ap.parse_args(argv)
    datastore = Path(args.datastore)

    def act() -> str:
        if not datastore.is_dir():
            raise ValueError(f"{datastore} is not a folder; pass the server's --studies folder.")
        if args.cmd == "restore":
            return restore(datastore, args.image, args.entry, args.server, args.token,
                           args.ca_cert)
        return list_entries(datastore, getattr(args, "image", None))

    return run(act)


if __name__ == "__main__":
    sys.exit(main())
