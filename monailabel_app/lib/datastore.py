"""The local datastore, with corrections that are checked and written atomically.

A radiologist's correction is the most expensive thing the server holds: it is validated
against the image (readable, same shape) and written to a temporary name, fsynced and renamed
into `labels/<tag>/`, so a crash or a kill mid-write leaves either the old label or the new one.

An image has one final label, but radiologists correct one structure at a time (the Slicer
module sends one segment per correction): a final label is therefore *merged* into the one
already stored, by structure name. The structures it names replace theirs (a named structure
with no voxels removes it), every other structure already there is kept, and each structure
keeps the prompt, window and time of the correction that last set it.

Every final label is also kept *as it was sent* in `labels/final/.history/<image id>/`, with
what it said (structures, prompt, window, sender, time), before it is merged: a structure that a
later correction re-draws or removes can be put back (`monailabel_app/history.py`), and a
correction whose merge fails is still on disk. The server never deletes that history. The
stored label's info (structure names, prompts) is kept beside it too (`labels/<tag>/.info/`),
so a label found again after the index lost its image keeps its names, with a digest of the
image's content: a label whose image was replaced on disk by another scan under the same name
is not listed with it, and the next correction for that image moves it to
`labels/<tag>/.set_aside/` rather than merging into it.

Two processes write the datastore: the server (corrections) and its training run (SEGs that
other tools stored on the PACS, imported at the start of each run). Both hold the index in
memory; every write takes the file lock and re-reads the index if the other process replaced
it, so neither puts back an older index over a label the other just saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom_seg
import requests
import SimpleITK as sitk
from filelock import FileLock
from pydicom import Dataset

from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import DataModel, LocalDatastore, LocalDatastoreModel
from monailabel.datastore.utils.convert import nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag

from citrusv.dicom_sort import series_id  # the ids `citrusv sort-dicom` gives series

from .errors import ConfError, RequestError
from .files import (INFO_DIR, adopt_image_content, fsync_copy, fsync_dir, image_content, image_sha256,
                    image_stat, keep_label_info, keep_submission, kept_label_record, kept_records,
                    set_aside, write_dataset_zip)
from .images import (LPS_TO_RAS, Study, holds_dicom, is_dicom_file, read_study, series_files,
                     write_label)

logger = logging.getLogger(__name__)

# under the studies folder: a folder of links per series whose files lie in several folders
JOINED_DIR = ".joined"

# seconds after the last write to an image overwritten in place before its labels are checked
REFRESH_AFTER_WRITES_S = 1.0
REFRESH_FAILED = ("Listing the studies folder again after a change on disk failed; the next "
                  "change (or a restart) lists it.")

# MONAI Label's defaults plus DICOM files (the sample chest X-ray is a single .dcm).
EXTENSIONS = ["*.nii.gz", "*.nii", "*.nrrd", "*.dcm", "*.png", "*.jpg"]


DEFAULT_PACS_CACHE_GB = 50.0


def pacs_cache_bytes(value: str | None) -> int:
    """`--conf pacs_cache_gb N`: the PACS cache's size limit (default 50 GB; 0 = no limit)."""
    try:
        gb = float(DEFAULT_PACS_CACHE_GB if value is None or str(value).strip() == "" else value)
    except ValueError:
        gb = -1.0
    if not gb >= 0:  # also NaN
        raise ConfError(f"--conf pacs_cache_gb must be a number of gigabytes >= 0 (0: no "
                        f"limit), not '{value}'.")
    return int(gb * 1e9)


