"""Files a crash cannot half-write, and the copies of corrections kept as they were sent.

Light on purpose (no MONAI Label, no torch): `monailabel_app/history.py` reads the kept
corrections with it on the workstation.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

from .model import write_json_atomic

HISTORY_DIR = ".history"  # under labels/final; MONAI Label lists only label files there
INFO_DIR = ".info"  # under labels/<tag>: each label's info beside it (`keep_label_info`)
SET_ASIDE_DIR = ".set_aside"  # under labels/<tag>: labels saved for an image since replaced


def fsync_copy(src: str, dst: str) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stamp(when: float) -> str:
    """UTC time + 6 hex digits: names that sort in the order they were given."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(when)) + f"-{uuid.uuid4().hex[:6]}"


def keep_submission(label_path: str, image_id: str, label_filename: str,
                    said: dict[str, Any]) -> str:
    """Copy a final label as it was sent to labels/final/.history/<image id>/<stamp><ext>, with
    `<stamp>.json` (`said`: what came with it); both written to hidden names and renamed. The
    stamp (UTC time + 6 hex digits) sorts in the order the corrections arrived. Returns it."""
    folder = os.path.join(label_path, HISTORY_DIR, image_id)
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(label_filename).lower()
    ext = next((e for e in (".nii.gz", ".nii", ".nrrd") if name.endswith(e)), ".nii.gz")
    now = time.time()
    stamp = _stamp(now)
    record = {"image": image_id, "file": stamp + ext, "ts": int(now),
              "received": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)), **said}
    tmp = os.path.join(folder, f".{stamp}{ext}.part")
    try:
        fsync_copy(label_filename, tmp)
        os.replace(tmp, os.path.join(folder, stamp + ext))
    except OSError:  # a full disk: leave no partial copy behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    write_json_atomic(Path(folder) / f"{stamp}.json", record)
    fsync_dir(folder)
    return stamp


def kept_records(label_path: str, image_id: str) -> list[dict[str, Any]]:
    """The .json records of an image's kept corrections (see keep_submission), oldest first."""
    folder = os.path.join(label_path, HISTORY_DIR, image_id)
    records = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and not name.startswith("."):
            try:
                with open(os.path.join(folder, name)) as f:
                    records.append(json.load(f))
            except (OSError, ValueError):
                continue
    return records


