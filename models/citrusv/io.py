"""Read a study into a (z, y, x) array + spacing/geometry: NIfTI, NRRD, DICOM file/series, PNG.

Index order follows docs/api.md: NIfTI/NRRD voxel [i, j, k] becomes array [k, j, i].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import imaging
from .errors import InputError


@dataclass
class Study:
    """Pixels in index order (z, y, x) or a 2D (y, x[, 3]) image, plus what a viewer needs."""

    array: np.ndarray
    spacing: tuple[float, ...] | None  # per array axis, mm; None when the file does not say
    affine: np.ndarray | None = None  # 4x4 voxel (i, j, k) -> patient/world, when known
    kind: str = "volume"  # "volume" or "image"
    photometric: str | None = None
    modality: str | None = None
    meta: dict = field(default_factory=dict)

    def slice(self, index: int, axis: int = 0) -> np.ndarray:
        if self.array.ndim == 2 or (self.kind == "image"):
            return self.array
        if not 0 <= index < self.array.shape[axis]:
            raise InputError("slice", f"slice {index} is outside 0..{self.array.shape[axis] - 1}; "
                             "pick a slice inside the volume.")
        return np.take(self.array, index, axis=axis)


def read_study(path: str | Path) -> Study:
    """Dispatch on the file type; unreadable input is an InputError naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputError("image", f"{path} does not exist; pass an image file or DICOM folder.")
    name = path.name.lower()
    try:
        if path.is_dir():
            return read_dicom_series(path)
        if name.endswith((".nii", ".nii.gz")):
            return read_nifti(path)
        if name.endswith((".nrrd", ".nhdr")):
            return read_nrrd(path)
        if is_picture(name):
            return read_png(path)
        return read_dicom_file(path)
    except InputError:
        raise
    except Exception as exc:  # any reader failure is the user's file, said plainly
        raise InputError("image", f"{path.name} could not be read ({type(exc).__name__}); "
                         "send NIfTI, NRRD, DICOM or PNG.") from exc


def read_nifti(path: Path) -> Study:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    return Study(np.ascontiguousarray(data.transpose(2, 1, 0)), tuple(zooms[::-1]),
                 affine=np.asarray(img.affine, dtype=float))


def read_nrrd(path: Path) -> Study:
    import nrrd

    data, header = nrrd.read(str(path), index_order="C")
    dirs = header.get("space directions")
    affine = None
    spacing = tuple(float(s) for s in header.get("spacings", [1.0] * data.ndim))[::-1]
    if dirs is not None:
        dirs = np.asarray(dirs, dtype=float)
        spacing = tuple(np.linalg.norm(dirs, axis=1)[::-1])
        affine = np.eye(4)
        affine[:3, :3] = dirs.T
        affine[:3, 3] = np.asarray(header.get("space origin", [0, 0, 0]), dtype=float)
        if str(header.get("space", "")).startswith("left-posterior"):  # LPS -> RAS
            affine[:2] *= -1
    return Study(np.ascontiguousarray(data), tuple(float(s) for s in spacing), affine=affine)


def _dicom_pixels(ds) -> np.ndarray:
    arr = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return arr * slope + intercept


def _shown(arr: np.ndarray, ds) -> tuple[np.ndarray, str | None]:
    """MONOCHROME1 pixels mirrored at read (bone bright), as the server's reader does, so
    `Study.array` is what a viewer shows; the Study then says MONOCHROME2, and callers that
    pass its `photometric` on to the engine do not mirror it twice."""
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip() or None
    if imaging.is_monochrome1(photometric):
        return imaging.bone_bright(arr, photometric), "MONOCHROME2"
    return arr, photometric


def pixel_spacing(ds) -> list[float] | None:
    """(row, column) mm from PixelSpacing, else ImagerPixelSpacing (X-ray); None when neither
    gives two positive numbers (the sample CR's PixelSpacing is 0\\0). The server's reader
    uses it too."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        if (value := _pixel_size(getattr(ds, tag, None))) is not None:
            return value
    return None


def _pixel_size(value) -> list[float] | None:
    """[row, column] mm when `value` is two positive numbers, else None."""
    try:
        value = [float(v) for v in value or []]
    except (TypeError, ValueError):
        return None
    return value if len(value) == 2 and all(v > 0 and np.isfinite(v) for v in value) else None


def _functional(ds, group: str, key: str, frame: int = 0):
    """An attribute of an enhanced (multi-frame) DICOM image, where it keeps what a classic
    slice has at its top level: the frame's own functional group, else the shared one."""
    per = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    for item in ([per[frame]] if frame < len(per) else []) + list(shared[:1]):
        inner = item.get(group) or []
        if len(inner) and inner[0].get(key) is not None:
            return inner[0].get(key)
    return None