class CorrectionsDatastore(LocalDatastore):
    """LocalDatastore whose labels and index file are replaced atomically, and which serves a
    folder of DICOM files in the studies folder (`STUDIES/<id>/*.dcm`, a CT series as a
    hospital exports it) as one image, its id the folder's name; MONAI Label lists files only,
    so such a series was not served at all. A folder whose DICOM files lie only in folders
    below it (a CD or DICOMDIR export: `STUDIES/cd/DICOM/ST0/SE0/IM0`) serves each of those
    folders as an image (`series_below`)."""

    series_folders = True  # the PACS datastore's cache folders are its own
    # a label is listed only with the image content it was saved for (the PACS datastore's
    # images are series UIDs, their cached copies rewritten when fetched again)
    check_image_content = True
    # image id -> its series' folder, relative to the studies folder (None: not looked yet)
    _below: dict[str, str] | None = None
    _below_notes: list[str] = []  # series_below's sentences at the last refresh
    _moved_folders = 0  # ids the last look found read from another folder than the index says
    _replaced_checked = False  # labels of replaced images looked for in this refresh
    # (label folder, file) -> the sentence on a label saved for another image (not listed)
    _kept_apart: dict[tuple[str, str], str] = {}
    # image id -> the info kept beside its label, for labels the listing just found again
    _found_again: dict[str, dict[str, Any]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.start_notes: list[str] = []  # what the server found at start (loose DICOM slices)
        self._kept_apart = {}
        # labels kept with no digest of their image (before 2026-12-06): said once in the log
        self._undated: set[tuple[str, str]] = set()
        # one thread at a time walks or changes the index in memory: the folder watcher's
        # thread, the timer after an image's writes and request threads each refresh it, and
        # two refreshes at once ended the watcher's thread ("dictionary changed size during
        # iteration"): nothing copied in after was listed until a restart. Taken before the
        # file lock (the index file, shared with the training process), never after it.
        self._mutex = threading.RLock()
        super().__init__(*args, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:
            # the index file is replaced by a rename, which MONAI Label's watcher does not
            # follow: without this, what another process (the training run, which imports
            # PACS SEGs) writes there would stay unseen by the server until it restarts
            handler.on_moved = self._on_moved_event
        observer = getattr(self, "_observer", None)
        if self.series_folders and handler is not None and observer is not None:
            # MONAI Label watches files of the studies folder itself: a series folder copied in
            # while the server runs would be listed only at the next restart
            from watchdog.events import FileSystemEventHandler

            base = os.path.realpath(self._datastore.image_path())
            labels = os.path.realpath(self._datastore.label_path(None))
            index = os.path.realpath(self._datastore_config_path)

            # a path below a hidden folder is not served: the links `series_below` keeps in
            # .joined/ set off a refresh each (the target of a link is a served file)
            def real(path: str) -> str:  # its folder resolved, not a link it may be
                return os.path.join(os.path.realpath(os.path.dirname(path)),
                                    os.path.basename(path))

            def served(path: str) -> bool:  # may be an image: not hidden, not the app's own
                return (path.startswith(base + os.sep) and path != index
                        and not path.startswith(labels + os.sep)
                        and not any(part.startswith(".") for part in
                                    os.path.relpath(path, base).split(os.sep)))

            def changed(event) -> None:  # a file in a folder of the studies folder, any depth
                path = real(event.src_path)
                if not event.is_directory and os.path.dirname(path) != base and served(path):
                    self._watched_refresh()

            def moved(event) -> None:
                # a series folder or image renamed into place (`citrusv sort-dicom` writes
                # each under a hidden name first): MONAI Label's watcher sees no new file
                if served(real(event.dest_path)):
                    self._watched_refresh()

            pending: list[threading.Timer] = []

            def modified(event) -> None:
                # an image overwritten in place (MONAI Label refreshes on created and deleted
                # files only): its labels are checked against its new content once the writes
                # stop, so one saved for the first image is not listed with it
                if event.is_directory or not served(real(event.src_path)):
                    return
                while pending:
                    pending.pop().cancel()
                timer = threading.Timer(REFRESH_AFTER_WRITES_S, self._watched_refresh)
                timer.daemon = True
                pending.append(timer)
                timer.start()

            series = FileSystemEventHandler()
            series.on_created = series.on_deleted = changed
            series.on_moved = moved
            series.on_modified = modified
            try:
                observer.schedule(series, path=base, recursive=True)
            except OSError as e:  # as MONAI Label's own watcher: listed at the next start
                logger.warning("Series folders copied into %s while the server runs will be "
                               "listed at its next start only (%s).", base, e)

    def _watched_refresh(self) -> None:
        """A refresh that a change on disk starts (the watcher's thread, or the timer after an
        image's writes): an error is logged, not raised, since it would end the watcher's thread
        and nothing copied in after would be listed until a restart."""
        try:
            self.refresh()
        except Exception:
            logger.exception(REFRESH_FAILED)

    def _on_any_event(self, event) -> None:  # MONAI Label's watcher: an image file came or went
        try:
            super()._on_any_event(event)  # a refresh
        except Exception:
            logger.exception(REFRESH_FAILED)

    def _on_modify_event(self, event) -> None:  # MONAI Label's watcher: the index file written
        try:
            super()._on_modify_event(event)
        except Exception:
            logger.exception("Reading the datastore index again after it was written failed.")

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        with self._mutex:
            super()._init_from_datastore_file(throw_exception)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        with self._mutex:
            super().remove_label(label_id, label_tag)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """An uploaded image, checked first: an id that names a file in the studies folder and
        nowhere else (before, "../x" wrote outside it), an image this server reads (an empty
        file or a text file was stored as an "image"), and never another image under an id
        that is taken: the corrections stored for that id would then belong to the wrong image
        (409). The same image sent again is a no-op."""
        derived, ext = self._to_id(os.path.basename(image_filename))
        image_id = str(image_id or derived or "").strip()
        if not IMAGE_ID.match(image_id) or ".." in image_id:
            raise RequestError(f"image id {image_id[:60]!r} cannot name a file here; use 1 to 128 "
                               "letters, digits, '.', '_' or '-', not starting with a dot, e.g. "
                               "?image=patient12_ct.")
        new = read_study(image_filename)  # RequestError: not an image this server reads
        with self._mutex:
            return self._add_checked_image(image_id, image_filename, image_info, new)

    def _add_checked_image(self, image_id: str, image_filename: str, image_info: dict[str, Any],
                           new) -> str:
        existing = self._datastore.objects.get(image_id)
        if existing is not None:
            old = read_study(self.get_image_uri(image_id))
            same = (old.array.shape == new.array.shape and np.allclose(old.affine, new.affine)
                    and np.array_equal(old.array, new.array))
            if same:
                logger.info("Image %s uploaded again, unchanged; kept as it was", image_id)
                return image_id
            raise RequestError(f"image id '{image_id}' is already in the datastore with another "
                               "image (its corrections belong to that one); upload this image "
                               "under another id.", status_code=409)
        return super().add_image(image_id, image_filename, image_info)

    def _list_files(self, path, patterns):
        found = super()._list_files(path, patterns)
        if os.path.dirname(os.path.realpath(path)) == os.path.realpath(
                self._datastore.label_path(None)):
            return self._labels_of_their_images(path, found)
        if not self.series_folders or os.path.realpath(path) != os.path.realpath(
                self._datastore.image_path()):
            return found
        for name, full in self._folders():
            if name not in found and IMAGE_ID.match(name) and holds_dicom(full):
                found[name] = name
        found.update({image_id: image_id for image_id in self._below or {}})
        return found

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """MONAI Label's image info (`GET /datastore/image/info`) plus `image_stat` (files.py:
        its file's or folder's files' names, sizes and times now; stat calls only) and
        `image_sha256` (a digest of its bytes; read once after each write, then kept). A client
        that downloaded the image (the Slicer module) tells from them that the image holds other
        content since, maybe another scan put on disk under the same name, and sends no
        question or correction drawn on its copy under this id; the same bytes copied over the
        image change `image_stat` only."""
        info = super().get_image_info(image_id)
        if info and self.check_image_content:
            info.update({k: v for k, v in self._image_content(str(info.get("path") or "")).items()
                         if v})
        return info

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        """MONAI Label's {tag: image id} of an image's labels, read with the index mutex held:
        its loop over the image's labels ends in "dictionary changed size during iteration"
        if another thread saves a label of the image meanwhile (a batch inference runs on one
        since 2026-12-06, `lib.batch`)."""
        with self._mutex:
            return super().get_labels_by_image_id(image_id)

    def status(self) -> dict[str, Any]:
        """MONAI Label's counts (`/info/` "datastore") plus, under "notes", what the server log
        says about the studies folder (a CD export served as ..., the folders a split series
        joins, loose slices at start, labels kept apart from the image their id now names or
        whose image is gone), for an admin who reads /info/ and not the log. MONAI Label's
        counts, with each image's labels walked under the index mutex (as
        `get_labels_by_image_id`) and the images listed outside it (a PACS's list is a
        network call)."""
        with self._mutex:
            tags = Counter(tag for obj in self._datastore.objects.values() for tag in obj.labels)
        out = {"total": len(self.list_images()), "completed": len(self.get_labeled_images()),
               "label_tags": dict(tags)}
        if self.series_folders:
            out["notes"] = [*self.start_notes, *self.below_notes()]
        if self._kept_apart:
            out["notes"] = [*out.get("notes", []), *self._kept_apart.values()]
        return out

    def _reconcile_datastore(self) -> None:
        with self._mutex:  # one refresh at a time (see __init__)
            # the series below folders, looked up once per refresh and before MONAI Label
            # checks that each image's file is there (it does so first): unknown then, an image
            # among them was dropped and listed again, its correction's names and prompts lost
            if self.series_folders:
                self._look_below()
            self._replaced_checked = False
            super()._reconcile_datastore()

    @staticmethod
    def _image_content(path: str) -> dict[str, str]:
        """{"image_stat", "image_sha256"} of an image file or series folder (files.py, which
        reads a file again only once it was written)."""
        try:
            return image_content(path)
        except OSError:  # gone meanwhile: nothing to identify
            return {}

    def _with_image_content(self, label_path: str, image_id: str, kept: dict[str, Any],
                            image: str) -> dict[str, Any]:
        """A label's kept record with the content of the image it was saved for: one kept by a
        server older than 2026-12-06 held none, and gets the image's content now where the
        image was not written since (`adopt_image_content`); elsewhere the log says once that
        nothing tells, and the label stays listed as before."""
        if not self.check_image_content or kept.get("image_sha256"):
            return kept
        path = os.path.join(self._datastore.image_path(), image)
        adopted = adopt_image_content(label_path, image_id, kept, path)
        tag = os.path.basename(label_path)
        said = (label_path, image_id) in self._undated  # each said once (a read-only disk)
        self._undated.add((label_path, image_id))
        if adopted is not None:
            if not said:
                logger.info("The %s label of %s was kept by a server that recorded no digest of "
                            "its image; %s was not written since, so its digest is recorded now.",
                            tag, image_id, image)
            return adopted
        if not said and os.path.exists(path):
            logger.warning("The %s label of %s was saved by a server older than 2026-12-06, "
                           "which recorded no digest of its image, and %s was written since: "
                           "whether it is the image the label was drawn on cannot be told; the "
                           "label stays listed with it.", tag, image_id, image)
        return kept

    def _image_replaced(self, kept: dict[str, Any], image: str) -> bool:
        """Whether the image file or folder (relative to the studies folder) that a label was
        kept with (`kept`, files.py's record) holds other content now. A record without the
        content (none was kept before) says no."""
        if not self.check_image_content or not kept.get("image_sha256"):
            return False
        path = os.path.join(self._datastore.image_path(), image)
        if image_stat(path) in ("", kept.get("image_stat")):
            return False
        try:
            return image_sha256(path) != kept["image_sha256"]
        except OSError:  # gone meanwhile: nothing to compare
            return False

    def _remove_non_existing(self) -> int:
        gone = super()._remove_non_existing() + self._moved_folders  # the index to write
        self._moved_folders = 0
        # once per refresh: MONAI Label calls this again after attaching the labels it found,
        # and those were checked as they were listed (`_labels_of_their_images`)
        if not self._replaced_checked:
            gone += self._detach_labels_of_replaced_images()
            self._replaced_checked = True
        if not self.series_folders:
            return gone
        # a folder id whose folder holds no DICOM files now: a CD folder whose one series was
        # removed or renamed (its id then names the CD folder, which is there), or a series
        # folder emptied. MONAI Label checks only that the path is there, so the id stayed
        # listed, an image that cannot be read. Its correction stays on disk.
        base = self._datastore.image_path()
        for image_id, obj in list(self._datastore.objects.items()):
            if obj.image.ext or image_id in (self._below or {}):
                continue
            path = os.path.join(base, self._filename(image_id, ""))
            if os.path.isdir(path) and not holds_dicom(path):
                logger.info("Removing image %s: its folder holds no DICOM files now", image_id)
                del self._datastore.objects[image_id]
                gone += 1
        return gone

    def _detach_labels_of_replaced_images(self) -> int:
        """Take out of the index the labels saved for an image whose file or folder holds
        another image now (a scan replaced on disk under the same name): the first one's
        correction was listed, shown and trained with the second. The listing
        (`_labels_of_their_images`) then leaves them out; their files stay on disk."""
        detached = 0
        for image_id, obj in self._datastore.objects.items():
            for tag in list(obj.labels):
                if self._saved_for_a_replaced_image(image_id, obj, tag):
                    del obj.labels[tag]
                    detached += 1
        return detached

    def _saved_for_a_replaced_image(self, image_id: str, obj, tag: str) -> bool:
        """Whether the `tag` label attached to an image was saved for the image file or folder
        the id names while it held other content (its kept record says so, and the label file
        is the one kept with it)."""
        label_path = self._datastore.label_path(tag)
        image = self._filename(image_id, obj.image.ext)
        kept = kept_label_record(label_path, image_id, None)
        if kept is None or kept.get("image") != image:
            return False
        kept = self._with_image_content(label_path, image_id, kept, image)
        if not self._image_replaced(kept, image):
            return False
        label_file = os.path.join(label_path, self._filename(image_id, obj.labels[tag].ext))
        return kept_label_record(label_path, image_id, label_file) is not None

    def _labels_of_their_images(self, label_path: str, found: dict[str, str]) -> dict[str, str]:
        """The label files MONAI Label may attach to the images listed under their ids, less
        those kept (`keep_label_info`) as saved for another image file or folder than the one
        the id names now (a CD series' correction, its id then taken by a file `cd.nii.gz`,
        was listed on that file), or for other content than that file or folder holds now (an
        image replaced on disk under its name). Such a label stays on disk, unlisted, and the
        log says so; a new label saved for the image sets it aside (`set_aside`). A label whose
        image is gone is said once too (MONAI Label warned at every refresh).
        Only labels not yet attached are looked at (each is hashed); the info kept for those
        that stay goes to `_add_non_existing_labels`, which attaches them."""
        kept_apart = {}
        self._found_again = {}
        for name in list(found):
            image_id, _ = self._to_id(name)
            obj = self._datastore.objects.get(image_id)
            if obj is None and self.series_folders:
                # its image is gone (moved out, deleted): MONAI Label logged that at every
                # refresh, which each file copied into the studies folder sets off
                kept_apart[found.pop(name)] = (
                    f"has no image: nothing in the studies folder has the id '{image_id}' now; "
                    "it is kept on disk, and listed again when its image is back.")
                continue
            if obj is None or obj.labels.get(os.path.basename(label_path)):
                continue
            kept = kept_label_record(label_path, image_id, os.path.join(label_path, name))
            image = self._filename(image_id, obj.image.ext)
            if kept is None:
                continue
            if kept.get("image") != image:
                saved_for = f"the image {kept.get('image')}, not {image}, which its id names now"
            elif self._image_replaced(
                    self._with_image_content(label_path, image_id, kept, image), image):
                saved_for = f"another image than the {image} there now (it was replaced)"
            else:
                saved_for = ""
            if saved_for:
                kept_apart[found.pop(name)] = (f"was saved for {saved_for}; it is kept on disk "
                                               "and not listed with it.")
            else:
                self._found_again[image_id] = kept["info"]
        said = {key: text for key, text in self._kept_apart.items() if key[0] != label_path}
        for name, why in kept_apart.items():
            where = os.path.relpath(os.path.join(label_path, name), self._datastore.image_path())
            text = f"The label {where} {why}"
            if (label_path, name) not in self._kept_apart:
                logger.warning(text)
            said[label_path, name] = text
        self._kept_apart = said
        return found

    def _add_non_existing_labels(self, tag) -> int:
        self._found_again = {}
        added = super()._add_non_existing_labels(tag)
        # a label MONAI Label just listed with no info (it found the file again after its
        # image left the index) gets back the info kept beside it when it was saved, as its
        # listing read it (`_labels_of_their_images`, which leaves out a label saved for
        # another image)
        for image_id, kept in self._found_again.items():
            obj = self._datastore.objects.get(image_id)
            label = obj.labels.get(tag) if obj is not None else None
            if label is None or "label_info" in label.info:
                continue
            label.info = {**kept, "ts": label.info.get("ts"), "name": label.info.get("name")}
            logger.info("The %s label of %s was found again; its names are back: %s", tag,
                        image_id, [e.get("name") for e in kept.get("label_info") or []])
            added += 1
        self._found_again = {}
        return added

    def _look_below(self) -> None:
        self._below, self._below_notes = self.series_below()
        # the index names the folder each id is read from now, which the next look goes by
        # (a split series left with one folder is read from it, not from links, and its id
        # would else be retired with the links)
        for image_id, folder in self._below.items():
            obj = self._datastore.objects.get(image_id)
            if obj is not None and not obj.image.ext and obj.image.info.get("name") != folder:
                obj.image.info["name"] = folder
                self._moved_folders += 1

    def below_notes(self) -> list[str]:
        """series_below's sentences as the last refresh found them (looked up now if none has
        run: a read-only datastore never refreshes)."""
        if self._below is None:
            self._look_below()
        return list(self._below_notes)

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        """`GET /datastore/dataset`: a ZIP, in the temporary folder, of the images with a final
        label, their labels, each label's structure names and the index (`files.
        write_dataset_zip`); `limit_cases` N: the first N of them by id. MONAI Label 0.8.5
        wrote a series folder as one empty entry, and with no final label yet answered 500."""
        if limit_cases is not None and limit_cases < 1:
            raise RequestError(f"limit_cases must be a number of images >= 1, not {limit_cases}; "
                               "leave it out for all.")
        # the PACS's new SEGs imported (and its labelled series fetched) first, with no lock
        # held: corrections go on being saved meanwhile
        cases = sorted((self._to_id(os.path.basename(d["label"]))[0], d["image"], d["label"])
                       for d in self.datalist()
                       if os.path.exists(d["image"]) and os.path.exists(d["label"]))
        if not cases:
            raise RequestError("no image has a final label yet, so there is no dataset to "
                               "download; corrections sent from Slicer become final labels.",
                               status_code=404)
        with self._mutex:
            metadata = self._datastore.model_dump_json(exclude={"base_path"})
        return write_dataset_zip(cases[:limit_cases], self._datastore.image_path(),
                                 os.path.join(self._datastore.label_path(DefaultLabelTag.FINAL),
                                              INFO_DIR), metadata)

    def _filename(self, id: str, ext: str) -> str:
        # an image id of a series below a folder (no extension, unlike every label) names the
        # folder its files are in, which MONAI Label's index and uri look-ups then find
        if not ext and self.series_folders:
            if self._below is None:  # a read-only datastore, which never refreshes
                self._look_below()
            if id in self._below:
                return self._below[id]
        return super()._filename(id, ext)

    def _folders(self) -> list[tuple[str, str]]:
        """(name, path) of each folder directly in the studies folder, but hidden ones and the
        labels folder: where a series folder may be."""
        base = self._datastore.image_path()
        labels = os.path.realpath(self._datastore.label_path(None))
        return [(name, os.path.join(base, name)) for name in sorted(os.listdir(base))
                if not name.startswith(".") and os.path.isdir(os.path.join(base, name))
                and os.path.realpath(os.path.join(base, name)) != labels]

    def series_below(self) -> tuple[dict[str, str], list[str]]:
        """The series in folders of the studies folder that hold DICOM files only in folders
        below them (a CD export: DICOMDIR beside DICOM/ST0/SE0/IM0...): ({image id: the folder
        its files are in, relative to the studies folder}, sentences for the log at start).

        A top folder with one such folder is served under its own name; with several, each is
        `<top>_<the parts of its path after the ones they share>` (DICOM/ST0/SE0 and
        DICOM/ST0/SE1 in `cd` are `cd_SE0` and `cd_SE1`). An id once given is kept while its
        folder is there (the index records the folder): a second series copied into `cd` made
        the first `cd_SE0`, and the correction stored under `cd` lost its image. An id whose
        folder is gone is given to no other folder (its correction would then belong to
        another image), nor is an id another entry of the studies folder takes (a file
        `cd.nii.gz` beside `cd/`): such a series gets the long form `<top>_<its path's parts>`.
        A series whose files lie in several folders (some exporters split long series) is one
        image, named as its first folder, read from `STUDIES/.joined/<top>_<first folder>/`:
        links to its files, kept in step with the folders at each look. A series whose long
        id is taken too or not a valid id, or whose files could not be linked, is not served,
        and the sentences say why."""
        ids: dict[str, str] = {}
        notes: list[str] = []
        joined: set[str] = set()  # the folders of links made for split series this time
        base = self._datastore.image_path()
        entries = os.listdir(base)
        # folder (relative to the studies folder) -> the id the index gives it
        known = {str(obj.image.info.get("name")): image_id
                 for image_id, obj in self._datastore.objects.items() if not obj.image.ext}
        retired = {image_id for folder, image_id in known.items()
                   if not os.path.isdir(os.path.join(base, folder))}
        for name, top in self._folders():
            if holds_dicom(top):
                continue
            folders = []
            for folder, dirs, _files in os.walk(top):
                dirs.sort()
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                if folder != top and holds_dicom(folder):
                    folders.append(os.path.relpath(folder, top))
            if not folders:
                continue
            # ids of what is served beside it: the other entries, the ids given so far
            taken = {self._to_id(entry)[0] for entry in entries if entry != name} | set(ids)
            uids: dict[str, list[str]] = {}
            listed: dict[str, list[Path]] = {}  # folder -> its DICOM files (for the links)
            for rel in folders:
                try:
                    listed[rel] = series_files(os.path.join(top, rel))
                    ds = pydicom.dcmread(listed[rel][0], stop_before_pixels=True)
                    uid = str(ds.get("SeriesInstanceUID") or rel)
                except Exception:  # unreadable (refused with its reason when asked) or just gone
                    uid = rel
                uids.setdefault(uid, []).append(rel)
            # a series whose files lie in several folders (some exporters split long series)
            # is one image, named by its first folder and read from links to all its files
            groups = {rels[0]: rels for rels in uids.values()}
            said = []
            whole = [rel for rel in folders if rel in groups]
            parts = [rel.split(os.sep) for rel in whole]
            shared = 0
            while (len(parts) > 1 and all(len(p) > shared + 1 for p in parts)
                   and len({p[shared] for p in parts}) == 1):
                shared += 1
            served = []
            for rel, p in zip(whole, parts):
                rels = groups[rel]
                folder = os.path.relpath(os.path.join(top, rel), base)
                if len(rels) > 1:
                    folder = os.path.join(JOINED_DIR, series_id("_".join([name, *rel.split(
                        os.sep)]), 128))
                    try:
                        _link_files_into(os.path.join(base, folder), [listed[r] for r in rels])
                    except OSError as e:
                        said.append(f"{name}: the files of one series lie in {len(rels)} "
                                    f"folders ({', '.join(rels[:3])}"
                                    f"{', ...' if len(rels) > 3 else ''}) and could not be linked "
                                    f"into one ({e}), so it is not served; `citrusv sort-dicom "
                                    f"{name} <the studies folder>` puts each series of {name} "
                                    "in one folder.")
                        continue
                    joined.add(folder)
                image_id = known.get(folder) or (name if len(whole) == 1 else "")
                if not image_id or image_id in retired or image_id in taken:
                    # the long form: a file `cd.nii.gz` beside `cd/` takes the id `cd`
                    image_id = series_id("_".join([name, *p[shared:]]))
                if image_id in taken or image_id in ids or not IMAGE_ID.match(image_id):
                    said.append(f"{name}: the series in {rel} is not served, since its id "
                                 f"'{image_id}' is taken or not a valid id; rename {name}.")
                    continue
                ids[image_id] = folder
                served.append(f"{image_id} ({rel})" if len(rels) == 1 else
                              f"{image_id} ({' + '.join(rels)}: one series in {len(rels)} folders)")
            if served:
                notes.append(f"{name} holds DICOM files in folders below it (a CD or DICOMDIR "
                             f"export?): served as {', '.join(served)}.")
            notes += said
        _remove_stale_joins(os.path.join(base, JOINED_DIR), joined)
        return ids, notes

    def loose_series(self) -> dict[str, int]:
        """DICOM files directly in the studies folder that are slices of one series
        ({SeriesInstanceUID: files}, two or more with a slice position; radiographs have none,
        and two views may share a series): each is served as an image of its own (a CT exported
        into the studies folder itself gave 133 one-slice images)."""
        counts: dict[str, int] = {}
        base = self._datastore.image_path()
        for name in os.listdir(base):
            path = os.path.join(base, name)
            if not is_dicom_file(path):
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if ds.get("ImagePositionPatient") is not None:
                uid = str(ds.get("SeriesInstanceUID"))
                counts[uid] = counts.get(uid, 0) + 1
        return {uid: n for uid, n in counts.items() if n > 1 and uid != "None"}

    def remove_image(self, image_id: str) -> None:
        if image_id not in self._datastore.objects:  # MONAI Label answered 500
            raise RequestError(f"image '{str(image_id)[:60]}' is not in the datastore; nothing "
                               "was removed.", status_code=404)
        with self._mutex:
            super().remove_image(image_id)

    def _on_moved_event(self, event) -> None:
        if os.path.realpath(getattr(event, "dest_path", "")) == os.path.realpath(
                self._datastore_config_path):
            try:  # a no-op for this process's own writes (mtime)
                self._init_from_datastore_file()
            except Exception:  # the watcher's thread: raised, it would end it
                logger.exception("Reading the datastore index again after it was replaced "
                                 "failed.")

    def _reload_index(self) -> None:
        """Re-read the index if another process (the server, or its training run, which imports
        PACS SEGs) replaced it since this one last read or wrote it, so a write under the lock
        never puts back an older index. The caller holds the lock."""
        try:
            ts = os.stat(self._datastore_config_path).st_mtime
        except OSError:
            return
        if ts != self._config_ts:
            with open(self._datastore_config_path) as f:
                fresh = LocalDatastoreModel.model_validate_json(f.read())
            fresh.base_path = self._datastore_path
            self._datastore, self._config_ts = fresh, ts

    def save_label(self, image_id: str, label_filename: str, label_tag: str,
                   label_info: dict[str, Any], decide: Decide | None = None) -> str:
        """Check, keep, merge and write a label (see the module text). `decide` (used by the PACS
        SEG import) sees the stored final label and the new one under the lock and returns the
        (label map, label info) to merge, or None to save nothing (it may note something in the
        stored label's info, which is then written); the return is "" then."""
        if image_id not in self._datastore.objects:
            raise RequestError(f"image '{image_id}' is not in the datastore; save the label for one "
                               "of the ids listed by GET /datastore/?output=all.", status_code=404)
        label_tag = label_tag or DefaultLabelTag.FINAL.value
        label_info = dict(label_info or {})
        label, image = self._check_label(image_id, label_filename, label_info)
        final = label_tag == DefaultLabelTag.FINAL.value
        incoming = label.array

        _, label_ext = self._to_id(os.path.basename(label_filename))
        if final or label_ext not in (".nii.gz", ".nii", ".nrrd"):
            label_ext = ".nii.gz"  # a final label is written by write_label after the merge
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        dest = os.path.join(label_path, name)
        tmp = os.path.join(label_path, f".{name}.{uuid.uuid4().hex}.part")

        with self._mutex, FileLock(self._lock_file):
            self._reload_index()
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise RequestError(f"image '{image_id}' was removed from the datastore meanwhile; "
                                   "nothing was saved.", status_code=404)
            os.makedirs(label_path, exist_ok=True)
            previous = obj.labels.get(label_tag)
            image_file = self._filename(image_id, obj.image.ext)
            # what identifies the image this label is for (kept with the label and with each
            # correction as sent: `history.py restore` sends none to an image since replaced)
            content = self._image_content(os.path.join(self._datastore.image_path(), image_file)
                                          ) if self.check_image_content else {}
            if previous is not None and self._saved_for_a_replaced_image(image_id, obj, label_tag):
                # replaced with no refresh since (a watcher misses a network folder's changes):
                # merged into, the first image's structures would land on this one
                del obj.labels[label_tag]
                previous = None
            kept_file = label_filename
            if decide is not None:
                decided = decide(previous, incoming, label_info)
                if decided is None:
                    self._update_datastore_file(lock=False)
                    return ""
                if decided[0] is not incoming:  # keep what is merged, not the whole SEG
                    kept_file = write_label(image, decided[0])
                incoming, label_info = decided
            if final:
                try:
                    keep_submission(label_path, image_id, kept_file, {
                        **{k: label_info[k] for k in KEPT_KEYS if label_info.get(k) is not None},
                        **{k: content[k] for k in ("image_sha256",) if k in content}})
                finally:
                    if kept_file != label_filename:
                        os.unlink(kept_file)
            if final and previous is not None:
                for key in CARRIED_KEYS:  # what the server keeps of a label's PACS SEGs
                    if previous.info.get(key) and key not in label_info:
                        label_info[key] = previous.info[key]
            if previous is None and os.path.exists(dest):  # kept apart (kept as sent first)
                moved = set_aside(label_path, image_id, name)
                self._kept_apart.pop((label_path, name), None)
                logger.warning("The %s label file %s, not listed with %s, was moved to %s before "
                               "the new one took its name.", label_tag, name, image_id,
                               os.path.join(label_path, moved))
            merged = None  # the merged final label, written outside labels/ first
            try:
                if final:
                    stored = self._stored_final(image_id, previous, incoming.shape)
                    array, entries = _merge_final(stored, incoming, label_info)
                    label_info["label_info"] = entries
                    label_info["label_values"] = [e["idx"] for e in entries]
                    for key in SUBMISSION_KEYS + SENDER_KEYS:  # now in the entries they set
                        label_info.pop(key, None)
                    merged = write_label(image, array)
                fsync_copy(merged or label_filename, tmp)
                os.replace(tmp, dest)
            finally:
                for path in (tmp, merged):
                    if path and os.path.exists(path):
                        os.unlink(path)
            fsync_dir(label_path)
            if previous is not None and previous.ext and previous.ext != label_ext:
                stale = os.path.join(label_path, self._filename(image_id, previous.ext))
                if os.path.exists(stale):
                    os.unlink(stale)
            label_info["ts"] = int(time.time())
            label_info["name"] = name
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
            self._update_datastore_file(lock=False)
            try:
                keep_label_info(label_path, image_id, dest, label_info, image=image_file,
                                image_content=content)
            except OSError as e:  # the index has it; only a lost index would need this copy
                logger.warning("The info of the %s label of %s was not kept beside it: %s",
                               label_tag, image_id, e)
        logger.info("Saved %s label for %s: %s", label_tag, image_id, label_info.get("label_info"))
        return image_id

    def _stored_final(self, image_id: str, previous: DataModel | None, shape: tuple):
        """(label array, label info) of the final label already stored, or None (none, or one
        that cannot be merged into: unreadable, or not of the image's shape, e.g. a file put
        into labels/final by hand; the new correction then replaces it, and the log says so)."""
        if previous is None or not previous.ext:
            return None
        path = os.path.join(self._datastore.label_path(DefaultLabelTag.FINAL.value),
                            self._filename(image_id, previous.ext))
        if not os.path.exists(path):
            return None
        try:
            array = read_study(path).array
        except (RequestError, OSError) as e:
            logger.warning("Final label of %s could not be read to merge into (%s); it is "
                           "replaced", image_id, e)
            return None
        if tuple(array.shape) != tuple(shape):
            logger.warning("Final label of %s has shape %s, not the image's %s; it is replaced",
                           image_id, list(array.shape), list(shape))
            return None
        return array, dict(previous.info or {})

    def _check_label(self, image_id: str, label_filename: str,
                     label_info: dict) -> tuple[Study, Study]:
        """The label must be a readable map in the image's own index space; (label, image)."""
        try:
            label = read_study(label_filename)
        except RequestError as e:
            raise RequestError(f"The label file could not be read: {e.detail}") from e
        image = read_study(self.get_image_uri(image_id))
        if label.shape != image.shape:
            raise RequestError(
                f"The label has shape {list(label.shape)} but image '{image_id}' has "
                f"{list(image.shape)}; save the label in the image's own geometry.")
        if not image.is_2d:
            _check_same_grid(label.affine, image.affine, image_id)
        values = _label_values(np.asarray(label.array))
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
            _check_entries(info, values)
            label_info["label_info"] = info
        for where in [label_info, *(info or [])]:  # a bad one would fail every training run
            _check_submission(where)
        label_info["label_values"] = [v for v in values if v]
        return label, image

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            tmp = f"{self._datastore_config_path}.{os.getpid()}.part"
            try:
                with open(tmp, "w") as f:
                    f.write(json.dumps(self._datastore.model_dump(exclude={"base_path"}),
                                       indent=2, default=str))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._datastore_config_path)
            except OSError:  # a full disk: the index on disk stays the last whole one
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with self._mutex, FileLock(self._lock_file):
                write()
        else:
            write()


# DICOM objects a PACS lists as series that are not images to ask about
NON_IMAGE_MODALITIES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "DOC"}


