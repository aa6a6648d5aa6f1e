"""`citrusv sort-dicom SRC DEST`: DICOM files as they come (a CD or DICOMDIR export, a study
exported into one folder, series split over folders) put into a studies folder the way the
server serves them: a folder per CT/MR series, one file per radiograph or multi-frame image.

The server serves a folder of one series as one volume and refuses a folder that mixes series
(their slices would interleave); exports often mix them (a scout, the axial series and its
reformats in one folder) or split one series over several folders. This reads every file's
header once, groups the images by SeriesInstanceUID and copies (or hard-links) them:

- a series of one file (a radiograph, an enhanced multi-frame CT) -> `DEST/<id>.dcm`;
- a series of slices, each with a position -> `DEST/<id>/IM0000.dcm ...` (renamed in slice
  order, so files of one series from several folders never collide);
- several images without a position (a PA and a lateral view in one series) ->
  `DEST/<id>_1.dcm`, `DEST/<id>_2.dcm`, ...

`<id>` is `NAME_<SeriesNumber>` (NAME: `--name`, else SRC's folder name; NAME alone when SRC
holds one series). Each target is written under a hidden name and renamed into place, so a
running server never lists half a series. Nothing is overwritten: a target that exists stops
the command before it writes anything. Files that are not DICOM images (DICOMDIR, reports,
presentation states, other files) are left out and counted.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
MAX_ID = 100  # the server takes ids of up to 128 characters; room for "_<k>.dcm"


@dataclass
class Series:
    uid: str
    number: str = ""
    description: str = ""
    modality: str = ""
    # (instance order key, position along the slice normal or None, path)
    files: list[tuple[tuple, float | None, Path]] = field(default_factory=list)

    @property
    def positioned(self) -> bool:
        return all(position is not None for _, position, _ in self.files)

    @property
    def kind(self) -> str:
        """"file" (one file), "folder" (slices with positions) or "files" (images without)."""
        if len(self.files) == 1:
            return "file"
        return "folder" if self.positioned else "files"


@dataclass
class Sorted:
    series: list[tuple[str, Series]]  # (id, series), in the order written
    skipped: int  # files that are not DICOM images


def _header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:
        if path.suffix.lower() not in (".dcm", ".dicom", ".ima"):
            return None
        try:  # a DICOM file without the 128-byte preamble, as old exports write them
            return pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        except Exception:
            return None


def find_series(src: Path) -> tuple[list[Series], int]:
    """Every DICOM image below `src`, grouped by series; and how many files were left out."""
    groups: dict[str, Series] = {}
    skipped = 0
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            ds = None if name.startswith(".") or name.upper() == "DICOMDIR" else _header(path)
            uid = str(ds.get("SeriesInstanceUID", "") or "") if ds is not None else ""
            if ds is None or not uid or ds.get("Rows") is None:  # no image: SR, KO, DICOMDIR
                skipped += 1
                continue
            series = groups.setdefault(uid, Series(
                uid, str(ds.get("SeriesNumber", "") or "").strip(),
                str(ds.get("SeriesDescription", "") or "").strip(),
                str(ds.get("Modality", "") or "").strip()))
            number = ds.get("InstanceNumber")
            key = (float(number) if str(number or "").strip() else float("inf"), str(path))
            series.files.append((key, _along_normal(ds), path))
    return list(groups.values()), skipped


def _along_normal(ds) -> float | None:
    """Where an image lies along its slice normal (mm), None without a slice position."""
    import numpy as np

    position = ds.get("ImagePositionPatient")
    if position is None:
        return None
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    return float(np.dot(np.cross(iop[:3], iop[3:]), [float(v) for v in position]))


def _slice_order(series: Series) -> list[Path]:
    """Files of a series of slices along the slice normal (instance order otherwise)."""
    key = (lambda f: (f[1], str(f[2]))) if series.kind == "folder" else (lambda f: f[0])
    return [path for _, _, path in sorted(series.files, key=key)]


def series_id(text: str, limit: int = MAX_ID) -> str:
    """An image id made of a folder name (or of a path's parts joined by "_"): each run of
    characters other than letters, digits, "_" and "-" becomes one "-", none at either end,
    at most `limit` characters. The server names the series of a CD export this way too."""
    return (ID_CHARS.sub("-", text).strip("-_") or "series")[:limit]


def _ids(series: list[Series], name: str) -> list[str]:
    base = series_id(name, MAX_ID - 12)
    if len(series) == 1:
        return [base]
    numbers = [s.number for s in series]
    unique = all(numbers) and len(set(numbers)) == len(numbers)
    return [f"{base}_{ID_CHARS.sub('-', s.number) if unique else i}"
            for i, s in enumerate(series, start=1)]


def _targets(dest: Path, image_id: str, series: Series) -> list[Path]:
    if series.kind == "file":
        return [dest / f"{image_id}.dcm"]
    if series.kind == "folder":
        return [dest / image_id]
    return [dest / f"{image_id}_{k}.dcm" for k in range(1, len(series.files) + 1)]


def _put(source: Path, target: Path, link: bool) -> None:
    if link:
        try:
            os.link(source, target)
            return
        except OSError:  # another file system, or links not allowed there: copy
            pass
    shutil.copyfile(source, target)


def sort_dicom(src: str | os.PathLike, dest: str | os.PathLike, name: str | None = None,
               link: bool = False) -> Sorted:
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise InputError("src", f"{src} is not a folder; give the folder the DICOM files are in "
                         "(a CD's top folder, with its DICOMDIR, will do).")
    if dest.resolve() == src.resolve() or src.resolve() in dest.resolve().parents:
        raise InputError("dest", f"{dest} lies in {src}, so what is written would be read again "
                         "as it is written; sort into a folder outside it (move loose files of "
                         "the studies folder into a folder of their own first, then sort that).")
    series, skipped = find_series(src)
    if not series:
        others = f"{skipped} other file{'' if skipped == 1 else 's'}"
        raise InputError("src", f"{src} holds no DICOM image ({others}); give the folder the "
                         "DICOM files are in.")
    series.sort(key=lambda s: (int(s.number) if s.number.isdigit() else 10 ** 9, s.uid))
    ids = _ids(series, name or src.resolve().name)
    dest.mkdir(parents=True, exist_ok=True)
    there = {p.name.split(".")[0]: p for p in dest.iterdir()}  # the server's ids of them
    for image_id, s in zip(ids, series):
        for target in _targets(dest, image_id, s):
            stem = target.name.split(".")[0]
            if stem in there:
                raise InputError("dest", f"{there[stem]} already exists (the server's image "
                                 f"'{stem}'); nothing was written: pick another --name, or move "
                                 "it away first.")
    for image_id, s in zip(ids, series):
        files = _slice_order(s)
        if s.kind == "folder":
            part = dest / f".{image_id}.part"
            shutil.rmtree(part, ignore_errors=True)  # left by a run that was stopped
            part.mkdir()
            for k, path in enumerate(files):
                _put(path, part / f"IM{k:04d}.dcm", link)
            os.rename(part, dest / image_id)
            continue
        for path, target in zip(files, _targets(dest, image_id, s)):
            part = target.with_name(f".{target.name}.part")
            _put(path, part, link)
            os.replace(part, target)
    return Sorted(list(zip(ids, series)), skipped)


def sort_dicom_cli(args) -> int:
    done = sort_dicom(args.src, args.dest, name=args.name, link=args.link)
    dest = Path(args.dest)
    for image_id, s in done.series:
        what = {"file": f"{dest / image_id}.dcm", "folder": f"{dest / image_id}/",
                "files": f"{dest / image_id}_1.dcm ... _{len(s.files)}.dcm"}[s.kind]
        print(f"{image_id}: {len(s.files)} file(s), {s.modality or 'modality ?'}"
              f"{', ' + repr(s.description) if s.description else ''} -> {what}")
    if done.skipped:
        print(f"{done.skipped} file(s) left out: not DICOM images (DICOMDIR, reports, other "
              "files).")
    return 0