def enhanced_geometry(ds) -> dict | None:
    """What an enhanced multi-frame DICOM image (one file per series, as newer scanners write
    CT) keeps in its functional groups rather than at its top level, where a classic slice has
    it: `order` (the frames sorted along the slice normal), `along` (their positions on it,
    sorted, mm), `orientation` (ImageOrientationPatient), `first` and `last`
    (ImagePositionPatient of the first and last frame in that order), `pixel_spacing` ([row,
    column] mm or None), `thickness` (or None), `slope` and `intercept` (the rescale to HU).
    None for a single-frame or classic multi-frame image. Read at the top level, such a file
    gave 1 mm pixels 1 mm apart and no rescale. The server's reader uses it too."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames < 2 or ds.get("PerFrameFunctionalGroupsSequence") is None:
        return None
    iop = _functional(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    positions = [_functional(ds, "PlanePositionSequence", "ImagePositionPatient", i)
                 for i in range(frames)]
    if iop is None or any(p is None for p in positions):
        raise InputError("image", "the multi-frame DICOM image gives no plane position for "
                         "each frame; send it as a classic series (one file per slice).")
    iop = [float(v) for v in iop]
    normal = np.cross(iop[:3], iop[3:])
    along = np.array([float(np.dot(normal, [float(v) for v in p])) for p in positions])
    order = np.argsort(along, kind="stable")
    thickness = _functional(ds, "PixelMeasuresSequence", "SliceThickness")
    slope = _functional(ds, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _functional(ds, "PixelValueTransformationSequence", "RescaleIntercept")
    return {"order": order, "along": along[order], "orientation": iop,
            "first": [float(v) for v in positions[order[0]]],
            "last": [float(v) for v in positions[order[-1]]],
            "pixel_spacing": _pixel_size(_functional(ds, "PixelMeasuresSequence",
                                                     "PixelSpacing")),
            "thickness": None if thickness is None else float(thickness),
            "slope": float(slope if slope is not None else ds.get("RescaleSlope", 1) or 1),
            "intercept": float(intercept if intercept is not None
                               else ds.get("RescaleIntercept", 0) or 0)}


def _read_enhanced(ds, geo: dict) -> Study:
    arr = ds.pixel_array[geo["order"]].astype(np.float32) * geo["slope"] + geo["intercept"]
    arr, photometric = _shown(arr, ds)
    gaps = np.diff(geo["along"])
    dz = float(np.median(gaps)) if len(gaps) else (geo["thickness"] or 1.0)
    ps = geo["pixel_spacing"]
    orient = np.asarray(geo["orientation"])
    affine = np.eye(4)
    affine[:3, 0] = orient[:3] * (ps[1] if ps else 1.0)
    affine[:3, 1] = orient[3:] * (ps[0] if ps else 1.0)
    affine[:3, 2] = np.cross(orient[:3], orient[3:]) * (dz or 1.0)
    affine[:3, 3] = geo["first"]
    affine[:2] *= -1  # DICOM LPS -> RAS
    return Study(arr, None if ps is None else (dz or 1.0, *ps), affine=affine,
                 photometric=photometric, modality=str(getattr(ds, "Modality", "")) or None)


def read_dicom_file(path: Path) -> Study:
    import pydicom

    ds = pydicom.dcmread(str(path))
    if (geo := enhanced_geometry(ds)) is not None:
        return _read_enhanced(ds, geo)
    ps = pixel_spacing(ds)
    arr, photometric = _shown(_dicom_pixels(ds), ds)
    modality = str(getattr(ds, "Modality", "")) or None
    if arr.ndim == 2 or (arr.ndim == 3 and photometric in ("RGB", "YBR_FULL")):
        return Study(arr, None if ps is None else tuple(ps), kind="image",
                     photometric=photometric, modality=modality)
    thick = float(getattr(ds, "SliceThickness", 1.0) or 1.0)
    return Study(arr, None if ps is None else (thick, *ps), photometric=photometric,
                 modality=modality)


def read_dicom_series(folder: Path) -> Study:
    """All slices of one series in a folder, sorted along the slice normal."""
    import pydicom

    slices = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(file))
        except Exception:
            continue
        if "PixelData" in ds:
            slices.append(ds)
    if not slices:
        raise InputError("image", f"{folder} holds no DICOM images; pick a series folder.")
    uids = list(dict.fromkeys(str(s.get("SeriesInstanceUID")) for s in slices))
    if len(uids) > 1:  # it took the first and said nothing (the server answers a 400 alike)
        raise InputError("image", f"{folder.name} holds {len(uids)} DICOM series; pick the "
                         "folder of one series.")
    uid = slices[0].get("SeriesInstanceUID")
    orient = np.asarray(getattr(slices[0], "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
    normal = np.cross(orient[:3], orient[3:])

    def position(ds) -> float:
        pos = getattr(ds, "ImagePositionPatient", None)
        return float(np.dot(normal, np.asarray(pos, float))) if pos is not None else float(
            getattr(ds, "InstanceNumber", 0) or 0)

    slices.sort(key=position)
    arr, photometric = _shown(np.stack([_dicom_pixels(s) for s in slices]), slices[0])
    ps = pixel_spacing(slices[0]) or [1.0, 1.0]
    gaps = np.diff([position(s) for s in slices])
    dz = float(np.median(np.abs(gaps))) if len(gaps) else float(
        getattr(slices[0], "SliceThickness", 1.0) or 1.0)
    affine = None
    if getattr(slices[0], "ImagePositionPatient", None) is not None:
        affine = np.eye(4)
        affine[:3, 0] = orient[:3] * ps[1]
        affine[:3, 1] = orient[3:] * ps[0]
        affine[:3, 2] = normal * dz
        affine[:3, 3] = np.asarray(slices[0].ImagePositionPatient, float)
        affine[:2] *= -1  # DICOM LPS -> RAS
    return Study(arr, (dz or 1.0, *ps), affine=affine,
                 photometric=photometric,
                 modality=str(getattr(slices[0], "Modality", "")) or None,
                 meta={"series_uid": str(uid), "n_files": len(slices)})


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def is_picture(path) -> bool:
    """Whether a file is a picture (PNG, JPEG, TIFF, BMP): pixels with no word on what kind of
    image they are."""
    return str(path).lower().endswith(PICTURE_SUFFIXES)


def read_png(path: Path) -> Study:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB") if img.mode not in ("L", "I", "I;16", "F") else img
        arr = np.asarray(img)
    return Study(arr, None, kind="image")