# (stored final label or None, new label map, its label info) -> what to merge, or None
Decide = Callable[[DataModel | None, np.ndarray, dict], tuple[np.ndarray, dict] | None]

# kept from one final label to the next: the DICOM SEGs this server stored on the PACS for the
# image, and those of other tools it imported (each is imported once, never written back)
CARRIED_KEYS = ("pacs_segs_written", "pacs_segs_imported")
# label info only the server sets (main._record_who_corrected drops them from clients)
SERVER_KEYS = ("user", "SeriesInstanceUID", "pacs_error", "source", *CARRIED_KEYS)

SUBMISSION_KEYS = ("prompt", "window")  # what a one-structure correction says of its structure
# who sent a correction, recorded on every structure it sets: `user`, the signed-in user (set by
# the server when authentication is on, never by the client), or without sign-in `claimed_by`,
# the name the client gave (not checked by anyone; see main._record_who_corrected)
SENDER_KEYS = ("user", "claimed_by")
# what the kept copy of a final label records of what came with it
KEPT_KEYS = ("label_info", *SUBMISSION_KEYS, *SENDER_KEYS, "source", "SeriesInstanceUID")


MAX_NAME = 128  # characters of a structure name
IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a file name in the studies folder
EXAMPLE = "[{\"name\": \"liver\", \"idx\": 1}]"


