"""The local datastore, with corrections that are checked and written atomically.

A radiologist's correction is the most expensive thing the server holds: it is validated
against the image (readable, same shape) and written to a temporary name, fsynced and renamed
into `labels/<tag>/`, so a crash or a kill mid-write leaves either the old label or the new one.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import Any

import numpy as np
from filelock import FileLock

from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from .errors import RequestError
from .images import read_study

logger = logging.getLogger(__name__)

# MONAI Label's defaults plus DICOM files (the sample chest X-ray is a single .dcm).
EXTENSIONS = ["*.nii.gz", "*.nii", "*.nrrd", "*.dcm", "*.png", "*.jpg"]


def _fsync_copy(src: str, dst: str) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())


def _fsync_dir(path: str) -> None:
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


class CorrectionsDatastore(LocalDatastore):
    """LocalDatastore whose labels and index file are replaced atomically."""

    def save_label(self, image_id: str, label_filename: str, label_tag: str,
                   label_info: dict[str, Any]) -> str:
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise RequestError(f"image '{image_id}' is not in the datastore; save the label for one "
                               "of the ids listed by GET /datastore/?output=all.", status_code=404)
        label_tag = label_tag or DefaultLabelTag.FINAL.value
        label_info = dict(label_info or {})
        self._check_label(image_id, label_filename, label_info)

        _, label_ext = self._to_id(os.path.basename(label_filename))
        if label_ext not in (".nii.gz", ".nii", ".nrrd"):
            label_ext = ".nii.gz"
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        dest = os.path.join(label_path, name)
        tmp = os.path.join(label_path, f".{name}.{uuid.uuid4().hex}.part")

        with FileLock(self._lock_file):
            os.makedirs(label_path, exist_ok=True)
            try:
                _fsync_copy(label_filename, tmp)
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            _fsync_dir(label_path)
            previous = obj.labels.get(label_tag)
            if previous is not None and previous.ext and previous.ext != label_ext:
                stale = os.path.join(label_path, self._filename(image_id, previous.ext))
                if os.path.exists(stale):
                    os.unlink(stale)
            label_info["ts"] = int(time.time())
            label_info["name"] = name
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
            self._update_datastore_file(lock=False)
        logger.info("Saved %s label for %s: %s", label_tag, image_id, label_info.get("label_info"))
        return image_id

    def _check_label(self, image_id: str, label_filename: str, label_info: dict) -> None:
        """The label must be a readable map in the image's own index space."""
        try:
            label = read_study(label_filename)
        except RequestError as e:
            raise RequestError(f"The label file could not be read: {e.detail}") from e
        image = read_study(self.get_image_uri(image_id))
        if label.shape != image.shape:
            raise RequestError(
                f"The label has shape {list(label.shape)} but image '{image_id}' has "
                f"{list(image.shape)}; save the label in the image's own geometry.")
        values = np.unique(np.asarray(label.array)).astype(int).tolist()
        info = label_info.get("label_info")
        if isinstance(info, str):
            try:
                info = json.loads(info)
            except ValueError:
                raise RequestError("params.label_info must be a list like "
                                   "[{\"name\": \"liver\", \"idx\": 1}].") from None
        if info is not None:
            if not isinstance(info, list) or not all(
                    isinstance(i, dict) and "name" in i and "idx" in i for i in info):
                raise RequestError("params.label_info must be a list like "
                                   "[{\"name\": \"liver\", \"idx\": 1}].")
            label_info["label_info"] = info
        label_info["label_values"] = [v for v in values if v]

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            tmp = f"{self._datastore_config_path}.{os.getpid()}.part"
            with open(tmp, "w") as f:
                f.write(json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2,
                                   default=str))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._datastore_config_path)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