# file -> ((size, mtime_ns, ctime_ns, inode), SHA-256) as last read: the server looks at the
# same label and image files at every refresh (a label kept apart from a replaced image, that
# image's files)
_digests: dict[str, tuple[tuple[int, int, int, int], str]] = {}


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, read again only when the file was written or replaced since
    it was last read (its size, times or inode changed)."""
    st = os.stat(path)
    key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    taken = _digests.get(path)
    if taken is None or taken[0] != key:
        taken = _digests[path] = (key, _read_sha256(path))
    return taken[1]


def _read_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _image_files(path: str) -> list[os.DirEntry]:
    """A series folder's files directly in it (hidden ones left out), sorted by name; [] for an
    image that is one file."""
    if not os.path.isdir(path):
        return []
    with os.scandir(path) as entries:
        return sorted((e for e in entries if e.is_file() and not e.name.startswith(".")),
                      key=lambda e: e.name)


def write_dataset_zip(cases: list[tuple[str, str, str]], image_root: str, info_folder: str,
                      metadata: str) -> str:
    """A ZIP of (image id, image path, label path) cases, in the temporary folder (the caller
    deletes it): `image/<name>` (a series folder's files as `image/<folder>/<file>`, the folder
    named as in the studies folder, `image_root`), `label/<file>`, each label's kept record
    (its structures' names; `keep_label_info`) as `label/.info/<image id>.json` where
    `info_folder` holds one, and `metadata.json` (the index). OSError as the disk gives it."""
    fd, path = tempfile.mkstemp(prefix="citrusv-dataset-", suffix=".zip")
    os.close(fd)
    try:
        with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
            for image_id, image, label in cases:
                if os.path.isdir(image):
                    inside = os.path.relpath(image, image_root)
                    name = inside if not inside.startswith("..") else os.path.basename(image)
                    for entry in _image_files(image):
                        archive.write(entry.path, f"image/{name}/{entry.name}")
                else:
                    archive.write(image, f"image/{os.path.basename(image)}")
                archive.write(label, f"label/{os.path.basename(label)}")
                record = os.path.join(info_folder, f"{image_id}.json")
                if os.path.isfile(record):
                    archive.write(record, f"label/{INFO_DIR}/{image_id}.json")
            archive.writestr("metadata.json", metadata)
    except BaseException:
        os.unlink(path)
        raise
    return path


def image_stat(path: str) -> str:
    """A digest of an image's files' names, sizes and modification times: cheap to take at
    every refresh, and unchanged while nobody writes the image ("" if it is gone)."""
    digest = hashlib.sha256()
    try:
        if not os.path.isdir(path):
            st = os.stat(path)
            digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        for entry in _image_files(path):
            st = entry.stat()
            digest.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    except OSError:
        return ""
    return digest.hexdigest()


def image_sha256(path: str) -> str:
    """A digest of an image's content: the file's bytes, or the set of a series folder's files'
    bytes (a copy of the same image, with other times or file names, has the same digest)."""
    if not os.path.isdir(path):
        return file_sha256(path)
    digest = hashlib.sha256()
    for file_digest in sorted(file_sha256(entry.path) for entry in _image_files(path)):
        digest.update(f"{file_digest}\n".encode())
    return digest.hexdigest()


def image_content(path: str) -> dict[str, str]:
    """{"image_stat", "image_sha256"}: what identifies an image file's or series folder's
    content, as a label's kept record holds it (OSError if it is gone)."""
    return {"image_stat": image_stat(path), "image_sha256": image_sha256(path)}


def keep_label_info(label_path: str, image_id: str, label_file: str, info: dict[str, Any],
                    image: str, image_content: dict[str, str] | None = None) -> None:
    """A label's info (its structures' names, prompts, window) written beside it, to
    labels/<tag>/.info/<image id>.json with the label file's SHA-256, the image's file or
    folder (`image`, relative to the studies folder) and what identifies the image's content
    (`image_content`: {"image_stat": `image_stat`, "image_sha256": `image_sha256`}). The index
    holds the info too, but a label MONAI Label finds again after its image left the index (the
    index deleted, the image moved out and back, a series folder emptied and filled) is listed
    with no info, its structures then "label 1"; `kept_label_record` gives it back. The image's
    content tells a label from one saved for another image put in its place."""
    folder = os.path.join(label_path, INFO_DIR)
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(Path(folder) / f"{image_id}.json",
                      {"sha256": file_sha256(label_file), "image": image,
                       **(image_content or {}), "info": info})


def image_written_ns(path: str) -> int | None:
    """When an image's file or series folder was last written, renamed or had files added or
    taken out (the newest modification or status-change time, ns; None if it is gone)."""
    try:
        st = os.stat(path)
        times = [st.st_mtime_ns, st.st_ctime_ns]
        for entry in _image_files(path):
            st = entry.stat()
            times += [st.st_mtime_ns, st.st_ctime_ns]
    except OSError:
        return None
    return max(times)


def adopt_image_content(label_path: str, image_id: str, kept: dict[str, Any],
                        image_path: str) -> dict[str, Any] | None:
    """A label's kept record (`kept_label_record`) written before records held the image's
    content (before 2026-12-06), given it now where the image was provably not written since
    the record was (`image_written_ns` older than the record): the label was saved for what the
    image holds now. The record is rewritten with it (returned), so the image being replaced
    later is seen. None where the image was written since (or is gone): nothing tells which
    image the label was drawn on. A record that holds the content is returned as it is."""
    if kept.get("image_sha256"):
        return kept
    record = os.path.join(label_path, INFO_DIR, f"{image_id}.json")
    try:
        written = image_written_ns(image_path)
        if written is None or written >= os.stat(record).st_mtime_ns:
            return None
        kept = {**kept, **image_content(image_path)}
    except OSError:  # gone meanwhile
        return None
    try:
        write_json_atomic(Path(record), kept)
    except OSError:  # a read-only or full disk: true all the same, written at a later refresh
        pass
    return kept


def kept_label_record(label_path: str, image_id: str,
                      label_file: str | None) -> dict[str, Any] | None:
    """What `keep_label_info` kept for this label ({"image": its image's file or folder,
    "info": ...}), if the label file is still the one it was kept with (a label file replaced
    by another gets none: the names may not fit it); `label_file` None: not checked."""
    path = os.path.join(label_path, INFO_DIR, f"{image_id}.json")
    try:
        with open(path) as f:
            kept = json.load(f)
        if isinstance(kept.get("info"), dict) and (
                label_file is None or kept.get("sha256") == file_sha256(label_file)):
            return kept
    except (OSError, ValueError, AttributeError):
        pass
    return None


def set_aside(label_path: str, image_id: str, name: str) -> str:
    """Move a label file that is not listed with its image (kept apart: saved for another
    image) to labels/<tag>/.set_aside/<stamp>-<name>, with its kept info, before a new label
    for the image takes its name. Returns the new path, relative to `label_path`."""
    folder = os.path.join(label_path, SET_ASIDE_DIR)
    os.makedirs(folder, exist_ok=True)
    stamp = _stamp(time.time())
    info = os.path.join(label_path, INFO_DIR, f"{image_id}.json")
    if os.path.exists(info):
        os.replace(info, os.path.join(folder, f"{stamp}-{image_id}.json"))
    os.replace(os.path.join(label_path, name), os.path.join(folder, f"{stamp}-{name}"))
    fsync_dir(folder)
    return os.path.join(SET_ASIDE_DIR, f"{stamp}-{name}")