def _label_values(array: np.ndarray) -> list[int]:
    """The values of a label map, which must be whole numbers 0..65535 (0: background)."""
    values = np.unique(array)
    if array.dtype.kind == "f" and not np.all(np.isfinite(values) & (values == np.round(values))):
        raise RequestError("The label holds values that are not whole numbers (a probability "
                           "map?); send a label map: 0 for background, 1, 2, ... per structure.")
    if len(values) and (values.min() < 0 or values.max() > 65535):
        raise RequestError(f"The label holds values from {values.min():g} to {values.max():g}; "
                           "label values must be 0 (background) to 65535.")
    return [int(v) for v in values]


def _check_entries(info: list[dict], values: list[int]) -> None:
    """Each entry names one label value (1..65535) with a non-empty name, once; and every value
    in the file is named. (An entry whose value is not in the file removes that structure.)"""
    names: set[str] = set()
    numbered: set[int] = set()
    for e in info:
        idx, name = e["idx"], e["name"]
        if isinstance(idx, str) and idx.strip().isdigit():
            idx = e["idx"] = int(idx)
        if isinstance(idx, bool) or not isinstance(idx, int) or not 1 <= idx <= 65535:
            raise RequestError(f"params.label_info idx {idx!r} of {name!r} must be a whole number "
                               "from 1 to 65535 (0 is the background).")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
            shown = repr(name[:40] + "…" if isinstance(name, str) and len(name) > 40 else name)
            raise RequestError(f"params.label_info name {shown} (idx {idx}) must be the "
                               f"structure's name, 1 to {MAX_NAME} characters.")
        key = name.strip().lower()
        if key in names or idx in numbered:
            raise RequestError(f"params.label_info names {name!r} or idx {idx} twice; give each "
                               f"structure one entry, e.g. {EXAMPLE}.")
        names.add(key)
        numbered.add(idx)
    unnamed = [v for v in values if v and v not in numbered]
    if unnamed:
        raise RequestError(f"The label has value(s) {', '.join(map(str, unnamed))} that "
                           f"params.label_info does not name; name each one, e.g. {EXAMPLE}.")


def _check_submission(where: dict) -> None:
    """The question and window that come with a correction (or one of its entries): what the
    fine-tune asks with them must be a valid question."""
    from citrusv.imaging import resolve_window  # the engine's own presets and rules

    prompt, window = where.get("prompt"), where.get("window")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > 4000):
        raise RequestError("params.prompt must be the question as text (at most 4000 "
                           "characters).")
    if window is not None and window not in ("", "auto"):
        try:
            resolve_window(window.strip().lower() if isinstance(window, str) else window)
        except ValueError as e:  # InputError: its sentence names the presets
            raise RequestError(f"params.window: {e}") from None


def _structures(array: np.ndarray, info: dict) -> dict[str, tuple[int, dict[str, Any]]]:
    """lower-case structure name -> (label value, its label_info entry) of one label map; the
    entry of a one-structure label takes the label's `prompt` and `window` (a merged label
    has none at the top: its entries carry their own)."""
    entries = {}
    for e in info.get("label_info") or []:
        try:
            entries[int(e["idx"])] = dict(e)
        except (KeyError, TypeError, ValueError):
            continue
    values = {int(v) for v in np.unique(array) if v} | set(entries)
    own = {k: info[k] for k in SUBMISSION_KEYS if info.get(k) is not None}
    sender = {k: info[k] for k in SENDER_KEYS if info.get(k) is not None}
    out: dict[str, tuple[int, dict[str, Any]]] = {}
    for v in sorted(values):
        e = entries.get(v, {})
        e["name"] = str(e.get("name") or f"label {v}")
        if len(entries) <= 1:  # a one-structure correction's question and window are its own
            e = {**own, **e}
        e.update(sender)
        out[e["name"].strip().lower()] = (v, e)
    return out


def _merge_final(stored: tuple[np.ndarray, dict] | None, new: np.ndarray,
                 new_info: dict) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The stored final label with the new one's structures put in (see the module text):
    (label map, label_info entries numbered 1..n, earlier structures first)."""
    now = int(time.time())
    incoming = _structures(new, new_info)
    earlier = {} if stored is None else _structures(*stored)
    merged = np.zeros(new.shape, dtype=np.uint16)
    entries: list[dict[str, Any]] = []
    sources = [(stored[0], v, e, False) for k, (v, e) in earlier.items() if k not in incoming]
    sources += [(new, v, e, True) for v, e in incoming.values()]
    for array, value, entry, is_new in sources:
        voxels = np.asarray(array) == value
        if not voxels.any():
            continue  # an empty structure in a correction removes it
        entry = {**entry, "idx": len(entries) + 1}
        if is_new:
            entry["ts"] = now
        merged[voxels] = entry["idx"]
        entries.append(entry)
    return (merged.astype(np.uint8) if len(entries) < 256 else merged), entries


def _check_same_grid(label_affine: np.ndarray, image_affine: np.ndarray, image_id: str) -> None:
    """A 3D label must lie on its image's voxels: same axis directions, and the two origins
    within half a voxel. Same shape but, say, the slices in the other order would otherwise
    be trained on as if aligned. (2D images are not checked: a radiograph has no patient
    geometry that viewers agree on.)"""
    lab, img = np.asarray(label_affine, float), np.asarray(image_affine, float)
    spacing = np.linalg.norm(img[:3, :3], axis=0)
    cosines = np.sum(lab[:3, :3] * img[:3, :3], axis=0) / (
        np.linalg.norm(lab[:3, :3], axis=0) * spacing)
    offset = np.abs(np.linalg.solve(img[:3, :3], lab[:3, 3] - img[:3, 3]))
    if np.any(cosines < 0.999) or np.any(offset > 0.5):
        raise RequestError(
            f"The label is not on the voxel grid of image '{image_id}' (IJK-to-RAS differs: axis "
            f"cosines {np.round(cosines, 3).tolist()}, origin {np.round(offset, 2).tolist()} voxels "
            "off); save the label in the image's own geometry.")


class PacsDatastore(DICOMWebDatastore, CorrectionsDatastore):
    """`--studies http(s)://pacs/dicom-web`: images come from the department's PACS.

    MONAI Label's DICOMweb datastore, changed for an on-prem server:
    - a final label (a radiologist's correction) is first written atomically to the local
      cache (`labels/final/`), which is what fine-tuning reads, and only then sent to the PACS
      as DICOM SEG; when the PACS refuses it the correction stays here and its label info says
      why (`pacs_error`), instead of the request failing and the correction being lost;
    - DICOM SEG is written with pydicom-seg, so nothing is downloaded (MONAI Label fetches
      dcmqi from GitHub for that);
    - the local corrections are never removed because the PACS has no SEG for them, and SEGs
      that other tools stored on the PACS are imported as final labels on the image's grid
      before training (`import_pacs_segs`), never over a label already here;
    - every image series is listed (not CT only; SEG and other non-image objects left out),
      and a series once fetched is served from the cache while the PACS is down.
    """

    series_folders = False  # its cache's series folders are not local images
    check_image_content = False
    _series_cache: tuple[float, list[str]] | None = None  # (when asked, series)
    cache_limit_bytes: int = 0  # 0: no limit; the app sets it from `--conf pacs_cache_gb`

    def _pacs_series(self) -> list[str]:
        """Image series on the PACS that match the search filter (SEG, SR and other non-image
        objects left out), asked again after `MONAI_LABEL_DICOMWEB_CACHE_EXPIRY` seconds."""
        now = time.monotonic()
        expiry = settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY
        if self._series_cache is None or now - self._series_cache[0] > expiry:
            found = [Dataset.from_json(ds) for ds in self._client.search_for_series(
                search_filters=self._search_filter, fields=["Modality"])]
            series = [str(ds.SeriesInstanceUID) for ds in found
                      if str(ds.get("Modality", "")) not in NON_IMAGE_MODALITIES]
            self._series_cache = (now, series)
        return self._series_cache[1]

    def list_images(self) -> list[str]:
        """The PACS's series; while the PACS does not answer, the series cached here (so /info
        and the other requests that count images go on working)."""
        try:
            series = self._pacs_series()
        except requests.RequestException as e:
            logger.warning("The PACS at %s did not answer (%s); listing the cached series only.",
                           self._client.base_url, e)
            self._pacs_answered = False
            return list(self._datastore.objects)
        self._pacs_answered = True
        return series

    def status(self) -> dict[str, Any]:
        """MONAI Label's counts (`/info/` "datastore") plus, under "pacs", what an admin
        watches: whether the PACS answered the last series search and how full the cache is."""
        out = super().status()  # lists the images, so `_pacs_answered` is current
        total, series = self._cache_usage()
        out["pacs"] = {"url": self._client.base_url,
                       "reachable": bool(getattr(self, "_pacs_answered", False)),
                       "cached_series": len(series), "cache_bytes": total,
                       "cache_limit_bytes": self.cache_limit_bytes}
        return out

    def _cache_usage(self) -> tuple[int, list[tuple[float, int, str]]]:
        """Bytes of the PACS series in the cache (DICOM files + NIfTI) and, per series,
        (last asked, bytes, id). Uploads (no series folder) are not counted."""
        total, series = 0, []
        for image_id in list(self._datastore.objects):
            series_dir = self._series_dir(image_id)
            if not os.path.isdir(series_dir):
                continue  # an upload
            size = _tree_bytes(series_dir) + _tree_bytes(self._nifti_path(image_id))
            total += size
            series.append((os.stat(series_dir).st_mtime, size, image_id))
        return total, series

    def _on_pacs(self, image_id: str) -> bool:
        try:
            return image_id in self._pacs_series()
        except requests.RequestException as e:
            raise RequestError(f"The PACS at {self._client.base_url} did not answer ({e}); check "
                               "that it is running and reachable from this server.",
                               status_code=503) from e

    def _series_dir(self, image_id: str) -> str:
        """Where MONAI Label's DICOMweb datastore keeps the fetched instances of a series."""
        return os.path.join(self._datastore.image_path(), image_id)

    def get_image_uri(self, image_id: str) -> str:
        """A PACS series from the cache: fetched once, then served from there even while the
        PACS is down; '' when the PACS has no such series. A series of one instance (a
        radiograph) is served as its DICOM file, not as the NIfTI that MONAI Label converts it
        to: the NIfTI drops Modality and the 2D-ness, so the radiograph would answer as a
        one-slice volume with its scaling guessed from the values."""
        uri = ""
        if image_id in self._datastore.objects:
            cached = LocalDatastore.get_image_uri(self, image_id)
            if cached and os.path.exists(cached):
                uri = cached
        series_dir = self._series_dir(image_id)
        if uri and os.path.isdir(series_dir):
            os.utime(series_dir)  # last asked: the cache keeps the recently asked series
        if not uri:
            if not self._on_pacs(image_id):
                return ""
            uri = super().get_image_uri(image_id)
            self.evict_over_limit(keep=image_id)
        instances = sorted(os.listdir(series_dir)) if os.path.isdir(series_dir) else []
        if len(instances) == 1:
            return os.path.join(series_dir, instances[0])
        if instances and _radiograph(os.path.join(series_dir, instances[0])):
            # radiographs sharing a series (a PA and a lateral view): MONAI Label's NIfTI
            # stacks them as the slices of a volume; reading the folder says why it is refused
            return series_dir
        return uri

    def evict_over_limit(self, keep: str = "") -> list[str]:
        """Keep the cache under `cache_limit_bytes`: the PACS series asked least recently are
        removed (their DICOM files and NIfTI) until it fits; they are fetched again when asked.
        Never removed: `keep` (the series being served), a series with a final label (training
        reads it), an image uploaded by Slicer (not on the PACS, so its only copy). Returns
        the removed series."""
        if not self.cache_limit_bytes:
            return []
        total, series = self._cache_usage()
        objects = self._datastore.objects
        candidates = [entry for entry in series if entry[2] != keep and entry[2] in objects
                      and DefaultLabelTag.FINAL.value not in objects[entry[2]].labels]
        evicted = []
        for _, size, image_id in sorted(candidates):
            if total <= self.cache_limit_bytes:
                break
            with self._mutex, FileLock(self._lock_file):
                shutil.rmtree(self._series_dir(image_id), ignore_errors=True)
                if os.path.exists(self._nifti_path(image_id)):
                    os.unlink(self._nifti_path(image_id))
                self._datastore.objects.pop(image_id, None)
                self._update_datastore_file(lock=False)
            total -= size
            evicted.append(image_id)
        if evicted:
            logger.info("PACS cache over %.1f GB: removed %d least recently asked series (%s)",
                        self.cache_limit_bytes / 1e9, len(evicted), ", ".join(evicted))
        if total > self.cache_limit_bytes:
            logger.warning("PACS cache holds %.1f GB, over its %.1f GB limit: the rest is the "
                           "series being served and series with labels (kept for training).",
                           total / 1e9, self.cache_limit_bytes / 1e9)
        return evicted

    def _nifti_path(self, image_id: str) -> str:
        return os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz")

    def save_label(self, image_id: str, label_filename: str, label_tag: str,
                   label_info: dict[str, Any], label_id: str = "") -> str:
        if not self.get_image_uri(image_id):  # fetches the series into the cache
            raise RequestError(f"image '{image_id}' is not a series on the PACS; save the label "
                               "for a SeriesInstanceUID that the PACS lists.", status_code=404)
        label_info = dict(label_info or {})
        saved = CorrectionsDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        if (label_tag or DefaultLabelTag.FINAL.value) != DefaultLabelTag.FINAL.value:
            return saved
        info = self.get_label_info(image_id, DefaultLabelTag.FINAL.value)
        uid, error = None, None
        try:
            seg_file = nifti_to_dicom_seg(self._series_dir(image_id), self.get_label_uri(image_id, label_tag),
                                          _seg_label_info(info), use_itk=False)
            if not seg_file:
                raise ValueError("the label is empty, so there is no DICOM SEG to send")
            try:
                uid = str(dicom_web_upload_dcm(seg_file, self._client))
            finally:
                os.unlink(seg_file)
        except Exception as e:  # the PACS copy is best effort; the correction is already safe
            logger.error("Correction for %s kept locally; the PACS did not take it: %s", image_id, e)
            error = f"{type(e).__name__}: {e}"
        with self._mutex, FileLock(self._lock_file):
            self._reload_index()  # another correction or import may have landed meanwhile
            info = self._datastore.objects[image_id].labels[DefaultLabelTag.FINAL.value].info
            if uid:
                info["SeriesInstanceUID"] = uid
                info["pacs_segs_written"] = sorted(set(info.get("pacs_segs_written") or []) | {uid})
                info.pop("pacs_error", None)
            else:
                info["pacs_error"] = error
            self._update_datastore_file(lock=False)
        return saved

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        return LocalDatastore.get_label_uri(self, image_id or label_id, label_tag)

    def get_labeled_images(self, label_tag: str | None = None,
                           labels: list[str] | None = None) -> list[str]:
        return LocalDatastore.get_labeled_images(self, label_tag, labels)

    def get_unlabeled_images(self, label_tag: str | None = None,
                             labels: list[str] | None = None) -> list[str]:
        labeled = set(self.get_labeled_images())
        return [i for i in self.list_images() if i not in labeled]

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """The local images and labels, after importing new SEGs from the PACS."""
        self.import_pacs_segs()
        return LocalDatastore.datalist(self, full_path)

    def import_pacs_segs(self) -> list[str]:
        """Final labels from DICOM SEGs that other tools stored on the PACS (as MONAI Label's
        DICOMweb datastore uses them), resampled onto their image's voxel grid. Each SEG is
        imported once; SEGs this server wrote are skipped. A series without a final label here
        gets the SEG's structures. A series with one gets only the SEG's structures that no
        label of it ever named (neither the stored label nor any kept correction or import):
        what radiologists drew, re-drew or removed stays as they left it. A PACS that does not
        answer, or a SEG that cannot be read, is logged and left out: training goes on with
        what is here. Returns the image series whose label changed."""
        try:
            found = [Dataset.from_json(ds) for ds in self._client.search_for_series(
                search_filters={"Modality": "SEG"}, fields=["StudyInstanceUID"])]
            images = set(self._pacs_series())
        except requests.RequestException as e:
            logger.warning("The PACS did not answer (%s); no new DICOM SEGs imported.", e)
            return []
        with self._mutex, FileLock(self._lock_file):
            self._reload_index()  # the server's latest corrections and their SEGs
        done: set[str] = set()  # SEGs written here or imported before
        for obj in self._datastore.objects.values():
            final = obj.labels.get(DefaultLabelTag.FINAL.value)
            if final is not None:
                done.add(str(final.info.get("SeriesInstanceUID")))
                for key in CARRIED_KEYS:
                    done.update(str(u) for u in final.info.get(key) or [])
        imported = []
        for seg in found:
            seg_uid = str(seg.SeriesInstanceUID)
            if seg_uid in done:
                continue
            try:
                image_id = self._import_seg(str(seg.StudyInstanceUID), seg_uid, images)
            except Exception as e:  # one bad SEG must not stop training on the others
                logger.warning("DICOM SEG %s on the PACS not imported: %s", seg_uid, e)
                continue
            if image_id:
                imported.append(image_id)
        return imported

    def _import_seg(self, study_uid: str, seg_uid: str, images: set[str]) -> str | None:
        (ds, *_) = self._client.retrieve_series(study_uid, seg_uid)
        refs = ds.get("ReferencedSeriesSequence") or []
        image_id = str(refs[0].SeriesInstanceUID) if refs else ""
        if image_id not in images:
            logger.info("DICOM SEG %s references no image series listed here (%r); skipped.",
                        seg_uid, image_id)
            return None
        study = read_study(self.get_image_uri(image_id))  # fetches the series into the cache
        label, label_info = _seg_to_label(ds, study)
        source = f"DICOM SEG {seg_uid} on the PACS"

        def decide(stored: DataModel | None, array: np.ndarray, _info: dict):
            # under the datastore lock, on the index as it is now
            if stored is None:
                return array, {"label_info": label_info, "SeriesInstanceUID": seg_uid,
                               "source": source, "pacs_segs_imported": [seg_uid]}
            imported = sorted(set(stored.info.get("pacs_segs_imported") or []) | {seg_uid})
            named = self._named_structures(image_id, stored)
            new = [e for e in label_info if e["name"].strip().lower() not in named]
            if not new:
                stored.info["pacs_segs_imported"] = imported
                logger.info("DICOM SEG %s adds nothing to series %s: its label names each of "
                            "the SEG's structures %s already.", seg_uid, image_id,
                            [e["name"] for e in label_info])
                return None
            return (np.where(np.isin(array, [e["idx"] for e in new]), array, 0),
                    {"label_info": [{**e, "source": source} for e in new],
                     "pacs_segs_imported": imported})

        path = write_label(study, label)
        try:
            saved = CorrectionsDatastore.save_label(self, image_id, path,
                                                    DefaultLabelTag.FINAL.value, {}, decide)
        finally:
            os.unlink(path)
        if saved:
            logger.info("Imported DICOM SEG %s into the final label of %s", seg_uid, image_id)
        return saved or None

    def _named_structures(self, image_id: str, stored: DataModel) -> set[str]:
        """Lower-case names of every structure the image's stored final label has or any kept
        correction or import of it named (a removed structure too)."""
        records = [stored.info, *kept_records(
            self._datastore.label_path(DefaultLabelTag.FINAL.value), image_id)]
        return {str(e.get("name", "")).strip().lower() for r in records
                for e in r.get("label_info") or [] if isinstance(e, dict)}


def _link_files_into(dest: str, folders: list[list[Path]]) -> None:
    """Make `dest` hold a link to each DICOM file of `folders` (their `series_files`), named
    `<folder number>_<name>` (the folders of a split series may reuse names), and nothing else;
    links already right are left as they are (a second process, the training run, may keep
    them too)."""
    want = {f"{i}_{path.name}": str(path) for i, files in enumerate(folders) for path in files}
    os.makedirs(dest, exist_ok=True)
    for entry in os.scandir(dest):
        if not entry.is_symlink() or want.get(entry.name) != os.readlink(entry.path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
    have = set(os.listdir(dest))
    for name, target in want.items():
        if name not in have:
            try:
                os.symlink(target, os.path.join(dest, name))
            except FileExistsError:
                if os.readlink(os.path.join(dest, name)) != target:
                    raise


def _remove_stale_joins(root: str, keep: set[str]) -> None:
    """Remove the folders of links under `root` (`JOINED_DIR`) made for split series that are
    not there any more (the links only; the series' files are elsewhere)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if os.path.join(JOINED_DIR, name) not in keep:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _radiograph(path: str) -> bool:
    """Whether a DICOM file is an image without a slice position (a radiograph)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return False  # MONAI Label's conversion says what is wrong with it
    return ds.get("ImagePositionPatient") is None and not ds.get("PerFrameFunctionalGroupsSequence")


def _tree_bytes(path: str) -> int:
    """Bytes in a file, or in all files under a folder (0 if it is not there)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def _seg_to_label(ds: Dataset, study: Study) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A DICOM SEG as a label map ([z, y, x]) on the study's voxel grid, one value per segment
    (in segment-number order), and its label info (segment names, lower case)."""
    result = pydicom_seg.SegmentReader().read(ds)
    m = LPS_TO_RAS @ study.affine  # its own inverse: RAS -> LPS, ITK's frame
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    reference = sitk.Image(*[int(v) for v in study.shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing([float(v) for v in spacing])
    reference.SetOrigin([float(v) for v in m[:3, 3]])
    reference.SetDirection([float(v) for v in (m[:3, :3] / spacing).ravel()])
    label = np.zeros(study.shape, dtype=np.uint8)
    label_info = []
    for value, number in enumerate(sorted(result.available_segments), start=1):
        on_grid = sitk.Resample(result.segment_image(number), reference, sitk.Transform(),
                                sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        label[sitk.GetArrayFromImage(on_grid).reshape(study.shape) > 0] = value
        name = str(result.segment_infos[number].get("SegmentLabel") or "").strip().lower()
        if not name or any(e["name"] == name for e in label_info):  # unnamed, or named twice
            name = f"{name or 'segment'} {number}".strip()
        label_info.append({"name": name[:MAX_NAME], "idx": value})
    return label, label_info


def _seg_label_info(info: dict[str, Any]) -> list[dict[str, Any]]:
    """Segment names for the DICOM SEG, in label-value order (from the saved label info)."""
    names = {int(i["idx"]): str(i["name"]) for i in info.get("label_info") or []}
    return [{"name": names.get(v, f"label {v}"), "model_name": "Citrus-V correction",
             "description": "Corrected in 3D Slicer"} for v in info.get("label_values", [])]
